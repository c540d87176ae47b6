//! The task service's side of a shim: spawning `berth-shim`, and one async
//! method per socket request (see [`crate::shim::protocol`]).
//!
//! Each call opens its own connection, so a `wait` blocked on one connection
//! never holds up `state` or `kill` on another. Every call except `wait` has
//! a timeout.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::process::Command;

use crate::shim::protocol::{
    read_exit_file, ExitRecord, Readiness, Reply, Request, TaskState, MAX_LINE, SOCKET_FILE,
};

/// Default time a request may take, `wait` excepted.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Time `spawn_shim` gives the shim to detach and run `runc create`.
pub const SPAWN_TIMEOUT: Duration = Duration::from_secs(60);

/// Errors of talking to a shim.
#[derive(Debug, Error)]
pub enum ShimClientError {
    /// The shim binary could not be run.
    #[error("failed to run shim {path:?}")]
    Spawn {
        /// The shim binary.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The shim did not come up: runc create failed or the shim could not
    /// start; `message` is the shim's (runc's words for a runc failure).
    #[error("shim for container {container_id:?} did not start: {message}")]
    Start {
        /// The container.
        container_id: String,
        /// Why.
        message: String,
    },
    /// No shim answers on the socket.
    #[error("failed to connect to shim socket {path:?}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The connection broke mid-request.
    #[error("shim connection failed during {op}")]
    Io {
        /// The request.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The shim did not answer in time.
    #[error("shim did not answer {op} within {timeout:?}")]
    Timeout {
        /// The request.
        op: &'static str,
        /// The limit that passed.
        timeout: Duration,
    },
    /// The shim closed the connection without a reply.
    #[error("shim closed the connection during {op}")]
    Closed {
        /// The request.
        op: &'static str,
    },
    /// The reply was not understood.
    #[error("malformed shim reply to {op}")]
    Protocol {
        /// The request.
        op: &'static str,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// The shim refused or failed the request; `message` is its reason
    /// (runc's words for a runc failure).
    #[error("shim refused {op}: {message}")]
    Shim {
        /// The request.
        op: &'static str,
        /// Why.
        message: String,
    },
    /// `exit.json` could not be read.
    #[error("failed to read exit record in {path:?}")]
    ReadExit {
        /// The state directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// A handle on one container's shim, addressed by its socket.
#[derive(Clone, Debug)]
pub struct ShimClient {
    socket: PathBuf,
    timeout: Duration,
}

/// Starts `shim_bin` for `container_id` and returns once it serves and
/// `runc create` has finished.
///
/// The shim detaches from the caller, so it survives a restart of the task
/// service. Its state goes to `state_dir` (created if missing), runc's state
/// to `<state_dir>/runc`. `runc` defaults to `runc` in PATH. Errors:
/// [`ShimClientError::Start`] with runc's message when create fails (the shim
/// is then gone), [`ShimClientError::Spawn`], [`ShimClientError::Timeout`].
pub async fn spawn_shim(
    shim_bin: &Path,
    container_id: &str,
    bundle: &Path,
    state_dir: &Path,
    runc: Option<&Path>,
) -> Result<ShimClient, ShimClientError> {
    let socket = state_dir.join(SOCKET_FILE);
    spawn_shim_at(
        shim_bin,
        container_id,
        bundle,
        state_dir,
        &socket,
        runc,
        Spawn::default(),
    )
    .await
}

/// How a shim starts its init.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Spawn {
    /// Keep the init's stdin open for [`ShimClient::stdin`].
    pub stdin: bool,
    /// Start the init as soon as it is made: `runc run --detach`, one runc
    /// call instead of `runc create` now and `runc start` later.
    pub start: bool,
}

/// As [`spawn_shim`], with the socket at `socket` instead of the state
/// directory (a unix socket path holds at most 107 bytes, and a state
/// directory named after a long container id can be longer), and with the
/// init's stdin kept open for [`ShimClient::stdin`] when `how.stdin`, and
/// the init started at once when `how.start`.
pub async fn spawn_shim_at(
    shim_bin: &Path,
    container_id: &str,
    bundle: &Path,
    state_dir: &Path,
    socket: &Path,
    runc: Option<&Path>,
    how: Spawn,
) -> Result<ShimClient, ShimClientError> {
    let mut cmd = Command::new(shim_bin);
    cmd.arg("--id")
        .arg(container_id)
        .arg("--bundle")
        .arg(bundle)
        .arg("--state")
        .arg(state_dir)
        .arg("--socket")
        .arg(socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    if let Some(runc) = runc {
        cmd.arg("--runc").arg(runc);
    }
    if how.stdin {
        cmd.arg("--stdin");
    }
    if how.start {
        cmd.arg("--start");
    }
    let spawn_err = |source| ShimClientError::Spawn {
        path: shim_bin.to_path_buf(),
        source,
    };
    let child = cmd.spawn().map_err(spawn_err)?;

    // The invoked process exits once the detached shim reported, printing
    // the report as one line.
    let output = tokio::time::timeout(SPAWN_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| ShimClientError::Timeout {
            op: "spawn",
            timeout: SPAWN_TIMEOUT,
        })?
        .map_err(spawn_err)?;
    let line = String::from_utf8_lossy(&output.stdout);
    let readiness = serde_json::from_str::<Readiness>(line.trim()).map_err(|source| {
        ShimClientError::Protocol {
            op: "spawn",
            source,
        }
    })?;
    match readiness {
        Readiness::Ok { .. } => Ok(ShimClient::at_socket(socket.to_path_buf())),
        Readiness::Failed { message } => Err(ShimClientError::Start {
            container_id: container_id.to_string(),
            message,
        }),
    }
}

/// Reads the exit the shim recorded in `<state_dir>/exit.json`, without the
/// shim: for recovery when the shim is gone. `Ok(None)` when there is none.
pub fn read_exit(state_dir: &Path) -> Result<Option<ExitRecord>, ShimClientError> {
    read_exit_file(state_dir).map_err(|source| ShimClientError::ReadExit {
        path: state_dir.to_path_buf(),
        source,
    })
}

impl ShimClient {
    /// A client for the shim serving `socket`, without connecting.
    pub fn at_socket(socket: PathBuf) -> ShimClient {
        ShimClient {
            socket,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// Connects to the shim of `state_dir` (re-adoption after a restart).
    ///
    /// Errors with [`ShimClientError::Connect`] when no shim answers there.
    pub async fn connect(state_dir: &Path) -> Result<ShimClient, ShimClientError> {
        let client = ShimClient::at_socket(state_dir.join(SOCKET_FILE));
        client.state().await?;
        Ok(client)
    }

    /// Sets the timeout of every call but `wait` (default [`DEFAULT_TIMEOUT`]).
    pub fn with_timeout(mut self, timeout: Duration) -> ShimClient {
        self.timeout = timeout;
        self
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Starts the created container (`runc start`) and returns the init pid.
    ///
    /// A start refused by runc (say, a missing executable) is
    /// [`ShimClientError::Shim`] with runc's message.
    pub async fn start(&self) -> Result<u32, ShimClientError> {
        match self.call("start", &Request::Start, true).await? {
            Reply::Started { pid } => Ok(pid),
            other => Err(unexpected("start", other)),
        }
    }

    /// The task's status, init pid and exit, if any.
    pub async fn state(&self) -> Result<TaskState, ShimClientError> {
        match self.call("state", &Request::State, true).await? {
            Reply::State(state) => Ok(state),
            other => Err(unexpected("state", other)),
        }
    }

    /// Sends `signal` to the init, or to every process of the container when
    /// `all` (`runc kill`).
    pub async fn kill(&self, signal: i32, all: bool) -> Result<(), ShimClientError> {
        match self
            .call("kill", &Request::Kill { signal, all }, true)
            .await?
        {
            Reply::Killed => Ok(()),
            other => Err(unexpected("kill", other)),
        }
    }

    /// Sends `signal` to one exec process.
    pub async fn kill_exec(&self, exec_id: &str, signal: i32) -> Result<(), ShimClientError> {
        let request = Request::KillExec {
            exec_id: exec_id.to_string(),
            signal,
        };
        match self.call("kill_exec", &request, true).await? {
            Reply::Killed => Ok(()),
            other => Err(unexpected("kill_exec", other)),
        }
    }

    /// Waits, without a timeout, until the init exits; returns its exit.
    pub async fn wait(&self) -> Result<ExitRecord, ShimClientError> {
        match self.call("wait", &Request::Wait, false).await? {
            Reply::Exited(exit) => Ok(exit),
            other => Err(unexpected("wait", other)),
        }
    }

    /// Deletes the container (`runc delete --force`, which kills a live
    /// init); the shim exits after replying. Returns the init's exit, if it
    /// exited. `exit.json` stays in the state directory unless acknowledged.
    pub async fn delete(&self) -> Result<Option<ExitRecord>, ShimClientError> {
        match self.call("delete", &Request::Delete, true).await? {
            Reply::Deleted { exit } => Ok(exit),
            other => Err(unexpected("delete", other)),
        }
    }

    /// Tells the shim metadata has applied the exit; until then the shim
    /// keeps it on disk across a delete. Idempotent.
    pub async fn ack_exit(&self) -> Result<(), ShimClientError> {
        match self.call("ack_exit", &Request::AckExit, true).await? {
            Reply::Acked => Ok(()),
            other => Err(unexpected("ack_exit", other)),
        }
    }

    /// Freezes every process of the container (`runc pause`).
    pub async fn pause(&self) -> Result<(), ShimClientError> {
        self.done("pause", &Request::Pause).await
    }

    /// Thaws the container (`runc resume`).
    pub async fn resume(&self) -> Result<(), ShimClientError> {
        self.done("resume", &Request::Resume).await
    }

    /// Changes the container's resource limits (`runc update`); `resources`
    /// is the runtime spec's `linux.resources` object.
    pub async fn update(&self, resources: serde_json::Value) -> Result<(), ShimClientError> {
        self.done("update", &Request::Update { resources }).await
    }

    /// The container's processes, by host pid (`runc ps`).
    pub async fn ps(&self) -> Result<Vec<u32>, ShimClientError> {
        match self.call("ps", &Request::Ps, true).await? {
            Reply::Pids { pids } => Ok(pids),
            other => Err(unexpected("ps", other)),
        }
    }

    /// Runs `process` (the runtime spec's `process` object) in the container
    /// as exec process `exec_id`; returns its host pid.
    pub async fn exec(
        &self,
        exec_id: &str,
        process: serde_json::Value,
        stdin: bool,
    ) -> Result<u32, ShimClientError> {
        let request = Request::Exec {
            exec_id: exec_id.to_string(),
            process,
            stdin,
        };
        match self.call("exec", &request, true).await? {
            Reply::Started { pid } => Ok(pid),
            other => Err(unexpected("exec", other)),
        }
    }

    /// An exec process's pid and exit, if it exited.
    pub async fn exec_state(
        &self,
        exec_id: &str,
    ) -> Result<(u32, Option<ExitRecord>), ShimClientError> {
        let request = Request::ExecState {
            exec_id: exec_id.to_string(),
        };
        match self.call("exec_state", &request, true).await? {
            Reply::ExecState { pid, exit } => Ok((pid, exit)),
            other => Err(unexpected("exec_state", other)),
        }
    }

    /// Waits, without a timeout, until an exec process exits.
    pub async fn wait_exec(&self, exec_id: &str) -> Result<ExitRecord, ShimClientError> {
        let request = Request::WaitExec {
            exec_id: exec_id.to_string(),
        };
        match self.call("wait_exec", &request, false).await? {
            Reply::Exited(exit) => Ok(exit),
            other => Err(unexpected("wait_exec", other)),
        }
    }

    /// Forgets an exited exec process and removes its files.
    pub async fn delete_exec(&self, exec_id: &str) -> Result<(), ShimClientError> {
        let request = Request::DeleteExec {
            exec_id: exec_id.to_string(),
        };
        self.done("delete_exec", &request).await
    }

    /// Writes to the stdin (or terminal) of the init, or of an exec process.
    pub async fn stdin(&self, exec_id: Option<&str>, data: Vec<u8>) -> Result<(), ShimClientError> {
        let exec_id = exec_id.map(str::to_string);
        self.done("stdin", &Request::Stdin { data, exec_id }).await
    }

    /// Ends the input (EOF) of the init, or of an exec process.
    pub async fn close_stdin(&self, exec_id: Option<&str>) -> Result<(), ShimClientError> {
        let exec_id = exec_id.map(str::to_string);
        self.done("close_stdin", &Request::CloseStdin { exec_id })
            .await
    }

    /// Sets the size of the init's terminal, or an exec process's.
    pub async fn resize(
        &self,
        exec_id: Option<&str>,
        cols: u16,
        rows: u16,
    ) -> Result<(), ShimClientError> {
        let exec_id = exec_id.map(str::to_string);
        let request = Request::Resize {
            cols,
            rows,
            exec_id,
        };
        self.done("resize", &request).await
    }

    async fn done(&self, op: &'static str, request: &Request) -> Result<(), ShimClientError> {
        match self.call(op, request, true).await? {
            Reply::Done => Ok(()),
            other => Err(unexpected(op, other)),
        }
    }

    async fn call(
        &self,
        op: &'static str,
        request: &Request,
        timed: bool,
    ) -> Result<Reply, ShimClientError> {
        let exchange = self.exchange(op, request);
        if !timed {
            return exchange.await;
        }
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ShimClientError::Timeout {
                op,
                timeout: self.timeout,
            })?
    }

    /// One request line out, one reply line back, on a fresh connection.
    async fn exchange(
        &self,
        op: &'static str,
        request: &Request,
    ) -> Result<Reply, ShimClientError> {
        let io_err = |source| ShimClientError::Io { op, source };
        let mut stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ShimClientError::Connect {
                    path: self.socket.clone(),
                    source,
                })?;
        let mut line = serde_json::to_vec(request)
            .map_err(|source| ShimClientError::Protocol { op, source })?;
        line.push(b'\n');
        stream.write_all(&line).await.map_err(io_err)?;

        let mut reply = String::new();
        let mut reader = BufReader::new(stream).take(MAX_LINE as u64);
        let read = reader.read_line(&mut reply).await.map_err(io_err)?;
        if read == 0 {
            return Err(ShimClientError::Closed { op });
        }
        match serde_json::from_str(&reply) {
            Ok(Reply::Error { message }) => Err(ShimClientError::Shim { op, message }),
            Ok(reply) => Ok(reply),
            Err(source) => Err(ShimClientError::Protocol { op, source }),
        }
    }
}

fn unexpected(op: &'static str, reply: Reply) -> ShimClientError {
    ShimClientError::Shim {
        op,
        message: format!("unexpected reply {reply:?}"),
    }
}
