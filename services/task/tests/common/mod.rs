//! The node the task service tests run on: metadata, content and snapshot
//! services in the test process, the task service as its own process (so it
//! can be killed), a real nats-server and runc. Needs root.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use prost::Message;
use tokio_util::sync::CancellationToken;

use berth_bus::{api, Client};
use berth_oci::{Archive, Platform};
use berth_proto::{content as cpb, metadata as mpb, snapshot as spb, task as tpb, Envelope};
use berth_testkit::{fixture, NatsServer};

const TASK: &str = env!("CARGO_BIN_EXE_berth-task");

/// A node: the cluster services in-process, the task service as a child.
pub struct Node {
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub node: String,
    shutdown: CancellationToken,
    task: Option<Child>,
    pub client: Client,
    pub namespace: String,
}

impl Node {
    pub async fn start(name: &str) -> Result<Node> {
        let nats = NatsServer::start()?;
        let dir = berth_testkit::tempdir("berth-task-")?;
        let node = format!("task-{name}");
        let shutdown = CancellationToken::new();
        let url = nats.url();
        let connect = |name: &'static str| berth_bus::connect(&url, name);
        let root = dir.path().to_path_buf();
        tokio::spawn(berth_metadata::run(
            connect("metadata").await?,
            berth_metadata::Config {
                root: root.join("metadata"),
            },
            shutdown.clone(),
        ));
        tokio::spawn(berth_content::run(
            connect("content").await?,
            berth_content::Config {
                root: root.join("content"),
            },
            shutdown.clone(),
        ));
        tokio::spawn(berth_snapshot::run(
            connect("snapshot").await?,
            berth_snapshot::Config {
                root: root.join("snapshot"),
                node: node.clone(),
                content_root: Some(root.join("content")),
                limits: Default::default(),
            },
            shutdown.clone(),
        ));
        let client = Client::new(connect("test").await?, Duration::from_secs(20));
        let mut this = Node {
            nats,
            dir,
            node,
            shutdown,
            task: None,
            client,
            // A namespace per node keeps the cgroup parents of concurrent
            // tests apart.
            namespace: format!("t-{name}"),
        };
        this.start_task_service()?;
        this.wait_for_services().await?;
        Ok(this)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    pub fn start_task_service(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("task.log"))?;
        let child = Command::new(TASK)
            .args(["--nats", &self.nats.url(), "--node", &self.node])
            .arg("--shim")
            .arg(berth_testkit::shim_bin())
            .arg("--root")
            .arg(self.dir.path().join("task"))
            .arg("--state")
            .arg(self.state_dir())
            .env("BERTH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.task = Some(child);
        Ok(())
    }

    pub fn kill_task_service(&mut self) {
        if let Some(mut child) = self.task.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("task.log")).unwrap_or_default()
    }

    pub async fn wait_for_services(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for name in ["metadata", "content", "snapshot", "task"] {
            loop {
                let ping = self
                    .client
                    .nats()
                    .request(format!("$SRV.PING.{name}"), "".into());
                if let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(200), ping).await {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{name} did not register:\n{}", self.log());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    pub fn metadata(&self) -> api::Metadata {
        api::Metadata {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
        }
    }

    pub fn task(&self) -> api::Task {
        api::Task {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            node: self.node.clone(),
        }
    }

    pub fn snapshot(&self) -> api::Snapshot {
        api::Snapshot {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
            node: self.node.clone(),
        }
    }

    /// Imports busybox: its blobs into content, its layer unpacked.
    /// Returns (chain id, config digest).
    pub async fn import_busybox(&self) -> Result<(String, String)> {
        self.import(&fixture::image("busybox/busybox.oci.tar"), "latest")
            .await
    }

    /// Imports the image tagged `tag` of an OCI archive: its blobs into
    /// content, its layers unpacked. Returns (chain id, config digest).
    pub async fn import(&self, path: &Path, tag: &str) -> Result<(String, String)> {
        let archive = Archive::open(path)?;
        let content = api::Content {
            client: self.client.clone(),
            namespace: self.namespace.clone(),
        };
        for desc in archive.blobs() {
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut archive.blob(&desc.digest)?, &mut data)?;
            let reference = format!("test-{}", desc.digest.hex());
            let opened = content
                .open(&cpb::OpenRequest {
                    r#ref: reference.clone(),
                    expected_digest: desc.digest.to_string(),
                    expected_size: desc.size as i64,
                    ..Default::default()
                })
                .await?;
            // A blob the namespace holds already needs no bytes again.
            let chunks = if opened.exists { 0 } else { usize::MAX };
            for (index, chunk) in data.chunks(self.client.max_body()).take(chunks).enumerate() {
                content
                    .write(&cpb::WriteRequest {
                        r#ref: reference.clone(),
                        offset: (index * self.client.max_body()) as i64,
                        data: chunk.to_vec().into(),
                    })
                    .await?;
            }
            content
                .commit(&cpb::CommitRequest {
                    r#ref: reference,
                    size: desc.size as i64,
                    digest: desc.digest.to_string(),
                    ..Default::default()
                })
                .await?;
        }
        let named = archive
            .images()
            .iter()
            .find(|image| image.name.tag.as_deref() == Some(tag))
            .with_context(|| format!("no image tagged {tag} in {}", path.display()))?;
        let image = archive.resolve(named, &Platform::host())?;
        let unpacked = self
            .snapshot()
            .unpack(&spb::UnpackRequest {
                layers: image
                    .layers
                    .iter()
                    .map(|layer| berth_proto::Descriptor {
                        media_type: layer.media_type.clone(),
                        digest: layer.digest.to_string(),
                        size: layer.size as i64,
                        ..Default::default()
                    })
                    .collect(),
                diff_ids: image.diff_ids.iter().map(|d| d.to_string()).collect(),
                lease_id: String::new(),
            })
            .await?;
        Ok((unpacked.chain_id, image.config.digest.to_string()))
    }

    /// A container record running `args` on a fresh snapshot of `chain_id`.
    pub async fn container(
        &self,
        container_id: &str,
        image: &(String, String),
        args: &[&str],
    ) -> Result<()> {
        let options = mpb::RunOptions {
            args: args.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        self.container_with(container_id, image, options).await
    }

    /// The pids controller's directory of this node's namespace, where
    /// runc makes the tasks' cgroups.
    pub fn namespace_cgroup(&self) -> PathBuf {
        PathBuf::from("/sys/fs/cgroup/pids/berth").join(&self.namespace)
    }

    /// A container record with `options` on a fresh snapshot of the image.
    pub async fn container_with(
        &self,
        container_id: &str,
        image: &(String, String),
        mut options: mpb::RunOptions,
    ) -> Result<()> {
        options.image_config_digest = image.1.clone();
        self.snapshot()
            .prepare(&spb::PrepareRequest {
                key: container_id.to_string(),
                parent: image.0.clone(),
                ..Default::default()
            })
            .await?;
        let container = mpb::Container {
            container_id: container_id.to_string(),
            image: "docker.io/library/busybox:latest".to_string(),
            snapshot_key: container_id.to_string(),
            node: self.node.clone(),
            options: Some(options),
            ..Default::default()
        };
        self.metadata()
            .create_container(&mpb::CreateContainerRequest {
                container: Some(container),
            })
            .await?;
        Ok(())
    }

    /// Creates and starts the container's task; returns its pid.
    pub async fn run(&self, container_id: &str) -> Result<u32> {
        let task = self.task();
        let created = task
            .create(&tpb::CreateRequest {
                container_id: container_id.to_string(),
                start: false,
            })
            .await?;
        let started = task
            .start(&tpb::StartRequest {
                container_id: container_id.to_string(),
            })
            .await?;
        assert_eq!(created.pid, started.pid);
        Ok(started.pid)
    }

    pub async fn state(&self, container_id: &str) -> Result<tpb::State> {
        let reply = self
            .task()
            .state(&tpb::StateRequest {
                container_id: container_id.to_string(),
                ..Default::default()
            })
            .await?;
        reply.state.context("no state")
    }

    /// Waits until the task service reports the task stopped.
    pub async fn wait_stopped(&self, container_id: &str) -> Result<tpb::State> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(state) = self.state(container_id).await {
                if state.status == "stopped" {
                    return Ok(state);
                }
            }
            if Instant::now() > deadline {
                bail!("{container_id} did not stop:\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until metadata's record of the task shows its exit.
    pub async fn wait_applied(&self, container_id: &str) -> Result<mpb::Task> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let reply = self
                .metadata()
                .get_task(&mpb::GetTaskRequest {
                    container_id: container_id.to_string(),
                })
                .await?;
            let task = reply.task.context("no task")?;
            if task.status == mpb::TaskStatus::Stopped as i32 {
                return Ok(task);
            }
            if Instant::now() > deadline {
                bail!("exit of {container_id} not applied: {task:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The task events of one container in the stream, as (topic, exit status).
    pub async fn task_events(&self, container_id: &str) -> Result<Vec<(String, u32)>> {
        let js = async_nats::jetstream::new(self.client.nats().clone());
        let stream = js.get_stream("BERTH_EVENTS").await?;
        let pending = stream.get_info().await?.state.messages;
        let consumer = stream
            .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
            .await?;
        let mut messages = consumer.messages().await?;
        let mut out = Vec::new();
        for _ in 0..pending {
            let message = tokio::time::timeout(Duration::from_secs(5), messages.next())
                .await?
                .context("stream ended")??;
            let envelope = Envelope::decode(message.payload.clone())?;
            if !envelope.topic.starts_with("tasks.") {
                continue;
            }
            let event = tpb::TaskEvent::decode(envelope.payload)?;
            if event.container_id == container_id {
                out.push((envelope.topic, event.exit_status));
            }
        }
        Ok(out)
    }

    /// The topics of one container's task events, in stream order.
    pub async fn task_topics(&self, container_id: &str) -> Result<Vec<String>> {
        Ok(self
            .task_events(container_id)
            .await?
            .into_iter()
            .map(|(topic, _)| topic)
            .collect())
    }

    pub async fn delete(&self, container_id: &str) -> Result<tpb::DeleteReply> {
        Ok(self
            .task()
            .delete(&tpb::DeleteRequest {
                container_id: container_id.to_string(),
                ..Default::default()
            })
            .await?)
    }

    pub fn mounts(&self) -> Vec<String> {
        let prefix = self.dir.path().to_string_lossy().into_owned();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split(' ').nth(4))
            .filter(|point| point.starts_with(&prefix))
            .map(str::to_string)
            .collect()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_task_service();
        self.shutdown.cancel();
        // Shims of a failed test: kill them, then unmount what is left.
        let state = self.state_dir().to_string_lossy().into_owned();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&state) {
                if let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() {
                    // SAFETY: kill takes any pid; these are this test's shims.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        for point in self.mounts() {
            let _ = Command::new("umount").args(["-l", &point]).status();
        }
    }
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}
