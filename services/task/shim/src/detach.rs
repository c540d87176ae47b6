//! Start-up of `berth-shim`: argument parsing, detaching from the caller and
//! reporting readiness.
//!
//! The invoked process forks a child that calls `setsid` and forks the shim
//! proper, then exits; the shim is thus reparented away from the task service
//! and outlives it. The invoked process waits on a pipe for the shim's
//! [`Readiness`] line, prints it on stdout and exits 0 on success, 1 on
//! failure, so its caller knows the outcome of `runc create` when it returns.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use nix::fcntl::OFlag;
use nix::unistd::{fork, setsid, ForkResult};
use thiserror::Error;

use crate::daemon::{block_sigchld, Shim, ShimConfig};
use crate::protocol::{
    process_start_time, write_atomic, Readiness, ShimPid, RUNC_ROOT_DIR, SHIM_PID_FILE, SOCKET_FILE,
};

/// Longest unix socket path the kernel accepts (`sun_path` less the NUL).
const MAX_SOCKET_PATH: usize = 107;

const USAGE: &str =
    "usage: berth-shim --id ID --bundle DIR --state DIR [--runc PATH] [--socket PATH] [--stdin]";

/// Errors of starting the shim.
#[derive(Debug, Error)]
pub enum ShimError {
    /// The command line is wrong.
    #[error("{message}\n{USAGE}")]
    Usage {
        /// What is wrong.
        message: String,
    },
    /// A file or directory the shim needs could not be prepared.
    #[error("failed to prepare {path:?}")]
    Path {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The socket path does not fit in a unix socket address.
    #[error("socket path {path:?} is longer than {MAX_SOCKET_PATH} bytes")]
    SocketPathTooLong {
        /// The socket path.
        path: PathBuf,
    },
    /// Another shim already answers on the socket.
    #[error("a shim already serves {path:?}")]
    AlreadyServing {
        /// The socket path.
        path: PathBuf,
    },
    /// A process-level call (pipe, fork, setsid, prctl, signal mask) failed.
    #[error("failed to {what}")]
    Sys {
        /// The call.
        what: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The container cannot be created.
    #[error("failed to create container {container_id:?}: {message}")]
    Create {
        /// The container.
        container_id: String,
        /// Why.
        message: String,
    },
}

fn sys(what: &'static str) -> impl FnOnce(nix::Error) -> ShimError {
    move |source| ShimError::Sys { what, source }
}

fn path_err(path: &Path) -> impl FnOnce(io::Error) -> ShimError + '_ {
    move |source| ShimError::Path {
        path: path.to_path_buf(),
        source,
    }
}

/// Parses `--id ID --bundle DIR --state DIR [--runc PATH] [--socket PATH]
/// [--stdin] [--start]`.
pub fn parse_args(args: impl IntoIterator<Item = OsString>) -> Result<ShimConfig, ShimError> {
    let usage = |message: String| ShimError::Usage { message };
    let (mut id, mut bundle, mut state, mut runc, mut socket) = (None, None, None, None, None);
    let (mut stdin, mut start) = (false, false);
    let mut args = args.into_iter();
    while let Some(flag) = args.next() {
        let slot = match flag.to_str() {
            Some("--stdin") => {
                stdin = true;
                continue;
            }
            Some("--start") => {
                start = true;
                continue;
            }
            Some("--id") => &mut id,
            Some("--bundle") => &mut bundle,
            Some("--state") => &mut state,
            Some("--runc") => &mut runc,
            Some("--socket") => &mut socket,
            _ => return Err(usage(format!("unknown argument {flag:?}"))),
        };
        let value = args
            .next()
            .ok_or_else(|| usage(format!("{flag:?} needs a value")))?;
        *slot = Some(value);
    }

    let container_id = id
        .ok_or_else(|| usage("--id is required".into()))?
        .into_string()
        .map_err(|id| usage(format!("container id {id:?} is not utf-8")))?;
    if container_id.is_empty() || container_id.contains('/') {
        return Err(usage(format!("invalid container id {container_id:?}")));
    }
    let state_dir = PathBuf::from(state.ok_or_else(|| usage("--state is required".into()))?);
    let socket = socket
        .map(PathBuf::from)
        .unwrap_or_else(|| state_dir.join(SOCKET_FILE));
    Ok(ShimConfig {
        container_id,
        bundle: PathBuf::from(bundle.ok_or_else(|| usage("--bundle is required".into()))?),
        state_dir,
        runc: runc
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("runc")),
        socket,
        stdin,
        start,
    })
}

/// Entry point of the `berth-shim` binary. Returns (in the invoked process
/// only) the exit code: 0 when the detached shim serves, 1 when it failed, 2
/// on a usage error. The detached shim itself never returns.
pub fn main() -> i32 {
    let cfg = match parse_args(std::env::args_os().skip(1)) {
        Ok(cfg) => cfg,
        Err(err) => {
            eprintln!("berth-shim: {err}");
            return 2;
        }
    };
    let readiness = match launch(cfg) {
        Ok(readiness) => readiness,
        Err(err) => Readiness::Failed {
            message: error_chain(&err),
        },
    };
    let line = serde_json::to_string(&readiness).unwrap_or_default();
    println!("{line}");
    match readiness {
        Readiness::Ok { .. } => 0,
        Readiness::Failed { message } => {
            eprintln!("berth-shim: {message}");
            1
        }
    }
}

/// An error and its sources on one line, for the readiness report.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Checks the paths, forks the detached shim and waits for its report.
fn launch(mut cfg: ShimConfig) -> Result<Readiness, ShimError> {
    fs::create_dir_all(&cfg.state_dir).map_err(path_err(&cfg.state_dir))?;
    cfg.state_dir = fs::canonicalize(&cfg.state_dir).map_err(path_err(&cfg.state_dir))?;
    cfg.bundle = fs::canonicalize(&cfg.bundle).map_err(path_err(&cfg.bundle))?;
    if cfg.socket.is_relative() {
        let cwd = std::env::current_dir().map_err(path_err(Path::new(".")))?;
        cfg.socket = cwd.join(&cfg.socket);
    }
    if cfg.socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(ShimError::SocketPathTooLong { path: cfg.socket });
    }
    let runc_root = cfg.state_dir.join(RUNC_ROOT_DIR);
    fs::create_dir_all(&runc_root).map_err(path_err(&runc_root))?;

    let (read_end, write_end) =
        nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(sys("create a pipe"))?;
    // SAFETY: the process is single-threaded here, so the child may run
    // arbitrary code.
    match unsafe { fork() }.map_err(sys("fork"))? {
        ForkResult::Parent { child } => {
            drop(write_end);
            let mut line = String::new();
            let _ = File::from(read_end).read_to_string(&mut line);
            let _ = nix::sys::wait::waitpid(child, None);
            Ok(
                serde_json::from_str(line.trim()).unwrap_or_else(|_| Readiness::Failed {
                    message: "shim exited before reporting readiness".into(),
                }),
            )
        }
        ForkResult::Child => {
            drop(read_end);
            let _ = setsid();
            // SAFETY: still single-threaded.
            match unsafe { fork() } {
                Ok(ForkResult::Child) => daemon(cfg, write_end),
                _ => unsafe { libc::_exit(0) },
            }
        }
    }
}

/// The detached shim: sets itself up, creates the container, reports, serves.
fn daemon(cfg: ShimConfig, ready: OwnedFd) -> ! {
    let mut ready = File::from(ready);
    let shim = Shim::new(cfg.clone());
    let fail = |ready: &mut File, err: ShimError| -> ! {
        report(
            ready,
            Readiness::Failed {
                message: error_chain(&err),
            },
        );
        std::process::exit(1)
    };
    let listener = match setup(&cfg) {
        Ok(listener) => listener,
        Err(err) => fail(&mut ready, err),
    };
    if let Err(err) = shim.start_reaper() {
        shim.abandon(false);
        fail(&mut ready, path_err(Path::new("reaper thread"))(err));
    }

    // State left by an earlier shim of this container is not ours to delete.
    if cfg
        .state_dir
        .join(RUNC_ROOT_DIR)
        .join(&cfg.container_id)
        .exists()
    {
        shim.abandon(false);
        fail(
            &mut ready,
            ShimError::Create {
                container_id: cfg.container_id.clone(),
                message: "container already exists in runc state".into(),
            },
        );
    }

    match shim.create() {
        Ok(init_pid) => report(
            &mut ready,
            Readiness::Ok {
                shim_pid: std::process::id(),
                init_pid,
            },
        ),
        Err(message) => {
            // runc's own message names the step that failed; the caller
            // adds the container.
            shim.abandon(true);
            report(&mut ready, Readiness::Failed { message });
            std::process::exit(1);
        }
    }
    drop(ready);
    shim.serve(listener)
}

fn report(ready: &mut File, readiness: Readiness) {
    let mut line = serde_json::to_vec(&readiness).unwrap_or_default();
    line.push(b'\n');
    let _ = ready.write_all(&line);
}

/// Detaches stdio, becomes subreaper, blocks SIGCHLD, binds the socket and
/// records the shim's pid.
fn setup(cfg: &ShimConfig) -> Result<UnixListener, ShimError> {
    std::env::set_current_dir("/").map_err(path_err(Path::new("/")))?;
    let null = File::open("/dev/null").map_err(path_err(Path::new("/dev/null")))?;
    let log_path = cfg.state_dir.join("shim.log");
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(path_err(&log_path))?;
    for (from, to) in [(&null, 0), (&null, 1), (&log, 2)] {
        // SAFETY: dup2 onto the standard descriptors, which std does not
        // hold as owned handles.
        if unsafe { libc::dup2(from.as_raw_fd(), to) } < 0 {
            return Err(sys("redirect stdio")(nix::Error::last()));
        }
    }

    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } < 0 {
        return Err(sys("become a child subreaper")(nix::Error::last()));
    }
    block_sigchld().map_err(sys("block SIGCHLD"))?;

    let listener = bind(&cfg.socket)?;
    let pid = std::process::id();
    let unbind = |err: ShimError| {
        let _ = fs::remove_file(&cfg.socket);
        err
    };
    let record = ShimPid {
        pid,
        start_time: process_start_time(pid).unwrap_or(0),
    };
    let path = cfg.state_dir.join(SHIM_PID_FILE);
    let json = serde_json::to_vec(&record).map_err(|e| unbind(path_err(&path)(e.into())))?;
    write_atomic(&path, &json).map_err(|e| unbind(path_err(&path)(e)))?;
    Ok(listener)
}

/// Binds the socket, replacing a stale one but never a live shim's.
fn bind(socket: &Path) -> Result<UnixListener, ShimError> {
    if socket.exists() {
        if UnixStream::connect(socket).is_ok() {
            return Err(ShimError::AlreadyServing {
                path: socket.to_path_buf(),
            });
        }
        fs::remove_file(socket).map_err(path_err(socket))?;
    }
    UnixListener::bind(socket).map_err(path_err(socket))
}
