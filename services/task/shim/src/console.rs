//! The container's standard input and terminal, as the shim holds them.
//!
//! With a terminal, runc creates the pty inside the container and hands the
//! master to the shim over the console socket (`--console-socket`); the
//! shim copies what the master says into `stdout.log` (a terminal has one
//! output stream) and writes what the client types into it. Without one, an
//! open stdin is a pipe whose read end the init gets as fd 0 and whose write
//! end the shim keeps.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::Duration;

use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};

/// Stack of the output copier: a loop over one buffer.
const COPIER_STACK: usize = 64 * 1024;

/// Waits for runc to connect to `listener` and send the pty master.
pub(crate) fn receive_master(listener: &UnixListener) -> io::Result<OwnedFd> {
    let (stream, _) = listener.accept()?;
    let mut buf = [0u8; 4096];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut space = nix::cmsg_space!([std::os::fd::RawFd; 1]);
    let message = recvmsg::<UnixAddr>(
        stream.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::empty(),
    )
    .map_err(io::Error::from)?;
    for cmsg in message.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            if let Some(fd) = fds.first() {
                // SAFETY: the kernel just installed this descriptor for us,
                // and nothing else owns it.
                return Ok(unsafe { OwnedFd::from_raw_fd(*fd) });
            }
        }
    }
    Err(io::Error::other(
        "runc sent no terminal on the console socket",
    ))
}

/// Where the client's input goes.
pub(crate) enum Input {
    /// The pty master.
    Terminal(File),
    /// The write end of the init's stdin pipe.
    Pipe(File),
}

impl Input {
    /// Writes all of `data`.
    pub(crate) fn write(&mut self, data: &[u8]) -> io::Result<()> {
        match self {
            Input::Terminal(file) | Input::Pipe(file) => file.write_all(data),
        }
    }

    /// Sets the terminal's size; a no-op without one.
    pub(crate) fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        let Input::Terminal(master) = self else {
            return Ok(());
        };
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        if unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &size) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Set once the terminal's output has been copied to its end.
#[derive(Default)]
pub(crate) struct Drained {
    done: Mutex<bool>,
    changed: Condvar,
}

impl Drained {
    /// Waits until the copier reached the end of the output, at most `limit`.
    pub(crate) fn wait(&self, limit: Duration) {
        let done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .changed
            .wait_timeout_while(done, limit, |done| !*done)
            .unwrap_or_else(|e| e.into_inner());
    }

    fn finish(&self) {
        *self.done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.changed.notify_all();
    }
}

/// Copies the pty master's output to `log` until the container's side
/// closes (EIO); returns the master's write side for input.
pub(crate) fn start_copier(master: OwnedFd, log: &Path) -> io::Result<(Input, Arc<Drained>)> {
    let mut out = OpenOptions::new().create(true).append(true).open(log)?;
    let mut reader = File::from(master);
    let writer = reader.try_clone()?;
    let drained = Arc::new(Drained::default());
    let done = drained.clone();
    thread::Builder::new()
        .name("console".into())
        .stack_size(COPIER_STACK)
        .spawn(move || {
            let mut buf = [0u8; 8192];
            loop {
                match reader.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if out.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    // EIO: every process holding the terminal's other side
                    // has closed it.
                    Err(_) => break,
                }
            }
            done.finish();
        })?;
    Ok((Input::Terminal(writer), drained))
}

/// A pipe for the init's stdin: (read end for runc, write end for the shim).
pub(crate) fn stdin_pipe() -> io::Result<(OwnedFd, Input)> {
    let (read, write) = nix::unistd::pipe().map_err(io::Error::from)?;
    Ok((read, Input::Pipe(File::from(write))))
}
