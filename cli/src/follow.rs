//! Following a process of a container: its output copied to ours as it
//! comes, its exit awaited, and the signals berth receives passed on.
//!
//! The task service keeps each process's stdout and stderr in files on the
//! node and serves them by offset (`logs`), so following is pulling: the
//! client asks for what is past its offsets, more often while output flows
//! and less often while it does not. The exit is an event
//! (`tasks.exit`, `tasks.exec-exited`), with a `state` poll behind it for an
//! exit that happened before the subscription.

use std::io::Write;
use std::time::Duration;

use futures::StreamExt;
use prost::Message;
use tokio::signal::unix::{signal, Signal, SignalKind};

use berth_bus::api;
use berth_proto::{task as tpb, Envelope};

use crate::Ctx;

/// The shortest and longest pause between two pulls of output.
const PULL_MIN: Duration = Duration::from_millis(10);
const PULL_MAX: Duration = Duration::from_millis(200);

/// How a followed process ended.
#[derive(Debug, Clone, Copy)]
pub struct Exited {
    /// Its exit code (128+N for signal N).
    pub status: u32,
}

/// One process of a container: its init (`exec_id` empty) or an exec.
pub struct Proc {
    /// The task service of the container's node.
    pub task: api::Task,
    /// The container.
    pub container_id: String,
    /// The exec process, or empty for the init.
    pub exec_id: String,
}

/// The subscription to the namespace's exits of inits (`tasks.exit`) or
/// of exec processes (`tasks.exec-exited`).
pub async fn exit_events(ctx: &Ctx, exec: bool) -> anyhow::Result<async_nats::Subscriber> {
    let topic = if exec {
        "tasks.exec-exited"
    } else {
        "tasks.exit"
    };
    let subject = berth_bus::subject::event(&ctx.namespace, topic)?;
    Ok(ctx.client.nats().subscribe(subject).await?)
}

impl Proc {
    /// The process's state as the node reports it.
    pub async fn state(&self) -> Result<tpb::State, berth_bus::Error> {
        let reply = self
            .task
            .state(&tpb::StateRequest {
                container_id: self.container_id.clone(),
                exec_id: self.exec_id.clone(),
            })
            .await?;
        Ok(reply.state.unwrap_or_default())
    }

    /// Pulls what is new of stdout and stderr into ours; true when
    /// anything came, and whether both streams reached their end.
    pub async fn copy_output(&self, offsets: &mut [i64; 2]) -> anyhow::Result<(bool, bool)> {
        let mut progressed = false;
        let mut ended = true;
        for (index, data) in self.pull(offsets).await?.into_iter().enumerate() {
            let (data, eof) = data;
            ended &= eof;
            if data.is_empty() {
                continue;
            }
            progressed = true;
            if index == 0 {
                let mut out = std::io::stdout().lock();
                out.write_all(&data)?;
                out.flush()?;
            } else {
                let mut err = std::io::stderr().lock();
                err.write_all(&data)?;
                err.flush()?;
            }
        }
        Ok((progressed, ended))
    }

    /// One pull of both streams past `offsets`, which move past the data.
    pub async fn pull(&self, offsets: &mut [i64; 2]) -> anyhow::Result<[(bytes::Bytes, bool); 2]> {
        let streams = [tpb::Stream::Stdout, tpb::Stream::Stderr];
        let mut out: [(bytes::Bytes, bool); 2] = Default::default();
        for (index, stream) in streams.into_iter().enumerate() {
            let length = self.task.client.max_body() as i64;
            let reply = self.read(stream, offsets[index], length).await?;
            offsets[index] += reply.data.len() as i64;
            out[index] = (reply.data, reply.eof);
        }
        Ok(out)
    }

    /// Where stdout and stderr end now: what a follower that wants only
    /// new output starts from (a restarted container's earlier output
    /// stays before it).
    pub async fn output_ends(&self) -> anyhow::Result<[i64; 2]> {
        let stdout = self.read(tpb::Stream::Stdout, i64::MAX, 1).await?;
        let stderr = self.read(tpb::Stream::Stderr, i64::MAX, 1).await?;
        Ok([stdout.size, stderr.size])
    }

    /// Up to `length` bytes of one stream from `offset`.
    async fn read(
        &self,
        stream: tpb::Stream,
        offset: i64,
        length: i64,
    ) -> Result<tpb::LogsReply, berth_bus::Error> {
        self.task
            .logs(&tpb::LogsRequest {
                container_id: self.container_id.clone(),
                stream: stream as i32,
                offset,
                length,
                exec_id: self.exec_id.clone(),
            })
            .await
    }

    /// Waits for the process's exit: the event, or the state when it had
    /// exited before the subscription.
    pub async fn wait(&self, exits: &mut async_nats::Subscriber) -> anyhow::Result<Exited> {
        loop {
            let state = self.state().await?;
            if state.status == "stopped" {
                return Ok(Exited {
                    status: state.exit_status,
                });
            }
            match tokio::time::timeout(Duration::from_secs(1), exits.next()).await {
                Ok(Some(message)) => {
                    let Ok(envelope) = Envelope::decode(message.payload) else {
                        continue;
                    };
                    let Ok(event) = tpb::TaskEvent::decode(envelope.payload) else {
                        continue;
                    };
                    if event.container_id == self.container_id && event.exec_id == self.exec_id {
                        return Ok(Exited {
                            status: event.exit_status,
                        });
                    }
                }
                Ok(None) => anyhow::bail!("the event subscription closed"),
                Err(_) => continue,
            }
        }
    }

    /// Copies the output until the process exits and every byte it wrote
    /// is out, from the offsets `from` of stdout and stderr on; signals
    /// berth receives meanwhile go to the process when `signals` is given.
    /// Three SIGINTs in a row stop following and leave the process running:
    /// [`Followed::Detached`].
    pub async fn follow(
        &self,
        mut exits: async_nats::Subscriber,
        mut signals: Option<&mut Forwarder>,
        from: [i64; 2],
    ) -> anyhow::Result<Followed> {
        let mut offsets = from;
        let waiter = self.wait(&mut exits);
        tokio::pin!(waiter);
        let mut exited = None;
        let mut pause = PULL_MIN;
        let mut interrupts = 0;
        loop {
            let (progressed, ended) = self.copy_output(&mut offsets).await?;
            if let Some(exited) = exited {
                // Drain: the exit is known, so stop once nothing more comes.
                if !progressed || ended {
                    return Ok(Followed::Exited(exited));
                }
                continue;
            }
            pause = if progressed {
                PULL_MIN
            } else {
                (pause * 2).min(PULL_MAX)
            };
            tokio::select! {
                done = &mut waiter => exited = Some(done?),
                signal = next_signal(&mut signals) => {
                    interrupts = if signal == libc::SIGINT { interrupts + 1 } else { 0 };
                    if interrupts >= 3 {
                        return Ok(Followed::Detached);
                    }
                    self.signal(signal).await?;
                }
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    /// Sends `signal` to the process (the init, or the exec process).
    async fn signal(&self, signal: i32) -> anyhow::Result<()> {
        let sent = self
            .task
            .kill(&tpb::KillRequest {
                container_id: self.container_id.clone(),
                signal: signal as u32,
                all: false,
                exec_id: self.exec_id.clone(),
            })
            .await;
        match sent {
            // The process may have exited between the signal and the kill.
            Err(err) if err.code == berth_bus::Code::FailedPrecondition => Ok(()),
            other => Ok(other.map(|_| ())?),
        }
    }
}

/// How following ended.
pub enum Followed {
    /// The process exited.
    Exited(Exited),
    /// The user pressed Ctrl-C three times: the process runs on.
    Detached,
}

/// The signals `berth run` passes on to the container: SIGINT, SIGTERM,
/// SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2, as docker's `--sig-proxy` does.
///
/// # Limitations
/// A process that is PID 1 of its container ignores every signal it has no
/// handler for, so a SIGINT or SIGTERM passed to `sleep` does nothing; the
/// third Ctrl-C detaches berth instead.
pub struct Forwarder {
    signals: Vec<(i32, Signal)>,
}

impl Forwarder {
    /// Takes over the signals; from now on they no longer end berth.
    pub fn install() -> anyhow::Result<Forwarder> {
        let kinds = [
            libc::SIGINT,
            libc::SIGTERM,
            libc::SIGHUP,
            libc::SIGQUIT,
            libc::SIGUSR1,
            libc::SIGUSR2,
        ];
        let signals = kinds
            .into_iter()
            .map(|number| Ok((number, signal(SignalKind::from_raw(number))?)))
            .collect::<std::io::Result<_>>()?;
        Ok(Forwarder { signals })
    }

    /// The next signal received.
    pub async fn next(&mut self) -> i32 {
        let waits = self.signals.iter_mut().map(|(number, signal)| {
            let number = *number;
            Box::pin(async move {
                signal.recv().await;
                number
            })
        });
        futures::future::select_all(waits).await.0
    }
}

async fn next_signal(signals: &mut Option<&mut Forwarder>) -> i32 {
    match signals {
        Some(forwarder) => forwarder.next().await,
        None => std::future::pending().await,
    }
}
