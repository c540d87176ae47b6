//! The shim's wire and disk formats, shared by the shim and its client.
//!
//! The socket speaks one JSON object per line: a [`Request`] from the client,
//! one [`Reply`] from the shim. A connection may carry several requests in
//! turn; the client opens one per call so that a `wait` never holds up others.
//!
//! Files in the shim's state directory:
//!
//! ```text
//! <state>/shim.sock    the socket (unless --socket names another path)
//! <state>/shim.pid     ShimPid: pid and start time, for re-adoption
//! <state>/init.pid     the init pid, written by runc
//! <state>/exit.json    ExitRecord, written atomically when the init exits
//! <state>/stdout.log   the container's stdout (appended)
//! <state>/stderr.log   the container's stderr (appended)
//! <state>/runc.log     runc's own log (JSON lines), read for error messages
//! <state>/shim.log     the shim's own diagnostics
//! <state>/runc/        runc's state root (--root)
//! <state>/exec/<exec id>/{process.json, pid, stdout.log, stderr.log, exit.json}
//!                      one exec process: its spec, pid, output and exit
//! ```

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Socket file name inside the state directory.
pub const SOCKET_FILE: &str = "shim.sock";
/// Shim pid file name inside the state directory.
pub const SHIM_PID_FILE: &str = "shim.pid";
/// Init pid file name inside the state directory (written by runc).
pub const INIT_PID_FILE: &str = "init.pid";
/// Exit record file name inside the state directory.
pub const EXIT_FILE: &str = "exit.json";
/// Container stdout log file name inside the state directory.
pub const STDOUT_FILE: &str = "stdout.log";
/// Container stderr log file name inside the state directory.
pub const STDERR_FILE: &str = "stderr.log";
/// runc's log file name inside the state directory.
pub const RUNC_LOG_FILE: &str = "runc.log";
/// runc's state root directory name inside the state directory.
pub const RUNC_ROOT_DIR: &str = "runc";
/// Directory of exec processes inside the state directory.
pub const EXEC_DIR: &str = "exec";
/// Longest request line the shim reads, in bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// Checks an exec id: `[A-Za-z0-9_.-]{1,64}`, not starting with `.`, so it
/// names one directory.
pub fn check_exec_id(exec_id: &str) -> Result<(), String> {
    let ok = |c: char| c.is_ascii_alphanumeric() || "_.-".contains(c);
    if exec_id.is_empty()
        || exec_id.len() > 64
        || exec_id.starts_with('.')
        || !exec_id.chars().all(ok)
    {
        return Err(format!(
            "invalid exec id {exec_id:?}: use 1 to 64 of A-Za-z0-9_.-"
        ));
    }
    Ok(())
}

/// One request to the shim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `runc start`; replies [`Reply::Started`].
    Start,
    /// Replies [`Reply::State`].
    State,
    /// `runc kill [--all] ID SIGNAL`; replies [`Reply::Killed`].
    Kill {
        /// Signal number.
        signal: i32,
        /// Signal every process of the container, not only the init.
        #[serde(default)]
        all: bool,
    },
    /// Sends `signal` to one exec process (its pid, which the shim
    /// reaps, so it cannot have been reused); replies [`Reply::Killed`].
    KillExec {
        /// The exec process.
        exec_id: String,
        /// Signal number.
        signal: i32,
    },
    /// Blocks until the init exits; replies [`Reply::Exited`].
    Wait,
    /// `runc delete --force`; replies [`Reply::Deleted`], then the shim exits.
    Delete,
    /// The exit has been applied by metadata; replies [`Reply::Acked`].
    AckExit,
    /// `runc pause`; replies [`Reply::Done`].
    Pause,
    /// `runc resume`; replies [`Reply::Done`].
    Resume,
    /// `runc ps`; replies [`Reply::Pids`].
    Ps,
    /// `runc update --resources FILE` with these OCI `LinuxResources`;
    /// replies [`Reply::Done`].
    Update {
        /// The resources, as the runtime spec's `linux.resources` object.
        resources: serde_json::Value,
    },
    /// `runc exec --detach` of this OCI `process` object; replies
    /// [`Reply::Started`] with the exec process's pid. With `terminal` in
    /// the process it gets a terminal; with `stdin` an open stdin.
    Exec {
        /// The exec process's id, unique within the task.
        exec_id: String,
        /// The process, as the runtime spec's `process` object.
        process: serde_json::Value,
        /// Keep the process's stdin open for [`Request::Stdin`].
        #[serde(default)]
        stdin: bool,
    },
    /// Replies [`Reply::ExecState`].
    ExecState {
        /// The exec process.
        exec_id: String,
    },
    /// Blocks until the exec process exits; replies [`Reply::Exited`].
    WaitExec {
        /// The exec process.
        exec_id: String,
    },
    /// Forgets an exited exec process and removes its files; replies
    /// [`Reply::Done`].
    DeleteExec {
        /// The exec process.
        exec_id: String,
    },
    /// Writes to the init's stdin (its terminal, with one); replies
    /// [`Reply::Done`]. Refused when the task has no open stdin.
    Stdin {
        /// The bytes.
        data: Vec<u8>,
        /// An exec process's stdin instead of the init's.
        #[serde(default)]
        exec_id: Option<String>,
    },
    /// Closes the init's (or an exec's) stdin: end of input; replies
    /// [`Reply::Done`].
    CloseStdin {
        /// An exec process instead of the init.
        #[serde(default)]
        exec_id: Option<String>,
    },
    /// Sets the terminal's size; replies [`Reply::Done`].
    Resize {
        /// Columns.
        cols: u16,
        /// Rows.
        rows: u16,
        /// An exec process's terminal instead of the init's.
        #[serde(default)]
        exec_id: Option<String>,
    },
}

/// One reply from the shim.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    /// The init runs the container's process.
    Started {
        /// Host pid of the init.
        pid: u32,
    },
    /// The task's state.
    State(TaskState),
    /// The signal was delivered.
    Killed,
    /// The init exited.
    Exited(ExitRecord),
    /// runc's state is gone; the shim exits after this reply.
    Deleted {
        /// The init's exit, when it exited.
        exit: Option<ExitRecord>,
    },
    /// The exit is marked as applied.
    Acked,
    /// The request was carried out.
    Done,
    /// The processes of the container, by host pid.
    Pids {
        /// Host pids.
        pids: Vec<u32>,
    },
    /// An exec process's state.
    ExecState {
        /// Its host pid.
        pid: u32,
        /// Its exit, once it exited.
        exit: Option<ExitRecord>,
    },
    /// The request failed; `message` says why (runc's own words for a runc
    /// failure).
    Error {
        /// Lowercase description naming the container.
        message: String,
    },
}

/// Lifecycle status of a task as the shim sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskStatus {
    /// `runc create` done, not started.
    Created,
    /// Started and not yet exited.
    Running,
    /// The init exited.
    Stopped,
}

/// A task's state as reported by `state`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskState {
    /// Created, running or stopped.
    pub status: TaskStatus,
    /// Host pid of the init.
    pub pid: u32,
    /// The init's exit, once it exited.
    pub exit: Option<ExitRecord>,
}

/// How and when the init exited: the content of `exit.json`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    /// Exit code, or 128 + N when killed by signal N.
    pub status: i32,
    /// Time of the reap, in nanoseconds since the Unix epoch.
    pub exited_at: u64,
    /// Whether metadata has applied this exit (`ack_exit`).
    #[serde(default)]
    pub acked: bool,
}

/// The line the `berth-shim` command prints on stdout before it returns:
/// the detached shim is serving, or why it is not.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "ready", rename_all = "snake_case")]
pub enum Readiness {
    /// The socket listens and `runc create` succeeded.
    Ok {
        /// The detached shim's pid.
        shim_pid: u32,
        /// The container's init pid.
        init_pid: u32,
    },
    /// The shim could not start or `runc create` failed; the shim is gone.
    Failed {
        /// Why, in runc's words when runc failed.
        message: String,
    },
}

/// The shim's identity for re-adoption: the content of `shim.pid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShimPid {
    /// The shim's pid.
    pub pid: u32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks since boot), which tells a
    /// reused pid apart.
    pub start_time: u64,
}

impl ShimPid {
    /// Reads `<state_dir>/shim.pid`; `Ok(None)` when it does not exist.
    pub fn read(state_dir: &Path) -> io::Result<Option<ShimPid>> {
        match fs::read(state_dir.join(SHIM_PID_FILE)) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(io::Error::other),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Whether this process still runs: the pid exists with the same start
    /// time.
    pub fn is_alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
    }
}

/// Field 22 (start time) of `/proc/<pid>/stat`, `None` when there is no such
/// process.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields restart after
    // the last ')', with field 3 first.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// Reads `<state_dir>/exit.json`; `Ok(None)` when the init has not exited (or
/// the record was removed after an acknowledged delete).
pub fn read_exit_file(state_dir: &Path) -> io::Result<Option<ExitRecord>> {
    match fs::read(state_dir.join(EXIT_FILE)) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(io::Error::other),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `contents` to `path` so that a reader sees the old file or the whole
/// new one: a temporary file, then a rename.
///
/// Nothing is synced: the state directory is void after a reboot (it is on
/// tmpfs under `/run`, and the tasks of a previous boot are recorded as
/// exited by boot id), so its files need to outlive a crash of the shim or
/// of the task service only, and the kernel's page cache keeps them
/// through both. A sync here cost most of a millisecond between an exit
/// and its event where the directory is on a disk.
pub fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    let mut file = fs::File::create(&tmp)?;
    file.write_all(contents)?;
    drop(file);
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_read_as_documented() {
        let kill: Request = serde_json::from_str(r#"{"op":"kill","signal":9}"#).unwrap();
        assert_eq!(
            kill,
            Request::Kill {
                signal: 9,
                all: false
            }
        );
        let ack: Request = serde_json::from_str(r#"{"op":"ack_exit"}"#).unwrap();
        assert_eq!(ack, Request::AckExit);
    }

    #[test]
    fn replies_round_trip() {
        let reply = Reply::Exited(ExitRecord {
            status: 137,
            exited_at: 5,
            acked: false,
        });
        let line = serde_json::to_string(&reply).unwrap();
        assert_eq!(
            line,
            r#"{"reply":"exited","status":137,"exited_at":5,"acked":false}"#
        );
        assert_eq!(serde_json::from_str::<Reply>(&line).unwrap(), reply);
    }

    #[test]
    fn own_start_time_is_read() {
        let pid = std::process::id();
        let start = process_start_time(pid).unwrap();
        let me = ShimPid {
            pid,
            start_time: start,
        };
        assert!(me.is_alive());
        let reused = ShimPid {
            pid,
            start_time: start + 1,
        };
        assert!(!reused.is_alive());
    }
}
