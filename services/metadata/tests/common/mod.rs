//! What the metadata integration tests share: a real nats-server, the
//! service in this process or as its own binary, typed clients, and task
//! events published the way the task service publishes them.

// Each test binary uses a part of this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream;
use async_nats::HeaderMap;
use prost::Message;
use tokio_util::sync::CancellationToken;

use berth_bus::{api, Client, Code};
use berth_proto::metadata as mpb;
use berth_proto::task::TaskEvent;
use berth_proto::{Envelope, Timestamp};
use berth_testkit::NatsServer;

/// A nats-server and a metadata service running in this process.
pub struct Service {
    /// The server (stopped on drop).
    pub nats: NatsServer,
    /// The service's root.
    pub dir: tempfile::TempDir,
    /// A client connection for the test.
    pub conn: async_nats::Client,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<berth_bus::Result<()>>,
}

impl Service {
    /// Starts a server and the service, and waits until it answers.
    pub async fn start() -> Result<Service> {
        berth_bus::trace::init_with("berth-metadata-test", "warn");
        let nats = NatsServer::start()?;
        let dir = berth_testkit::tempdir("berth-metadata-")?;
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(berth_metadata::run(
            berth_bus::connect(&nats.url(), "berth-metadata").await?,
            berth_metadata::Config {
                root: dir.path().to_path_buf(),
            },
            shutdown.clone(),
        ));
        let conn = berth_bus::connect(&nats.url(), "test").await?;
        let service = Service {
            nats,
            dir,
            conn,
            shutdown,
            task,
        };
        wait_served(&service.api("default")).await?;
        Ok(service)
    }

    /// The typed client of `namespace`.
    pub fn api(&self, namespace: &str) -> api::Metadata {
        metadata(&self.conn, namespace)
    }

    /// Stops the service and waits for it.
    pub async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        self.task.await??;
        Ok(())
    }
}

/// The typed client of `namespace` over `conn`.
pub fn metadata(conn: &async_nats::Client, namespace: &str) -> api::Metadata {
    api::Metadata {
        client: Client::new(conn.clone(), Duration::from_secs(10)),
        namespace: namespace.to_string(),
    }
}

/// Waits until the service answers a request.
pub async fn wait_served(metadata: &api::Metadata) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match metadata.list_images(&Default::default()).await {
            Ok(_) => return Ok(()),
            Err(err) if Instant::now() > deadline => bail!("metadata never answered: {err}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

/// Polls `check` every 20 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The metadata binary as its own process, for kill tests.
pub struct Process {
    child: Option<Child>,
    root: PathBuf,
    url: String,
}

impl Process {
    /// Starts the binary on `url` with its database under `root`.
    pub fn start(url: &str, root: &Path) -> Result<Process> {
        let mut process = Process {
            child: None,
            root: root.to_path_buf(),
            url: url.to_string(),
        };
        process.restart()?;
        Ok(process)
    }

    /// (Re)starts the binary (after a kill).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let child = Command::new(env!("CARGO_BIN_EXE_berth-metadata"))
            .arg("--nats")
            .arg(&self.url)
            .arg("--root")
            .arg(&self.root)
            .env(
                "BERTH_LOG",
                std::env::var("BERTH_LOG").unwrap_or("warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start berth-metadata")?;
        self.child = Some(child);
        Ok(())
    }

    /// Kills the process with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A container record on `node`, as the CLI makes one.
pub fn container(container_id: &str, node: &str) -> mpb::Container {
    mpb::Container {
        container_id: container_id.to_string(),
        image: "docker.io/library/busybox:latest".to_string(),
        image_digest: digest('b'),
        snapshot_key: container_id.to_string(),
        node: node.to_string(),
        ..Default::default()
    }
}

/// An image record with a made-up target.
pub fn image(name: &str) -> mpb::Image {
    mpb::Image {
        name: name.to_string(),
        target: Some(berth_proto::Descriptor {
            media_type: "application/vnd.oci.image.manifest.v1+json".into(),
            digest: digest('a'),
            size: 349,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A well-formed digest of one repeated hex digit.
pub fn digest(hex: char) -> String {
    format!("sha256:{}", hex.to_string().repeat(64))
}

/// Creates a container and reserves its task as the task service does.
pub async fn reserve(
    metadata: &api::Metadata,
    container_id: &str,
    node: &str,
    generation: u64,
) -> Result<()> {
    let created = metadata
        .create_container(&mpb::CreateContainerRequest {
            container: Some(container(container_id, node)),
        })
        .await;
    match created {
        Err(err) if err.code == Code::AlreadyExists => {}
        other => {
            other?;
        }
    }
    metadata
        .reserve_task(&mpb::ReserveTaskRequest {
            container_id: container_id.to_string(),
            node: node.to_string(),
            generation,
            boot_id: "boot-1".to_string(),
        })
        .await?;
    Ok(())
}

/// One task event as the task service's outbox publishes it.
#[derive(Debug, Clone)]
pub struct TaskEventOut {
    /// The subject's namespace.
    pub namespace: String,
    /// The namespace the envelope claims (the subject's, unless forged).
    pub envelope_namespace: String,
    /// e.g. `tasks.exit`.
    pub topic: String,
    /// The reservation's generation.
    pub generation: u64,
    /// The payload.
    pub event: TaskEvent,
    /// The `Nats-Msg-Id`; the stream stores one message per id in its window.
    pub msg_id: String,
}

impl TaskEventOut {
    /// An event of `namespace` from node `n1`.
    pub fn new(
        namespace: &str,
        topic: &str,
        generation: u64,
        event: TaskEvent,
        msg_id: &str,
    ) -> Self {
        TaskEventOut {
            namespace: namespace.to_string(),
            envelope_namespace: namespace.to_string(),
            topic: topic.to_string(),
            generation,
            event,
            msg_id: msg_id.to_string(),
        }
    }

    /// Publishes it to the stream; returns the ack's future.
    pub async fn publish(
        &self,
        js: &jetstream::Context,
    ) -> Result<jetstream::context::PublishAckFuture> {
        let envelope = Envelope {
            topic: self.topic.clone(),
            namespace: self.envelope_namespace.clone(),
            node: "n1".to_string(),
            timestamp: Some(Timestamp::now()),
            generation: self.generation,
            source: "task".to_string(),
            payload: self.event.encode_to_vec().into(),
            traceparent: String::new(),
        };
        let subject = berth_bus::subject::event(&self.namespace, &self.topic)?;
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", self.msg_id.as_str());
        let ack = js
            .publish_with_headers(subject, headers, envelope.encode_to_vec().into())
            .await?;
        Ok(ack)
    }
}

/// The task record of `container_id`, or `None` without one.
pub async fn task(metadata: &api::Metadata, container_id: &str) -> Result<Option<mpb::Task>> {
    let reply = metadata
        .get_task(&mpb::GetTaskRequest {
            container_id: container_id.to_string(),
        })
        .await;
    match reply {
        Ok(reply) => Ok(reply.task),
        Err(err) if err.code == Code::NotFound => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// A label map from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The code of a failed call, `None` for a success.
pub fn code<T>(outcome: berth_bus::Result<T>) -> Option<Code> {
    outcome.err().map(|err| err.code)
}

/// The same client, in another namespace.
pub fn metadata_of(md: &api::Metadata, namespace: &str) -> api::Metadata {
    api::Metadata {
        client: md.client.clone(),
        namespace: namespace.to_string(),
    }
}
