//! The fleet's deploy files as a user runs them. `deploy/fleet-up.sh` brings
//! up a fleet on this machine: three nats-servers (`deploy/cluster/`, on
//! the fixed ports 4222-4224 and 6222-6224) that take only TLS with a
//! certificate of the fleet's CA, on client connections and routes alike,
//! and only berth's identities (`deploy/fleet-auth.sh`), the control
//! services and a node agent, each as its own identity. The CLI, with the
//! `fleet.env` the script writes, runs a container there; a client
//! without the admin's seed, or without the client certificate, is
//! refused; `deploy/fleet-down.sh --purge` leaves no process, mount or
//! file behind.
//!
//! docker-compose.yml cannot be run here (no docker daemon): its wiring of
//! the same material (auth volume, working directories, TLS variables,
//! identities per node) is checked against the compose file itself.
//!
//! Needs root, runc and nats-server 2.10 or later, and the ports above
//! free.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use berth_tests::{binary, deploy_dir, fixture, serial, stderr, stdout};

/// The ports deploy/cluster/nats-*.conf listen on.
const CLIENT_PORTS: [u16; 3] = [4222, 4223, 4224];
const ROUTE_PORTS: [u16; 3] = [6222, 6223, 6224];

/// A fleet brought up by deploy/fleet-up.sh in a temporary FLEET_DIR,
/// purged by deploy/fleet-down.sh on drop.
struct ScriptedFleet {
    dir: PathBuf,
    _parent: tempfile::TempDir,
    down: bool,
}

impl ScriptedFleet {
    fn up(nodes: u32) -> Result<ScriptedFleet> {
        for port in CLIENT_PORTS.iter().chain(&ROUTE_PORTS) {
            if TcpListener::bind(("127.0.0.1", *port)).is_err() {
                bail!("port {port} is in use: deploy/fleet-up.sh needs 4222-4224 and 6222-6224");
            }
        }
        let parent = berth_testkit::tempdir("berth-fleet-scripts-")?;
        let dir = parent.path().join("fleet");
        let mut fleet = ScriptedFleet {
            dir,
            _parent: parent,
            down: false,
        };
        let output = fleet.script("fleet-up.sh", &[&nodes.to_string()])?;
        if !output.status.success() {
            bail!(
                "fleet-up.sh exited with {}:\nstdout: {}\nstderr: {}\nlogs:\n{}",
                output.status,
                stdout(&output),
                stderr(&output),
                fleet.logs()
            );
        }
        Ok(fleet)
    }

    /// Runs deploy/SCRIPT ARGS with this fleet's FLEET_DIR and the test
    /// build's binaries and shim.
    fn script(&mut self, script: &str, args: &[&str]) -> Result<Output> {
        let berthd = binary("berthd")?;
        let bin = berthd.parent().context("berthd has no directory")?;
        Command::new(deploy_dir().join(script))
            .args(args)
            .env("FLEET_DIR", &self.dir)
            .env("BERTH_BIN", bin)
            .env("BERTH_SHIM", berth_testkit::shim_bin())
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run deploy/{script}"))
    }

    /// The variables of FLEET_DIR/fleet.env.
    fn env(&self) -> Result<HashMap<String, String>> {
        let text = fs::read_to_string(self.dir.join("fleet.env"))?;
        Ok(text
            .lines()
            .filter(|line| !line.starts_with('#') && !line.starts_with("export"))
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.to_string(), value.to_string()))
            .collect())
    }

    /// `berth ARGS` with `env` as its whole berth environment (no
    /// credentials from this host's own berthd).
    fn berth(&self, env: &HashMap<String, String>, args: &[&str]) -> Result<Output> {
        let mut command = Command::new(binary("berth")?);
        for (key, _) in std::env::vars() {
            if key.starts_with("BERTH_") {
                command.env_remove(key);
            }
        }
        command
            .envs(env)
            .env("BERTH_ROOT", self.dir.join("no-root"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run berth")
    }

    fn berth_ok(&self, env: &HashMap<String, String>, args: &[&str]) -> Result<String> {
        let output = self.berth(env, args)?;
        if !output.status.success() {
            bail!(
                "berth {args:?} exited with {}:\nstdout: {}\nstderr: {}\nlogs:\n{}",
                output.status,
                stdout(&output),
                stderr(&output),
                self.logs()
            );
        }
        Ok(stdout(&output))
    }

    /// The tails of every log in FLEET_DIR.
    fn logs(&self) -> String {
        let mut out = String::new();
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return out;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|ext| ext == "log") {
                let text = fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                out.push_str(&format!("--- {}\n", path.display()));
                for line in tail.into_iter().rev() {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }

    fn down(&mut self) -> Result<Output> {
        self.down = true;
        self.script("fleet-down.sh", &["--purge"])
    }
}

impl Drop for ScriptedFleet {
    fn drop(&mut self) {
        if !self.down {
            let _ = self.down();
        }
    }
}

/// The first line a NATS server sends on `port`: its INFO.
fn server_info(port: u16) -> Result<String> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    Ok(line)
}

/// Processes whose command line names `dir`.
fn processes_naming(dir: &Path) -> Vec<String> {
    let needle = dir.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

/// The pid of the task in `berth inspect`'s JSON.
fn task_pid(inspect: &serde_json::Value) -> Option<u64> {
    let record = inspect
        .as_array()
        .and_then(|all| all.first())
        .unwrap_or(inspect);
    record
        .pointer("/state/pid")
        .and_then(serde_json::Value::as_u64)
}

#[test]
fn fleet_scripts_bring_up_a_secure_fleet_and_purge_it() -> Result<()> {
    let _serial = serial();
    let mut fleet = ScriptedFleet::up(1)?;
    let env = fleet.env()?;
    for key in [
        "BERTH_NATS_URL",
        "BERTH_NATS_NKEY",
        "BERTH_TLS_CA",
        "BERTH_TLS_CERT",
        "BERTH_TLS_KEY",
    ] {
        ensure!(env.contains_key(key), "fleet.env has no {key}: {env:?}");
    }

    // Every server asks for TLS and credentials of its clients and TLS of
    // its routes.
    for port in CLIENT_PORTS {
        let info = server_info(port)?;
        ensure!(
            info.contains("\"tls_required\":true") && info.contains("\"auth_required\":true"),
            "client port {port} does not require TLS and auth: {info}"
        );
    }
    // A route must open with TLS and a certificate of the CA: one without
    // is refused in the handshake.
    let ca = fleet.dir.join("auth/tls/ca.pem");
    for port in ROUTE_PORTS {
        // -ign_eof: read on until the server closes, so that the alert
        // it sends after the handshake is seen; timeout bounds it.
        let output = Command::new("timeout")
            .args(["20", "openssl", "s_client", "-ign_eof"])
            .args(["-connect", &format!("127.0.0.1:{port}"), "-CAfile"])
            .arg(&ca)
            .stdin(Stdio::null())
            .output()
            .context("run openssl s_client")?;
        let text = format!("{}{}", stdout(&output), stderr(&output));
        ensure!(
            !output.status.success() && text.contains("certificate required"),
            "route port {port} took a TLS client without a certificate: {text}"
        );
    }

    // The admin sees the node ready (once metadata has its first
    // heartbeat) and runs a container there.
    let mut nodes = String::new();
    let ready = berth_testkit::wait_until(Duration::from_secs(30), || {
        nodes = fleet.berth_ok(&env, &["nodes"]).unwrap_or_default();
        nodes
            .lines()
            .any(|line| line.starts_with("node-1 ") && line.contains(" ready "))
    });
    ensure!(ready, "node-1 is not ready:\n{nodes}");
    let archive = fixture::image("busybox/busybox.oci.tar");
    let archive = archive.to_string_lossy();
    fleet.berth_ok(&env, &["--node", "node-1", "image", "import", &archive])?;
    let out = fleet.berth_ok(
        &env,
        &["--node", "node-1", "run", "--rm", "busybox", "echo", "hi"],
    )?;
    ensure!(out == "hi\n", "run printed {out:?}");

    // Without the admin's seed the servers refuse the client at once.
    let mut anonymous = env.clone();
    anonymous.remove("BERTH_NATS_NKEY");
    let output = fleet.berth(&anonymous, &["ps"])?;
    ensure!(
        output.status.code() == Some(125) && stderr(&output).contains("authorization violation"),
        "a client without an identity was not refused: {:?} {}",
        output.status.code(),
        stderr(&output)
    );
    // Without the client certificate TLS fails before any credentials.
    let mut uncertified = env.clone();
    uncertified.remove("BERTH_TLS_CERT");
    uncertified.remove("BERTH_TLS_KEY");
    let output = fleet.berth(&uncertified, &["ps"])?;
    ensure!(
        output.status.code() == Some(125)
            && stderr(&output).contains("Certificate")
            && stderr(&output).contains("--tls-cert"),
        "a client without the certificate was not refused: {:?} {}",
        output.status.code(),
        stderr(&output)
    );
    // The services each connect as their own identity, not as the admin.
    let auth = fleet.dir.join("auth");
    for service in ["control", "node-1"] {
        let pid = fs::read_to_string(fleet.dir.join(format!("{service}.pid")))?;
        let environ = fs::read(format!("/proc/{}/environ", pid.trim()))?;
        ensure!(
            !String::from_utf8_lossy(&environ).contains("BERTH_NATS_NKEY="),
            "{service} was started with BERTH_NATS_NKEY"
        );
    }
    ensure!(auth.join("task-node-1.nk").exists() && auth.join("snapshot-node-1.nk").exists());

    // A container left running goes with the purge, as do the files.
    fleet.berth_ok(
        &env,
        &[
            "--node", "node-1", "run", "-d", "--name", "left", "busybox", "sleep", "600",
        ],
    )?;
    let inspect: serde_json::Value =
        serde_json::from_str(&fleet.berth_ok(&env, &["inspect", "left"])?)?;
    let pid = task_pid(&inspect).context("no task pid in inspect")?;
    ensure!(Path::new(&format!("/proc/{pid}")).exists());
    let dir = fleet.dir.clone();
    let output = fleet.down()?;
    ensure!(
        output.status.success(),
        "fleet-down.sh --purge exited with {}: {}",
        output.status,
        stderr(&output)
    );
    ensure!(!dir.exists(), "{} is still there", dir.display());
    let left = processes_naming(&dir);
    ensure!(left.is_empty(), "processes left: {left:?}");
    ensure!(
        berth_testkit::wait_until(Duration::from_secs(5), || !Path::new(&format!(
            "/proc/{pid}"
        ))
        .exists()),
        "the container's process {pid} outlived the purge"
    );
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    let dir_text = dir.to_string_lossy();
    ensure!(
        !mounts.contains(dir_text.as_ref()),
        "mounts left under {dir_text}"
    );
    for port in CLIENT_PORTS {
        ensure!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "port {port} still taken"
        );
    }
    Ok(())
}

/// Where the compose file mounts the volume `auth` in berth's containers:
/// the default auth directory beside `--root /var/lib/berth`, where berthd
/// and the CLI look with no flags.
const COMPOSE_AUTH: &str = "/var/lib/berth/auth";
/// Where the NATS containers mount it, beside their nats.conf.
const COMPOSE_NATS_AUTH: &str = "/etc/nats/auth";

fn strings(value: &serde_norway::Value) -> Vec<String> {
    value
        .as_sequence()
        .map(|items| {
            items
                .iter()
                .filter_map(|item| item.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn compose_file_gives_every_service_the_fleet_material() -> Result<()> {
    let repo = deploy_dir().join("..");
    let text = fs::read_to_string(repo.join("docker-compose.yml"))?;
    let mut doc: serde_norway::Value = serde_norway::from_str(&text)?;
    doc.apply_merge()?;
    let services = doc["services"]
        .as_mapping()
        .context("no services in docker-compose.yml")?;
    let named = |prefix: &str| -> Vec<String> {
        let mut names: Vec<String> = services
            .keys()
            .filter_map(|key| key.as_str())
            .filter(|name| name.starts_with(prefix))
            .map(str::to_string)
            .collect();
        names.sort();
        names
    };
    let servers = named("nats-");
    let nodes = named("node-");
    ensure!(
        servers.len() == 3 && nodes.len() == 2,
        "{servers:?} {nodes:?}"
    );

    // The auth service makes the material for exactly these servers and
    // nodes: run its command here, with the volume as a directory.
    let auth = &doc["services"]["auth"];
    ensure!(strings(&auth["entrypoint"]) == ["/usr/local/bin/fleet-auth.sh"]);
    let command = strings(&auth["command"]);
    ensure!(
        command.first().map(String::as_str) == Some(COMPOSE_AUTH),
        "auth writes elsewhere: {command:?}"
    );
    ensure!(
        command.get(1) == Some(&nodes.len().to_string()),
        "{command:?}"
    );
    ensure!(command[2..] == servers[..], "server names {command:?}");
    ensure!(strings(&auth["volumes"]).contains(&format!("auth:{COMPOSE_AUTH}")));
    let work = berth_testkit::tempdir("berth-compose-")?;
    let material = work.path().join("etc-nats/auth");
    let made = Command::new(deploy_dir().join("fleet-auth.sh"))
        .arg(&material)
        .args(&command[1..])
        .env("BERTHD", binary("berthd")?)
        .output()?;
    ensure!(made.status.success(), "fleet-auth.sh: {}", stderr(&made));
    // A path inside a container, as a path of the material made here.
    let local = |path: &str, mount: &str| -> Result<PathBuf> {
        let rest = path
            .strip_prefix(mount)
            .with_context(|| format!("{path} is not under {mount}"))?;
        Ok(material.join(rest.trim_start_matches('/')))
    };

    // Each server: the shared nats.conf beside the volume, run in that
    // directory after the auth service has finished; the configuration
    // with the material is valid to nats-server itself.
    for name in &servers {
        let server = &doc["services"][name.as_str()];
        let volumes = strings(&server["volumes"]);
        ensure!(
            volumes.contains(&"./deploy/compose/nats.conf:/etc/nats/nats.conf:ro".to_string())
                && volumes.contains(&format!("auth:{COMPOSE_NATS_AUTH}:ro")),
            "{name} volumes: {volumes:?}"
        );
        ensure!(
            server["working_dir"].as_str() == Some("/etc/nats"),
            "{name}"
        );
        ensure!(
            server["depends_on"]["auth"]["condition"].as_str()
                == Some("service_completed_successfully"),
            "{name} does not wait for auth"
        );
    }
    let conf = work.path().join("etc-nats/nats.conf");
    fs::copy(repo.join("deploy/compose/nats.conf"), &conf)?;
    let checked = Command::new("nats-server")
        .args(["-c", "nats.conf", "-t"])
        .current_dir(work.path().join("etc-nats"))
        .env("NATS_NAME", &servers[0])
        .output()?;
    ensure!(
        checked.status.success(),
        "nats-server -t of deploy/compose/nats.conf: {}{}",
        stdout(&checked),
        stderr(&checked)
    );
    let conf_text = fs::read_to_string(&conf)?;
    ensure!(
        conf_text.matches("verify: true").count() == 2
            && conf_text.contains("include \"auth/nats-auth.conf\""),
        "nats.conf lacks client or route verification or the identities"
    );
    // The server certificate names every server, for the clients' and the
    // routes' host name checks.
    let san = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(material.join("tls/server-cert.pem"))
        .output()?;
    for name in &servers {
        ensure!(
            stdout(&san).contains(&format!("DNS:{name}")),
            "server certificate lacks {name}: {}",
            stdout(&san)
        );
    }

    // berth's containers: the volume where berthd and the CLI look, TLS
    // files that the auth service made, and each node its own identity.
    let env = &doc["x-berth-env"];
    for key in ["BERTH_TLS_CA", "BERTH_TLS_CERT", "BERTH_TLS_KEY"] {
        let path = env[key]
            .as_str()
            .with_context(|| format!("x-berth-env has no {key}"))?;
        ensure!(
            local(path, COMPOSE_AUTH)?.exists(),
            "{key}={path} is not made"
        );
    }
    for name in std::iter::once(&"control".to_string()).chain(&nodes) {
        let service = &doc["services"][name.as_str()];
        ensure!(
            service["environment"] == *env,
            "{name} does not take x-berth-env"
        );
        let volumes = strings(&service["volumes"]);
        ensure!(
            volumes.contains(&format!("auth:{COMPOSE_AUTH}:ro")),
            "{name} volumes: {volumes:?}"
        );
    }
    let control = strings(&doc["services"]["control"]["command"]);
    ensure!(
        control
            .windows(2)
            .any(|w| w == ["--root", "/var/lib/berth"]),
        "control's root is not the auth volume's parent: {control:?}"
    );
    for name in &nodes {
        let command = strings(&doc["services"][name.as_str()]["command"]);
        ensure!(
            command.windows(2).any(|w| w == ["--node", name.as_str()])
                && command
                    .windows(2)
                    .any(|w| w == ["--auth-dir", COMPOSE_AUTH]),
            "{name}: {command:?}"
        );
        for role in ["task", "snapshot"] {
            ensure!(
                material.join(format!("{role}-{name}.nk")).exists(),
                "no {role} identity for {name}"
            );
        }
    }
    Ok(())
}
