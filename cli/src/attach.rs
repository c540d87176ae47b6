//! What `-i` and `-t` add to following a process (`run`, `start -a`,
//! `exec`): berth's stdin copied to the process's (its terminal's, with
//! `-t`), the local terminal in
//! raw mode so that keys reach the container as typed, and the terminal's
//! size kept in step.
//!
//! The task service takes input by request (`stdin`), a chunk at a time;
//! the end of berth's input closes the init's (a terminal gets `^D`). A
//! terminal's output comes back as the init's stdout, so the follower needs
//! nothing else.

use std::io::IsTerminal;

use tokio::io::AsyncReadExt;
use tokio::signal::unix::{signal, SignalKind};
use tokio::task::JoinHandle;

use berth_bus::api;
use berth_proto::task as tpb;

/// The largest chunk of input one request carries.
const STDIN_CHUNK: usize = 64 * 1024;

/// Copies berth's stdin to the process (the init, or exec `exec_id` when
/// not empty) until either ends.
pub fn pump_stdin(task: api::Task, container_id: String, exec_id: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut stdin = tokio::io::stdin();
        let mut buf = vec![0u8; STDIN_CHUNK.min(task.client.max_body())];
        loop {
            let n = stdin.read(&mut buf).await.unwrap_or(0);
            let request = tpb::StdinRequest {
                container_id: container_id.clone(),
                data: bytes::Bytes::copy_from_slice(&buf[..n]),
                close: n == 0,
                exec_id: exec_id.clone(),
            };
            // A refused write means the init is gone: nothing more to do.
            if task.stdin(&request).await.is_err() || n == 0 {
                return;
            }
        }
    })
}

/// Gives the container's terminal our size, when stdout is a terminal; sent
/// between create and start, so the process starts with it.
pub async fn set_size(
    task: &api::Task,
    container_id: &str,
    exec_id: &str,
) -> Result<(), berth_bus::Error> {
    if let Some((width, height)) = window_size() {
        let request = tpb::ResizeRequest {
            container_id: container_id.to_string(),
            width,
            height,
            exec_id: exec_id.to_string(),
        };
        task.resize(&request).await?;
    }
    Ok(())
}

/// Keeps the container's terminal as large as ours: once now, and again
/// at every SIGWINCH.
pub fn follow_size(task: api::Task, container_id: String, exec_id: String) -> JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut changes) = signal(SignalKind::window_change()) else {
            return;
        };
        loop {
            if let Some((width, height)) = window_size() {
                let request = tpb::ResizeRequest {
                    container_id: container_id.clone(),
                    width,
                    height,
                    exec_id: exec_id.clone(),
                };
                if task.resize(&request).await.is_err() {
                    return;
                }
            }
            if changes.recv().await.is_none() {
                return;
            }
        }
    })
}

/// Our terminal's size in columns and rows, if stdout is a terminal.
fn window_size() -> Option<(u32, u32)> {
    // SAFETY: TIOCGWINSZ fills the winsize we pass; fd 1 stays open.
    let mut size: libc::winsize = unsafe { std::mem::zeroed() };
    let done = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut size) };
    (done == 0 && size.ws_col > 0).then(|| (u32::from(size.ws_col), u32::from(size.ws_row)))
}

/// The local terminal in raw mode while this lives; its old mode after.
pub struct RawTerminal {
    saved: libc::termios,
}

impl RawTerminal {
    /// Puts stdin's terminal in raw mode; `None` when stdin is no terminal.
    pub fn enter() -> Option<RawTerminal> {
        if !std::io::stdin().is_terminal() {
            return None;
        }
        // SAFETY: tcgetattr and tcsetattr read and write the termios we
        // own, for fd 0, which stays open for the process's life.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(libc::STDIN_FILENO, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(RawTerminal { saved })
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the mode read in `enter` on the same fd.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &self.saved) };
    }
}
