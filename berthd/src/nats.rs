//! The NATS server berthd needs: the one at the URL, or a private one it
//! starts when nothing answers on this host.

use std::net::ToSocketAddrs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A nats-server berthd started, stopped with it.
pub struct LocalServer {
    child: tokio::process::Child,
}

impl LocalServer {
    /// Stops the server (SIGTERM, then SIGKILL after 5 s).
    pub async fn stop(&mut self) {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child by pid.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// The host and port of a `nats://host:port` URL (port 4222 when absent).
fn host_port(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.split_once("://").map(|(_, rest)| rest).unwrap_or(url);
    let rest = rest.rsplit_once('@').map(|(_, rest)| rest).unwrap_or(rest);
    let rest = rest.split(['/', ',']).next().unwrap_or(rest);
    match rest.rsplit_once(':') {
        Some((host, port)) => Ok((
            host.to_string(),
            port.parse()
                .with_context(|| format!("invalid port in NATS URL {url:?}"))?,
        )),
        None => Ok((rest.to_string(), 4222)),
    }
}

fn answers(host: &str, port: u16) -> bool {
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|addr| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok())
}

/// Whether a nats-server berthd starts asks its clients who they are.
#[derive(Debug, Clone)]
pub enum Access {
    /// The `authorization` block in this file decides (nkey users only).
    Authorized(PathBuf),
    /// No authentication: any client that reaches the port may do anything.
    Open,
}

/// True when something accepts connections at `url`'s host and port, or
/// at any of them when `url` lists the servers of a cluster.
pub fn url_answers(url: &str) -> anyhow::Result<bool> {
    for one in berth_bus::conn::server_urls(url) {
        let (host, port) = host_port(one)?;
        if answers(&host, port) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Makes sure a NATS server answers at `url`: when none does and the URL
/// names this host, starts `bin` with JetStream, its store in `store` and
/// its configuration in `store/nats.conf`, with `access` deciding who may
/// connect, and returns it.
pub async fn ensure_server(
    url: &str,
    bin: &Path,
    store: &Path,
    access: &Access,
) -> anyhow::Result<Option<LocalServer>> {
    if url_answers(url)? {
        return Ok(None);
    }
    // A cluster's servers are started by whoever runs the cluster: one of
    // them started here would be a cluster of its own.
    if berth_bus::conn::server_urls(url).len() > 1 {
        bail!("no NATS server of the cluster {url} answers");
    }
    let (host, port) = host_port(url)?;
    if !matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1" | "[::1]") {
        bail!("no NATS server answers at {url}, and it is not on this host to start one");
    }
    std::fs::create_dir_all(store).with_context(|| format!("create {}", store.display()))?;
    let config = store.join("nats.conf");
    write_config(&config, host.trim_matches(['[', ']']), port, store, access)?;
    let log = std::fs::File::create(store.join("nats-server.log"))?;
    let child = tokio::process::Command::new(bin)
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {} (is nats-server installed?)", bin.display()))?;
    let mut server = LocalServer { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !answers(&host, port) {
        if let Ok(Some(status)) = server.child.try_wait() {
            let log = std::fs::read_to_string(store.join("nats-server.log")).unwrap_or_default();
            bail!("nats-server exited with {status}: {}", log.trim());
        }
        if Instant::now() > deadline {
            server.stop().await;
            bail!("nats-server did not listen on {host}:{port} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    match access {
        Access::Authorized(_) => {
            tracing::info!(%url, store = %store.display(), "started nats-server with authorization")
        }
        Access::Open => tracing::warn!(
            %url,
            "started nats-server without authentication (--insecure): anyone who can reach it can run containers as root on this host"
        ),
    }
    Ok(Some(server))
}

/// Writes the server's configuration: where it listens, JetStream's store,
/// and the `authorization` block (inlined, so the file stands alone).
fn write_config(
    path: &Path,
    host: &str,
    port: u16,
    store: &Path,
    access: &Access,
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut text = format!(
        "# Written by berthd at each start; edits are lost.\nlisten: {:?}\njetstream {{\n  store_dir: {:?}\n}}\n",
        format!("{host}:{port}"),
        store
    );
    if let Access::Authorized(block) = access {
        let block =
            std::fs::read_to_string(block).with_context(|| format!("read {}", block.display()))?;
        text.push_str(&block);
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    file.write_all(text.as_bytes())?;
    Ok(())
}

/// Waits until a request to each subject gets an answer (a
/// micro-service `PING`, or an op of a service).
pub async fn wait_for_services(
    nats: &async_nats::Client,
    subjects: &[String],
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    for subject in subjects {
        let name = subject.as_str();
        let subject = subject.clone();
        loop {
            let ping = nats.request(subject.clone(), bytes::Bytes::new());
            if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(500), ping).await {
                break;
            }
            if Instant::now() > deadline {
                bail!("nothing answered {name} within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_host_and_port() {
        assert_eq!(
            host_port("nats://127.0.0.1:4222").unwrap(),
            ("127.0.0.1".into(), 4222)
        );
        assert_eq!(
            host_port("nats://user:pw@host:5000").unwrap(),
            ("host".into(), 5000)
        );
        assert_eq!(host_port("localhost").unwrap(), ("localhost".into(), 4222));
        assert!(host_port("nats://h:port").is_err());
    }

    #[tokio::test]
    async fn no_server_is_started_for_a_cluster() {
        // Two free ports that nothing listens on.
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                std::net::TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let url = format!(
            "nats://127.0.0.1:{},nats://127.0.0.1:{}",
            ports[0], ports[1]
        );
        assert!(!url_answers(&url).unwrap());
        let dir = tempfile::tempdir().unwrap();
        let started =
            ensure_server(&url, Path::new("nats-server"), dir.path(), &Access::Open).await;
        let err = started.err().expect("a cluster's server was started here");
        assert!(
            err.to_string().contains("no NATS server of the cluster"),
            "{err}"
        );
    }
}
