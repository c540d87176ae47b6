//! Typed clients: one method per op of each service, each a request with the
//! client's timeout. Mutating ops take a fresh request id per call; a caller
//! that wants to retry with the same id uses [`Client::call_mut`] directly.

use berth_proto::{content, gc, metadata, snapshot, task};

use crate::client::{new_request_id, Client};
use crate::error::Result;
use crate::subject;

macro_rules! read_op {
    ($(#[$doc:meta])* $name:ident, $op:literal, $req:ty, $rep:ty) => {
        $(#[$doc])*
        pub async fn $name(&self, request: &$req) -> Result<$rep> {
            let subject = self.subject($op)?;
            self.client.call(&subject, request).await
        }
    };
}

macro_rules! mut_op {
    ($(#[$doc:meta])* $name:ident, $op:literal, $req:ty, $rep:ty) => {
        $(#[$doc])*
        pub async fn $name(&self, request: &$req) -> Result<$rep> {
            let subject = self.subject($op)?;
            self.client.call_mut(&subject, request, &new_request_id()).await
        }
    };
}

/// The longest a `pull` request waits for its pull to end before it
/// answers with the progress so far.
pub const PULL_WAIT: std::time::Duration = std::time::Duration::from_secs(20);

/// What a `pull` call waits beyond the request's own wait: the service's
/// answer and the way back.
pub const PULL_REPLY_ROOM: std::time::Duration = std::time::Duration::from_secs(10);

/// The content service of a namespace.
#[derive(Clone, Debug)]
pub struct Content {
    /// The connection.
    pub client: Client,
    /// The namespace.
    pub namespace: String,
}

impl Content {
    fn subject(&self, op: &str) -> Result<String> {
        subject::op(&self.namespace, "content", op)
    }
    read_op!(/// `info`.
        info, "info", content::InfoRequest, content::InfoReply);
    read_op!(/// `list`.
        list, "list", content::ListRequest, content::ListReply);
    read_op!(/// `read`.
        read, "read", content::ReadRequest, content::ReadReply);
    read_op!(/// `status`.
        status, "status", content::StatusRequest, content::StatusReply);
    read_op!(/// `ingests`.
        ingests, "ingests", content::IngestsRequest, content::IngestsReply);
    mut_op!(/// `update`.
        update, "update", content::UpdateRequest, content::UpdateReply);
    mut_op!(/// `open`.
        open, "open", content::OpenRequest, content::OpenReply);
    mut_op!(/// `write`.
        write, "write", content::WriteRequest, content::WriteReply);
    mut_op!(/// `commit`.
        commit, "commit", content::CommitRequest, content::CommitReply);
    mut_op!(/// `abort`.
        abort, "abort", content::AbortRequest, content::AbortReply);
    mut_op!(/// `delete`.
        delete, "delete", content::DeleteRequest, content::DeleteReply);

    /// `pull`: starts the pull `request.pull_id` names, or joins it, and
    /// answers when it ends or after `request.wait_ms` (20 s when 0) with
    /// its status. The call waits that long plus [`PULL_REPLY_ROOM`],
    /// and at least the client's timeout. Asking again with the same
    /// request is how a caller waits for a long pull; a failed pull
    /// answers with its error.
    pub async fn pull(&self, request: &content::PullRequest) -> Result<content::PullReply> {
        let subject = self.subject("pull")?;
        let wait = match request.wait_ms {
            0 => PULL_WAIT,
            ms => std::time::Duration::from_millis(ms.into()).min(PULL_WAIT),
        };
        let client = self
            .client
            .with_timeout(self.client.timeout().max(wait + PULL_REPLY_ROOM));
        client.call(&subject, request).await
    }

    /// The subject the progress of pull `pull_id` is published on (core
    /// NATS, one [`content::PullStatus`] per message):
    /// `berth.v1.<namespace>.content.pull.progress.<pull_id>`.
    pub fn pull_progress_subject(&self, pull_id: &str) -> Result<String> {
        crate::subject::check_token("pull id", pull_id)?;
        self.subject(&format!("pull.progress.{pull_id}"))
    }

    /// Writes a blob through the ingest `open.ref` and commits it: opens
    /// (or resumes) the ingest, writes what `source` holds from the offset
    /// the store reports ([`Content::upload`]), then commits against
    /// `open`'s expected digest and size with `labels`. When the namespace
    /// holds the blob already nothing is written and the commit only stamps
    /// it as used and attaches it to the lease.
    ///
    /// Errors are the content service's (`FailedPrecondition` when another
    /// writer holds the ref, `InvalidArgument` when the bytes do not match),
    /// and `Internal` when `source` fails.
    pub async fn push<R: std::io::Read + std::io::Seek + Send>(
        &self,
        open: &content::OpenRequest,
        source: &mut R,
        labels: std::collections::HashMap<String, String>,
    ) -> Result<content::CommitReply> {
        let opened = self.open(open).await?;
        if !opened.exists {
            self.upload(&open.r#ref, opened.offset as u64, source)
                .await?;
        }
        self.commit(&content::CommitRequest {
            r#ref: open.r#ref.clone(),
            size: open.expected_size,
            digest: open.expected_digest.clone(),
            labels,
            lease_id: open.lease_id.clone(),
        })
        .await
    }

    /// Writes what `source` holds from `offset` to its end into the
    /// ingest `reference`, in chunks of [`Client::max_body`] with
    /// [`crate::chunk::IN_FLIGHT`] of them in flight, and returns the
    /// ingest's length after the last write.
    ///
    /// # Limitations
    /// `source` is read on the caller's task: a source that blocks for
    /// long (a slow disk or pipe) holds up that task's worker thread.
    pub async fn upload<R: std::io::Read + std::io::Seek + Send>(
        &self,
        reference: &str,
        offset: u64,
        source: &mut R,
    ) -> Result<u64> {
        use futures::StreamExt;
        let failed = |err: std::io::Error| {
            crate::Error::internal(format!("read the bytes of ingest {reference:?}: {err}"))
        };
        source
            .seek(std::io::SeekFrom::Start(offset))
            .map_err(failed)?;

        // Chunks are read as the writes before them are sent.
        let chunk = self.client.max_body();
        let chunks = futures::stream::unfold(Some((source, offset)), move |state| async move {
            let (source, at) = state?;
            let mut buf = vec![0; chunk];
            match read_full(source, &mut buf) {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok((at, buf)), Some((source, at + n as u64))))
                }
                Err(err) => Some((Err(failed(err)), None)),
            }
        });
        let writes = chunks
            .map(|chunk| async move {
                let (at, data) = chunk?;
                let request = content::WriteRequest {
                    r#ref: reference.to_string(),
                    offset: at as i64,
                    data: data.into(),
                };
                Ok::<_, crate::Error>(self.write(&request).await?.offset as u64)
            })
            .buffered(crate::chunk::IN_FLIGHT);
        futures::pin_mut!(writes);
        let mut end = offset;
        while let Some(written) = writes.next().await {
            end = end.max(written?);
        }
        Ok(end)
    }

    /// Reads a whole blob by pulling chunks, a few in flight.
    pub async fn read_all(&self, digest: &str) -> Result<Vec<u8>> {
        use futures::StreamExt;
        let info = self
            .info(&content::InfoRequest {
                digest: digest.to_string(),
            })
            .await?;
        let size = info.info.map(|info| info.size).unwrap_or_default().max(0) as u64;
        let mut out = Vec::with_capacity(size as usize);
        let chunks = crate::chunk::pull(
            size,
            self.client.max_body(),
            crate::chunk::IN_FLIGHT,
            |offset, length| {
                let request = content::ReadRequest {
                    digest: digest.to_string(),
                    offset: offset as i64,
                    length: length as i64,
                };
                async move { Ok(self.read(&request).await?.data) }
            },
        );
        futures::pin_mut!(chunks);
        while let Some(chunk) = chunks.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }
}

/// Reads until `buf` is full or the source ends; returns how many bytes.
fn read_full(source: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match source.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err),
        }
    }
    Ok(filled)
}

/// The metadata service of a namespace.
#[derive(Clone, Debug)]
pub struct Metadata {
    /// The connection.
    pub client: Client,
    /// The namespace.
    pub namespace: String,
}

impl Metadata {
    fn subject(&self, op: &str) -> Result<String> {
        subject::op(&self.namespace, "metadata", op)
    }
    mut_op!(/// `namespaces.create`: makes the client's namespace.
        create_namespace, "namespaces.create", metadata::CreateNamespaceRequest, metadata::NamespaceReply);
    mut_op!(/// `namespaces.update`.
        update_namespace, "namespaces.update", metadata::UpdateNamespaceRequest, metadata::NamespaceReply);
    read_op!(/// `namespaces.get`.
        get_namespace, "namespaces.get", metadata::GetNamespaceRequest, metadata::NamespaceReply);
    read_op!(/// `namespaces.list`: every namespace of the cluster.
        list_namespaces, "namespaces.list", metadata::ListNamespacesRequest, metadata::ListNamespacesReply);
    mut_op!(/// `namespaces.delete`.
        delete_namespace, "namespaces.delete", metadata::DeleteNamespaceRequest, metadata::DeleteReply);
    mut_op!(/// `images.create`.
        create_image, "images.create", metadata::CreateImageRequest, metadata::ImageReply);
    mut_op!(/// `images.update`.
        update_image, "images.update", metadata::UpdateImageRequest, metadata::ImageReply);
    read_op!(/// `images.get`.
        get_image, "images.get", metadata::GetImageRequest, metadata::ImageReply);
    read_op!(/// `images.list`.
        list_images, "images.list", metadata::ListImagesRequest, metadata::ListImagesReply);
    mut_op!(/// `images.delete`.
        delete_image, "images.delete", metadata::DeleteImageRequest, metadata::DeleteReply);
    mut_op!(/// `containers.create`.
        create_container, "containers.create", metadata::CreateContainerRequest, metadata::ContainerReply);
    mut_op!(/// `containers.update`.
        update_container, "containers.update", metadata::UpdateContainerRequest, metadata::ContainerReply);
    read_op!(/// `containers.get`.
        get_container, "containers.get", metadata::GetContainerRequest, metadata::ContainerReply);
    read_op!(/// `containers.list`.
        list_containers, "containers.list", metadata::ListContainersRequest, metadata::ListContainersReply);
    mut_op!(/// `containers.delete`.
        delete_container, "containers.delete", metadata::DeleteContainerRequest, metadata::DeleteReply);
    mut_op!(/// `tasks.reserve`.
        reserve_task, "tasks.reserve", metadata::ReserveTaskRequest, metadata::TaskReply);
    mut_op!(/// `tasks.release`.
        release_task, "tasks.release", metadata::ReleaseTaskRequest, metadata::DeleteReply);
    read_op!(/// `tasks.get`.
        get_task, "tasks.get", metadata::GetTaskRequest, metadata::TaskReply);
    read_op!(/// `tasks.list`.
        list_tasks, "tasks.list", metadata::ListTasksRequest, metadata::ListTasksReply);
    mut_op!(/// `leases.create`.
        create_lease, "leases.create", metadata::CreateLeaseRequest, metadata::LeaseReply);
    mut_op!(/// `leases.add`.
        add_lease_resources, "leases.add", metadata::AddLeaseResourcesRequest, metadata::LeaseReply);
    read_op!(/// `leases.get`.
        get_lease, "leases.get", metadata::GetLeaseRequest, metadata::LeaseReply);
    mut_op!(/// `leases.update`.
        update_lease, "leases.update", metadata::UpdateLeaseRequest, metadata::LeaseReply);
    mut_op!(/// `leases.remove`: detaches resources.
        remove_lease_resources, "leases.remove", metadata::RemoveLeaseResourcesRequest, metadata::LeaseReply);
    read_op!(/// `leases.query`: the leases whose labels match.
        query_leases, "leases.query", metadata::QueryLeasesRequest, metadata::ListLeasesReply);
    mut_op!(/// `leases.delete`.
        delete_lease, "leases.delete", metadata::DeleteLeaseRequest, metadata::DeleteReply);
    read_op!(/// `leases.list`.
        list_leases, "leases.list", metadata::ListLeasesRequest, metadata::ListLeasesReply);
    read_op!(/// `gc.mark`.
        mark, "gc.mark", metadata::MarkRequest, metadata::MarkReply);
    read_op!(/// `nodes.list`: every node ever heard from, ready or lost.
        list_nodes, "nodes.list", metadata::ListNodesRequest, metadata::ListNodesReply);
    read_op!(/// `nodes.get`: one node.
        get_node, "nodes.get", metadata::GetNodeRequest, metadata::NodeReply);
    read_op!(/// `tombstones.list`: what a lost node must delete when it returns.
        list_tombstones, "tombstones.list", metadata::ListTombstonesRequest, metadata::ListTombstonesReply);
    mut_op!(/// `tombstones.delete`: the node applied a tombstone.
        delete_tombstone, "tombstones.delete", metadata::DeleteTombstoneRequest, metadata::DeleteReply);
}

/// The snapshot service of a namespace on one node.
#[derive(Clone, Debug)]
pub struct Snapshot {
    /// The connection.
    pub client: Client,
    /// The namespace.
    pub namespace: String,
    /// The node.
    pub node: String,
}

impl Snapshot {
    fn subject(&self, op: &str) -> Result<String> {
        subject::node_op(&self.namespace, "snapshot", &self.node, op)
    }
    mut_op!(/// `prepare`.
        prepare, "prepare", snapshot::PrepareRequest, snapshot::PrepareReply);
    mut_op!(/// `view`.
        view, "view", snapshot::ViewRequest, snapshot::PrepareReply);
    mut_op!(/// `commit`.
        commit, "commit", snapshot::CommitRequest, snapshot::CommitReply);
    read_op!(/// `mounts`.
        mounts, "mounts", snapshot::MountsRequest, snapshot::MountsReply);
    read_op!(/// `stat`.
        stat, "stat", snapshot::StatRequest, snapshot::StatReply);
    read_op!(/// `list`.
        list, "list", snapshot::ListRequest, snapshot::ListReply);
    read_op!(/// `usage`.
        usage, "usage", snapshot::UsageRequest, snapshot::UsageReply);
    mut_op!(/// `remove`.
        remove, "remove", snapshot::RemoveRequest, snapshot::RemoveReply);
    mut_op!(/// `unpack`.
        unpack, "unpack", snapshot::UnpackRequest, snapshot::UnpackReply);
    mut_op!(/// `prune`.
        prune, "prune", snapshot::PruneRequest, snapshot::PruneReply);
    mut_op!(/// `update`.
        update, "update", snapshot::UpdateRequest, snapshot::UpdateReply);
}

/// The task service of a namespace on one node.
#[derive(Clone, Debug)]
pub struct Task {
    /// The connection.
    pub client: Client,
    /// The namespace.
    pub namespace: String,
    /// The node.
    pub node: String,
}

impl Task {
    fn subject(&self, op: &str) -> Result<String> {
        subject::node_op(&self.namespace, "task", &self.node, op)
    }
    mut_op!(/// `create`.
        create, "create", task::CreateRequest, task::CreateReply);
    mut_op!(/// `start`.
        start, "start", task::StartRequest, task::StartReply);
    mut_op!(/// `kill`.
        kill, "kill", task::KillRequest, task::KillReply);
    mut_op!(/// `delete`.
        delete, "delete", task::DeleteRequest, task::DeleteReply);
    read_op!(/// `state`.
        state, "state", task::StateRequest, task::StateReply);
    read_op!(/// `list`.
        list, "list", task::ListRequest, task::ListReply);
    read_op!(/// `logs`.
        logs, "logs", task::LogsRequest, task::LogsReply);
    mut_op!(/// `stop`.
        stop, "stop", task::StopRequest, task::StopReply);
    mut_op!(/// `pause`.
        pause, "pause", task::PauseRequest, task::PauseReply);
    mut_op!(/// `resume`.
        resume, "resume", task::ResumeRequest, task::ResumeReply);
    mut_op!(/// `exec`.
        exec, "exec", task::ExecRequest, task::ExecReply);
    read_op!(/// `ps`.
        ps, "ps", task::PsRequest, task::PsReply);
    read_op!(/// `metrics`.
        metrics, "metrics", task::MetricsRequest, task::MetricsReply);
    mut_op!(/// `update`.
        update, "update", task::UpdateRequest, task::UpdateReply);
    mut_op!(/// `stdin`.
        stdin, "stdin", task::StdinRequest, task::StdinReply);
    read_op!(/// `resize`.
        resize, "resize", task::ResizeRequest, task::ResizeReply);
}

/// The gc service.
#[derive(Clone, Debug)]
pub struct Gc {
    /// The connection.
    pub client: Client,
    /// The namespace the request is sent in (a run covers all).
    pub namespace: String,
}

impl Gc {
    fn subject(&self, op: &str) -> Result<String> {
        subject::op(&self.namespace, "gc", op)
    }
    mut_op!(/// `run`.
        run, "run", gc::RunRequest, gc::GcDone);
    read_op!(/// `explain`: why a blob or snapshot of the namespace stays, or that it goes.
        explain, "explain", gc::ExplainRequest, gc::ExplainReply);
}
