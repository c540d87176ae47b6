//! The detached shim process: reaper, runc calls and the socket server.
//!
//! Every child exit goes through one reaper thread (`waitpid(-1)`), because
//! the shim is a subreaper and must collect orphans too. A runc command is
//! therefore never waited on directly: its pid is registered under the state
//! lock before the reaper can look it up, and the reaper hands its status
//! back through the condition variable.

use std::collections::{HashMap, VecDeque};
use std::fs::{self, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::console::{self, Drained, Input};
use crate::protocol::{
    check_exec_id, write_atomic, ExitRecord, Reply, Request, TaskState, TaskStatus, EXEC_DIR,
    EXIT_FILE, INIT_PID_FILE, MAX_LINE, RUNC_LOG_FILE, RUNC_ROOT_DIR, SHIM_PID_FILE, STDERR_FILE,
    STDOUT_FILE,
};

/// How the shim was invoked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShimConfig {
    /// The container id given to runc.
    pub container_id: String,
    /// The OCI bundle (absolute once the shim has started).
    pub bundle: PathBuf,
    /// The state directory (absolute once the shim has started).
    pub state_dir: PathBuf,
    /// The runc binary; a bare name is looked up in PATH.
    pub runc: PathBuf,
    /// The socket path; defaults to `<state>/shim.sock`.
    pub socket: PathBuf,
    /// Keep the init's stdin open for the client (`--stdin`); with a
    /// terminal in the spec, input always goes to the terminal.
    pub stdin: bool,
    /// Start the init as soon as it is made (`--start`): one `runc run
    /// --detach` instead of `runc create` and, later, `runc start`.
    pub start: bool,
}

/// Exits of pids nobody waits for yet, kept in case one is the init that
/// died before its pid file was read.
const UNCLAIMED_EXITS: usize = 64;

/// Stack of a connection thread: requests are small and parsing is shallow,
/// and a small stack keeps the shim's footprint down.
const CONNECTION_STACK: usize = 128 * 1024;

/// How long a connection may stay silent before the shim drops it.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How long `delete` waits for the killed init to be reaped.
const DELETE_REAP_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    init_pid: Option<i32>,
    started: bool,
    exit: Option<ExitRecord>,
    /// runc children in flight: pid -> exit status once reaped.
    runc_children: HashMap<i32, Option<i32>>,
    unclaimed: VecDeque<(i32, ExitRecord)>,
    /// Exec processes by id: pid and exit once known.
    execs: HashMap<String, ExecEntry>,
    /// Exec process ids by pid, for the reaper.
    exec_pids: HashMap<i32, String>,
}

/// Where a process's input goes, and its terminal's output copier.
type ProcessIo = (Input, Option<Arc<Drained>>);

/// One exec process.
#[derive(Clone, Copy, Default)]
struct ExecEntry {
    pid: i32,
    exit: Option<ExitRecord>,
}

pub(crate) struct Shim {
    cfg: ShimConfig,
    state: Mutex<State>,
    changed: Condvar,
    /// Serializes runc commands, so each failure reads its own log lines.
    runc_lock: Mutex<()>,
    /// The init's stdin or terminal, when the client may write to it.
    input: Mutex<Option<Input>>,
    /// Set once a terminal's output is all in `stdout.log`.
    drained: Mutex<Option<Arc<Drained>>>,
    /// Exec processes' stdin or terminal, and their output copiers.
    exec_io: Mutex<HashMap<String, ProcessIo>>,
}

impl Shim {
    pub(crate) fn new(cfg: ShimConfig) -> Arc<Shim> {
        Arc::new(Shim {
            cfg,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            runc_lock: Mutex::new(()),
            input: Mutex::new(None),
            drained: Mutex::new(None),
            exec_io: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the reaper thread. SIGCHLD must already be blocked in every
    /// thread (see [`block_sigchld`]).
    pub(crate) fn start_reaper(self: &Arc<Self>) -> std::io::Result<()> {
        let shim = Arc::clone(self);
        thread::Builder::new()
            .name("reaper".into())
            .stack_size(CONNECTION_STACK)
            .spawn(move || shim.reap_forever())
            .map(|_| ())
    }

    fn reap_forever(&self) -> ! {
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGCHLD);
        let timeout = libc::timespec {
            tv_sec: 1,
            tv_nsec: 0,
        };
        loop {
            // The timeout makes a lost wakeup cost a second, never a hang.
            // SAFETY: the set and timeout are valid for the call.
            unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
            self.reap_all();
        }
    }

    fn reap_all(&self) {
        loop {
            let (pid, status) = match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, signal, _)) => (pid.as_raw(), 128 + signal as i32),
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(_) => return,
            };
            let record = ExitRecord {
                status,
                exited_at: now_nanos(),
                acked: false,
            };

            let mut st = self.lock();
            if let Some(slot) = st.runc_children.get_mut(&pid) {
                *slot = Some(status);
                self.changed.notify_all();
            } else if st.init_pid == Some(pid) {
                drop(st);
                self.record_exit(record);
            } else if let Some(exec_id) = st.exec_pids.remove(&pid) {
                drop(st);
                self.record_exec_exit(&exec_id, record);
            } else {
                if st.unclaimed.len() == UNCLAIMED_EXITS {
                    st.unclaimed.pop_front();
                }
                st.unclaimed.push_back((pid, record));
            }
        }
    }

    /// Keeps the init's exit in `exit.json`, which outlives the shim, then
    /// tells waiters.
    /// A terminal's last output is copied first (for at most a second), so
    /// a client that reads the output after the exit misses nothing.
    fn record_exit(&self, record: ExitRecord) {
        let drained = self
            .drained
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(drained) = drained {
            drained.wait(Duration::from_secs(1));
        }
        if let Err(err) = self.write_exit(&record) {
            // Waiters still get the status; only recovery after a shim crash
            // loses it.
            eprintln!("failed to write exit record: {err}");
        }
        let mut st = self.lock();
        st.exit = Some(record);
        self.changed.notify_all();
    }

    /// Keeps an exec process's exit in its `exit.json`, then tells
    /// waiters.
    fn record_exec_exit(&self, exec_id: &str, record: ExitRecord) {
        let drained = self
            .exec_io_lock()
            .get(exec_id)
            .and_then(|(_, d)| d.clone());
        if let Some(drained) = drained {
            drained.wait(Duration::from_secs(1));
        }
        let path = self.exec_dir(exec_id).join(EXIT_FILE);
        let written = serde_json::to_vec(&record)
            .map_err(std::io::Error::other)
            .and_then(|json| write_atomic(&path, &json));
        if let Err(err) = written {
            eprintln!("failed to write exit record of exec {exec_id}: {err}");
        }
        let mut st = self.lock();
        if let Some(entry) = st.execs.get_mut(exec_id) {
            entry.exit = Some(record);
        }
        self.changed.notify_all();
    }

    fn exec_dir(&self, exec_id: &str) -> PathBuf {
        self.cfg.state_dir.join(EXEC_DIR).join(exec_id)
    }

    fn write_exit(&self, record: &ExitRecord) -> std::io::Result<()> {
        let json = serde_json::to_vec(record).map_err(std::io::Error::other)?;
        write_atomic(&self.cfg.state_dir.join(EXIT_FILE), &json)
    }

    /// Runs runc with the shim's global flags and waits for it through the
    /// reaper. On failure returns runc's own error message.
    fn runc(&self, args: &[&std::ffi::OsStr], stdout: Stdio, stderr: Stdio) -> Result<(), String> {
        self.runc_with(args, Stdio::null(), stdout, stderr)
    }

    /// As [`Shim::runc`], with `stdin` for runc (and, at create without a
    /// terminal, for the container's init).
    fn runc_with(
        &self,
        args: &[&std::ffi::OsStr],
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
    ) -> Result<(), String> {
        let _serial = self.runc_lock.lock().unwrap_or_else(|e| e.into_inner());
        let log = self.cfg.state_dir.join(RUNC_LOG_FILE);
        let offset = fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
        let mut cmd = Command::new(&self.cfg.runc);
        cmd.arg("--root")
            .arg(self.cfg.state_dir.join(RUNC_ROOT_DIR))
            .arg("--log")
            .arg(&log)
            .arg("--log-format")
            .arg("json")
            .args(args)
            .stdin(stdin)
            .stdout(stdout)
            .stderr(stderr);
        let op = args
            .first()
            .map(|a| a.to_string_lossy())
            .unwrap_or_default();

        // Registering under the lock means the reaper, which takes the lock
        // after reaping, always finds the pid.
        let pid = {
            let mut st = self.lock();
            let child = cmd
                .spawn()
                .map_err(|e| format!("failed to run {}: {e}", self.cfg.runc.display()))?;
            let pid = child.id() as i32;
            st.runc_children.insert(pid, None);
            pid
        };
        let status = {
            let mut st = self.lock();
            loop {
                if let Some(Some(status)) = st.runc_children.get(&pid) {
                    let status = *status;
                    st.runc_children.remove(&pid);
                    break status;
                }
                st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
            }
        };

        if status == 0 {
            return Ok(());
        }
        Err(runc_error(&log, offset)
            .unwrap_or_else(|| format!("runc {op} exited with status {status}")))
    }

    /// `runc create` (or `runc run --detach` when the config says start),
    /// with the container's stdio appended to the log files, then learns
    /// the init pid.
    pub(crate) fn create(&self) -> Result<u32, String> {
        let open = |name: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.cfg.state_dir.join(name))
                .map_err(|e| format!("failed to open {name}: {e}"))
        };
        let (stdout, stderr) = (open(STDOUT_FILE)?, open(STDERR_FILE)?);
        let pid_file = self.cfg.state_dir.join(INIT_PID_FILE);
        let mut args: Vec<std::ffi::OsString> = if self.cfg.start {
            vec!["run".into(), "--detach".into()]
        } else {
            vec!["create".into()]
        };
        args.extend([
            "--bundle".into(),
            self.cfg.bundle.clone().into_os_string(),
            "--pid-file".into(),
            pid_file.clone().into_os_string(),
        ]);

        // A terminal comes back from runc on the console socket; an open
        // stdin without one is a pipe the init inherits.
        let io = self.run_process(
            args,
            self.wants_terminal(),
            self.cfg.stdin,
            &self.cfg.state_dir.join(STDOUT_FILE),
            (stdout, stderr),
        )?;
        if let Some((input, drained)) = io {
            *self.input.lock().unwrap_or_else(|e| e.into_inner()) = Some(input);
            *self.drained.lock().unwrap_or_else(|e| e.into_inner()) = drained;
        }

        let text =
            fs::read_to_string(&pid_file).map_err(|e| format!("failed to read init pid: {e}"))?;
        let pid: i32 = text
            .trim()
            .parse()
            .map_err(|_| format!("invalid init pid {:?}", text.trim()))?;

        // The init may have died before its pid was known.
        let mut st = self.lock();
        st.init_pid = Some(pid);
        st.started = self.cfg.start;
        if let Some(pos) = st.unclaimed.iter().position(|(p, _)| *p == pid) {
            let (_, record) = st
                .unclaimed
                .remove(pos)
                .unwrap_or((pid, ExitRecord::default()));
            drop(st);
            self.record_exit(record);
        }
        Ok(pid as u32)
    }

    /// Whether the bundle's process asks for a terminal.
    fn wants_terminal(&self) -> bool {
        fs::read(self.cfg.bundle.join("config.json"))
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .is_some_and(|spec| spec["process"]["terminal"] == true)
    }

    /// The console socket, beside the shim's own (kept short: a unix socket
    /// path holds at most 107 bytes).
    fn console_socket(&self) -> PathBuf {
        let mut path = self.cfg.socket.clone().into_os_string();
        path.push(".console");
        PathBuf::from(path)
    }

    fn exec_io_lock(&self) -> MutexGuard<'_, HashMap<String, ProcessIo>> {
        self.exec_io.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs a runc command that starts a process (`create`, or `exec`;
    /// `args` less the container id), giving the process a terminal when
    /// `terminal` or an open stdin when `stdin`. Returns where its input
    /// goes, if anywhere, and the terminal's output copier.
    fn run_process(
        &self,
        mut args: Vec<std::ffi::OsString>,
        terminal: bool,
        stdin: bool,
        output_log: &std::path::Path,
        (stdout, stderr): (fs::File, fs::File),
    ) -> Result<Option<ProcessIo>, String> {
        let run =
            |args: &[std::ffi::OsString], stdin: Stdio, stdout: fs::File, stderr: fs::File| {
                let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
                self.runc_with(&args, stdin, stdout.into(), stderr.into())
            };
        let id = std::ffi::OsString::from(&self.cfg.container_id);
        if !terminal {
            if !stdin {
                args.push(id);
                run(&args, Stdio::null(), stdout, stderr)?;
                return Ok(None);
            }
            let (read, input) =
                console::stdin_pipe().map_err(|e| format!("failed to make the stdin pipe: {e}"))?;
            args.push(id);
            run(&args, Stdio::from(read), stdout, stderr)?;
            return Ok(Some((input, None)));
        }

        // One console socket at a time: runc commands run one at a time.
        let console_path = self.console_socket();
        let _ = fs::remove_file(&console_path);
        let listener = UnixListener::bind(&console_path)
            .map_err(|e| format!("failed to bind console socket {console_path:?}: {e}"))?;
        let receiver = thread::Builder::new()
            .stack_size(CONNECTION_STACK)
            .spawn(move || console::receive_master(&listener))
            .map_err(|e| format!("failed to start the console thread: {e}"))?;
        args.push("--console-socket".into());
        args.push(console_path.clone().into_os_string());
        args.push(id);
        if let Err(message) = run(&args, Stdio::null(), stdout, stderr) {
            // Unblock the receiver, which waits for a runc that is gone.
            let _ = UnixStream::connect(&console_path);
            let _ = fs::remove_file(&console_path);
            return Err(message);
        }
        let master = receiver
            .join()
            .map_err(|_| "the console thread panicked".to_string())?
            .map_err(|e| format!("failed to receive the terminal: {e}"))?;
        let _ = fs::remove_file(&console_path);
        let (input, drained) = console::start_copier(master, output_log)
            .map_err(|e| format!("failed to copy the terminal's output: {e}"))?;
        Ok(Some((input, Some(drained))))
    }

    /// Acts on the init's (or an exec's) input.
    fn with_input(
        &self,
        exec_id: Option<String>,
        act: impl FnOnce(&mut Input) -> std::io::Result<()>,
    ) -> Reply {
        let id = &self.cfg.container_id;
        let outcome = match &exec_id {
            None => self
                .input
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
                .map(act),
            Some(exec_id) => self
                .exec_io_lock()
                .get_mut(exec_id)
                .map(|(input, _)| act(input)),
        };
        match outcome {
            Some(Ok(())) => Reply::Done,
            Some(Err(err)) => error_reply(&format!("failed to write input of {id:?}: {err}")),
            None => error_reply(&format!("container {id:?} has no open stdin")),
        }
    }

    fn close_stdin(&self, exec_id: Option<String>) -> Reply {
        // A terminal has no end of input but the EOF character; a pipe closes.
        let terminal = |input: &Input| matches!(input, Input::Terminal(_));
        let is_terminal = match &exec_id {
            None => self
                .input
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .is_some_and(terminal),
            Some(exec_id) => self
                .exec_io_lock()
                .get(exec_id)
                .is_some_and(|(input, _)| terminal(input)),
        };
        if is_terminal {
            return self.with_input(exec_id, |input| input.write(&[4]));
        }
        match &exec_id {
            None => *self.input.lock().unwrap_or_else(|e| e.into_inner()) = None,
            Some(exec_id) => {
                self.exec_io_lock().remove(exec_id);
            }
        }
        Reply::Done
    }

    /// Accepts connections forever, one small thread each.
    pub(crate) fn serve(self: Arc<Self>, listener: UnixListener) -> ! {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let shim = Arc::clone(&self);
            let spawned = thread::Builder::new()
                .stack_size(CONNECTION_STACK)
                .spawn(move || shim.connection(stream));
            if let Err(err) = spawned {
                eprintln!("failed to start a connection thread: {err}");
            }
        }
        unreachable!("incoming() never ends");
    }

    fn connection(&self, stream: UnixStream) {
        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        loop {
            let mut line = String::new();
            match (&mut reader).take(MAX_LINE as u64).read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            let too_long = !line.ends_with('\n') && line.len() >= MAX_LINE;
            let (reply, exit_after) = match serde_json::from_str::<Request>(&line) {
                _ if too_long => (error_reply("request line too long"), false),
                Ok(request) => self.handle(request),
                Err(err) => (error_reply(&format!("malformed request: {err}")), false),
            };

            let mut out = serde_json::to_vec(&reply).unwrap_or_default();
            out.push(b'\n');
            let sent = writer.write_all(&out).and_then(|_| writer.flush());
            if exit_after {
                self.cleanup_and_exit();
            }
            if sent.is_err() || too_long {
                return;
            }
        }
    }

    /// Acts on one request; the flag asks the shim to exit after replying.
    fn handle(&self, request: Request) -> (Reply, bool) {
        let id = &self.cfg.container_id;
        let reply = match request {
            Request::Start => self.start(),
            Request::State => Reply::State(self.state()),
            Request::Kill { signal, all } => {
                let signal = signal.to_string();
                let mut args: Vec<&std::ffi::OsStr> = vec!["kill".as_ref()];
                if all {
                    args.push("--all".as_ref());
                }
                args.push(id.as_ref());
                args.push(signal.as_ref());
                match self.runc(&args, Stdio::null(), Stdio::null()) {
                    Ok(()) => Reply::Killed,
                    Err(message) => Reply::Error { message },
                }
            }
            Request::KillExec { exec_id, signal } => self.kill_exec(&exec_id, signal),
            Request::Wait => Reply::Exited(self.wait(None).unwrap_or_default()),
            Request::Delete => return self.delete(),
            Request::AckExit => self.ack_exit(),
            Request::Pause => self.simple(&["pause".as_ref(), id.as_ref()]),
            Request::Resume => self.simple(&["resume".as_ref(), id.as_ref()]),
            Request::Ps => self.ps(),
            Request::Update { resources } => self.update(&resources),
            Request::Exec {
                exec_id,
                process,
                stdin,
            } => self.exec(&exec_id, &process, stdin),
            Request::ExecState { exec_id } => match self.lock().execs.get(&exec_id) {
                Some(entry) => Reply::ExecState {
                    pid: entry.pid as u32,
                    exit: entry.exit,
                },
                None => error_reply(&format!("no exec process {exec_id:?} in container {id:?}")),
            },
            Request::WaitExec { exec_id } => self.wait_exec(&exec_id),
            Request::DeleteExec { exec_id } => self.delete_exec(&exec_id),
            Request::Stdin { data, exec_id } => {
                self.with_input(exec_id, |input| input.write(&data))
            }
            Request::CloseStdin { exec_id } => self.close_stdin(exec_id),
            Request::Resize {
                cols,
                rows,
                exec_id,
            } => self.with_input(exec_id, |input| input.resize(cols, rows)),
        };
        (reply, false)
    }

    /// A runc command whose success is the whole answer.
    fn simple(&self, args: &[&std::ffi::OsStr]) -> Reply {
        match self.runc(args, Stdio::null(), Stdio::null()) {
            Ok(()) => Reply::Done,
            Err(message) => Reply::Error { message },
        }
    }

    /// `runc ps --format json`: the container's host pids.
    fn ps(&self) -> Reply {
        let id = &self.cfg.container_id;
        let out_path = self.cfg.state_dir.join("ps.json");
        let out = match fs::File::create(&out_path) {
            Ok(file) => file,
            Err(err) => return error_reply(&format!("failed to create {out_path:?}: {err}")),
        };
        let args = [
            "ps".as_ref(),
            "--format".as_ref(),
            "json".as_ref(),
            id.as_ref(),
        ];
        if let Err(message) = self.runc(&args, out.into(), Stdio::null()) {
            return Reply::Error { message };
        }
        let parsed = fs::read(&out_path)
            .map_err(|err| err.to_string())
            .and_then(|bytes| {
                serde_json::from_slice::<Vec<u32>>(&bytes).map_err(|err| err.to_string())
            });
        let _ = fs::remove_file(&out_path);
        match parsed {
            Ok(pids) => Reply::Pids { pids },
            Err(err) => error_reply(&format!("malformed runc ps output: {err}")),
        }
    }

    /// `runc update --resources FILE`.
    fn update(&self, resources: &serde_json::Value) -> Reply {
        let id = &self.cfg.container_id;
        let path = self.cfg.state_dir.join("update.json");
        let written = serde_json::to_vec(resources)
            .map_err(std::io::Error::other)
            .and_then(|json| write_atomic(&path, &json));
        if let Err(err) = written {
            return error_reply(&format!("failed to write {path:?}: {err}"));
        }
        let reply = self.simple(&[
            "update".as_ref(),
            "--resources".as_ref(),
            path.as_os_str(),
            id.as_ref(),
        ]);
        let _ = fs::remove_file(&path);
        reply
    }

    /// `runc exec --detach`: the process is reparented to the shim (its
    /// subreaper), whose reaper records its exit.
    fn exec(&self, exec_id: &str, process: &serde_json::Value, stdin: bool) -> Reply {
        let id = &self.cfg.container_id;
        if let Err(message) = check_exec_id(exec_id) {
            return Reply::Error { message };
        }
        {
            let mut st = self.lock();
            if st.exit.is_some() {
                return error_reply(&format!("container {id:?} has exited"));
            }
            if st.execs.contains_key(exec_id) {
                return error_reply(&format!(
                    "exec process {exec_id:?} exists already in container {id:?}"
                ));
            }
            st.execs.insert(exec_id.to_string(), ExecEntry::default());
        }
        match self.exec_inner(exec_id, process, stdin) {
            Ok(pid) => Reply::Started { pid },
            Err(message) => {
                self.lock().execs.remove(exec_id);
                let _ = fs::remove_dir_all(self.exec_dir(exec_id));
                Reply::Error { message }
            }
        }
    }

    fn exec_inner(
        &self,
        exec_id: &str,
        process: &serde_json::Value,
        stdin: bool,
    ) -> Result<u32, String> {
        let dir = self.exec_dir(exec_id);
        fs::create_dir_all(&dir).map_err(|e| format!("failed to create {dir:?}: {e}"))?;
        let spec = dir.join("process.json");
        let json = serde_json::to_vec(process).map_err(|e| e.to_string())?;
        write_atomic(&spec, &json).map_err(|e| format!("failed to write {spec:?}: {e}"))?;
        let open = |name: &str| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(dir.join(name))
                .map_err(|e| format!("failed to open {name}: {e}"))
        };
        let (stdout, stderr) = (open(STDOUT_FILE)?, open(STDERR_FILE)?);
        let pid_file = dir.join("pid");
        let args: Vec<std::ffi::OsString> = vec![
            "exec".into(),
            "--process".into(),
            spec.clone().into_os_string(),
            "--detach".into(),
            "--pid-file".into(),
            pid_file.clone().into_os_string(),
        ];
        let terminal = process["terminal"] == true;
        let io = self.run_process(
            args,
            terminal,
            stdin,
            &dir.join(STDOUT_FILE),
            (stdout, stderr),
        )?;
        if let Some(io) = io {
            self.exec_io_lock().insert(exec_id.to_string(), io);
        }
        let text =
            fs::read_to_string(&pid_file).map_err(|e| format!("failed to read exec pid: {e}"))?;
        let pid: i32 = text
            .trim()
            .parse()
            .map_err(|_| format!("invalid exec pid {:?}", text.trim()))?;

        // The process may have exited before its pid was known.
        let mut st = self.lock();
        if let Some(entry) = st.execs.get_mut(exec_id) {
            entry.pid = pid;
        }
        match st.unclaimed.iter().position(|(p, _)| *p == pid) {
            Some(pos) => {
                let (_, record) = st
                    .unclaimed
                    .remove(pos)
                    .unwrap_or((pid, ExitRecord::default()));
                drop(st);
                self.record_exec_exit(exec_id, record);
            }
            None => {
                st.exec_pids.insert(pid, exec_id.to_string());
            }
        }
        Ok(pid as u32)
    }

    fn kill_exec(&self, exec_id: &str, signal: i32) -> Reply {
        // Under the lock the pid is one the reaper has not collected, so
        // it is still this exec's.
        let st = self.lock();
        let Some(entry) = st.execs.get(exec_id) else {
            return error_reply(&format!("no exec process {exec_id:?}"));
        };
        if entry.exit.is_some() || entry.pid <= 0 {
            return error_reply(&format!("exec process {exec_id:?} is not running"));
        }
        // SAFETY: kill takes any pid and signal number.
        if unsafe { libc::kill(entry.pid, signal) } < 0 {
            let err = std::io::Error::last_os_error();
            return error_reply(&format!("failed to signal exec process {exec_id:?}: {err}"));
        }
        Reply::Killed
    }

    fn wait_exec(&self, exec_id: &str) -> Reply {
        let st = self.lock();
        if !st.execs.contains_key(exec_id) {
            return error_reply(&format!("no exec process {exec_id:?}"));
        }
        let st = self
            .changed
            .wait_while(st, |s| {
                s.execs.get(exec_id).is_some_and(|e| e.exit.is_none())
            })
            .unwrap_or_else(|e| e.into_inner());
        match st.execs.get(exec_id).and_then(|e| e.exit) {
            Some(exit) => Reply::Exited(exit),
            None => error_reply(&format!("exec process {exec_id:?} was deleted")),
        }
    }

    fn delete_exec(&self, exec_id: &str) -> Reply {
        let mut st = self.lock();
        match st.execs.get(exec_id) {
            None => return error_reply(&format!("no exec process {exec_id:?}")),
            Some(entry) if entry.exit.is_none() => {
                return error_reply(&format!("exec process {exec_id:?} is running"))
            }
            Some(_) => {}
        }
        st.execs.remove(exec_id);
        self.changed.notify_all();
        drop(st);
        self.exec_io_lock().remove(exec_id);
        let _ = fs::remove_dir_all(self.exec_dir(exec_id));
        Reply::Done
    }

    fn start(&self) -> Reply {
        let id = &self.cfg.container_id;
        {
            let st = self.lock();
            if st.exit.is_some() {
                return error_reply(&format!("container {id:?} has already exited"));
            }
            if st.started {
                return error_reply(&format!("container {id:?} is already started"));
            }
        }
        let result = self.runc(
            &["start".as_ref(), id.as_ref()],
            Stdio::null(),
            Stdio::null(),
        );
        let mut st = self.lock();
        match result {
            Ok(()) => {
                st.started = true;
                Reply::Started {
                    pid: st.init_pid.unwrap_or_default() as u32,
                }
            }
            Err(message) => Reply::Error { message },
        }
    }

    fn state(&self) -> TaskState {
        let st = self.lock();
        let status = match (&st.exit, st.started) {
            (Some(_), _) => TaskStatus::Stopped,
            (None, true) => TaskStatus::Running,
            (None, false) => TaskStatus::Created,
        };
        TaskState {
            status,
            pid: st.init_pid.unwrap_or_default() as u32,
            exit: st.exit,
        }
    }

    /// Blocks until the init's exit is known, or until `timeout` passes.
    fn wait(&self, timeout: Option<Duration>) -> Option<ExitRecord> {
        let st = self.lock();
        let st = match timeout {
            None => self
                .changed
                .wait_while(st, |s| s.exit.is_none())
                .unwrap_or_else(|e| e.into_inner()),
            Some(t) => {
                self.changed
                    .wait_timeout_while(st, t, |s| s.exit.is_none())
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
        st.exit
    }

    fn delete(&self) -> (Reply, bool) {
        let id = &self.cfg.container_id;
        let args = ["delete".as_ref(), "--force".as_ref(), id.as_ref()];
        if let Err(message) = self.runc(&args, Stdio::null(), Stdio::null()) {
            return (Reply::Error { message }, false);
        }

        // The forced delete killed a live init: give the reaper the chance
        // to record it, so waiters and exit.json see the real status.
        let has_init = self.lock().init_pid.is_some();
        let exit = if has_init {
            self.wait(Some(DELETE_REAP_TIMEOUT))
        } else {
            None
        };
        (Reply::Deleted { exit }, true)
    }

    fn ack_exit(&self) -> Reply {
        let mut st = self.lock();
        let Some(mut record) = st.exit else {
            let id = &self.cfg.container_id;
            return error_reply(&format!("container {id:?} has not exited"));
        };
        record.acked = true;
        if let Err(err) = self.write_exit(&record) {
            return error_reply(&format!("failed to write exit record: {err}"));
        }
        st.exit = Some(record);
        Reply::Acked
    }

    /// Removes the shim's files after `delete` and exits. The logs stay for
    /// the task service, and `exit.json` stays until its exit is acknowledged.
    fn cleanup_and_exit(&self) -> ! {
        let acked = self.lock().exit.is_some_and(|e| e.acked);
        let state = &self.cfg.state_dir;
        let _ = fs::remove_file(&self.cfg.socket);
        for name in [SHIM_PID_FILE, INIT_PID_FILE, RUNC_LOG_FILE] {
            let _ = fs::remove_file(state.join(name));
        }
        if acked {
            let _ = fs::remove_file(state.join(EXIT_FILE));
        }
        let _ = fs::remove_dir(state.join(RUNC_ROOT_DIR));
        let _ = fs::remove_dir_all(state.join(EXEC_DIR));
        std::process::exit(0)
    }

    /// Undoes a start-up that failed after the socket was bound; with
    /// `runc_state`, also what a failed `runc create` may have left.
    pub(crate) fn abandon(&self, runc_state: bool) {
        if runc_state {
            let id = &self.cfg.container_id;
            let args = ["delete".as_ref(), "--force".as_ref(), id.as_ref()];
            let _ = self.runc(&args, Stdio::null(), Stdio::null());
        }
        let _ = fs::remove_file(&self.cfg.socket);
        let _ = fs::remove_file(self.cfg.state_dir.join(SHIM_PID_FILE));
    }
}

fn error_reply(message: &str) -> Reply {
    Reply::Error {
        message: message.to_string(),
    }
}

/// The last error runc logged after `offset` in its JSON log.
fn runc_error(log: &std::path::Path, offset: u64) -> Option<String> {
    let bytes = fs::read(log).ok()?;
    let new = bytes.get(offset as usize..)?;
    String::from_utf8_lossy(new)
        .lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["level"] == "error" || v["level"] == "fatal")
        .find_map(|v| v["msg"].as_str().map(str::to_string))
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Blocks SIGCHLD in the calling thread (and the threads it starts later),
/// with the default disposition, so the reaper can take it synchronously.
/// Children started through `std::process` get an empty mask back.
pub(crate) fn block_sigchld() -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    // SAFETY: installing the default disposition runs no handler code.
    unsafe { sigaction(Signal::SIGCHLD, &default)? };
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    set.thread_block()
}
