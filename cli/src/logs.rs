//! `berth logs`: what a container's init wrote, stdout to stdout and stderr
//! to stderr.
//!
//! The task service keeps the two streams as files on the node, without
//! per-line timestamps and without an index of lines. So `--tail` reads a
//! stream whole and keeps its last lines, `--since` can only be answered
//! when the whole output falls on one side of the time, and `-t` is refused.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use berth_bus::Code;

use crate::follow::Proc;
use crate::{containers, output, Ctx};

/// `berth logs` flags.
#[derive(Args)]
pub struct LogsArgs {
    /// Keep printing output until the container exits.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N lines of each stream.
    #[arg(long, value_name = "N")]
    tail: Option<usize>,
    /// Only output written after this time (`10m`, `2024-01-01T12:00:00Z`).
    #[arg(long, value_name = "TIME")]
    since: Option<String>,
    /// Prefix each line with its time (not supported: none is stored).
    #[arg(short, long)]
    timestamps: bool,
    /// The container.
    container: String,
}

/// Prints the container's output.
pub async fn logs(ctx: &Ctx, args: LogsArgs) -> anyhow::Result<ExitCode> {
    if args.timestamps {
        anyhow::bail!(
            "logs -t is not supported: berth stores a container's output without \
             the time of each line, so it has no timestamps to print"
        );
    }
    let container = containers::get(ctx, &args.container).await?;
    let proc = containers::init_of(ctx, &container);
    let no_output = |err: berth_bus::Error| match err.code {
        Code::NotFound => anyhow::anyhow!(
            "container {} has no output: it has no task (never started, or removed)",
            args.container
        ),
        _ => err.into(),
    };
    let state = proc.state().await.map_err(no_output)?;

    // With no time per line, --since is answered only when every line is
    // known to be after it (the container was made later) or before it
    // (the task had exited by then).
    if let Some(since) = &args.since {
        let since = output::parse_time(since)?;
        let created = output::nanos(container.created_at.as_ref());
        let exited = output::nanos(state.exited_at.as_ref());
        if state.status == "stopped" && exited > 0 && exited < since {
            return Ok(ExitCode::SUCCESS);
        }
        if created < since {
            anyhow::bail!(
                "logs --since: berth stores output without the time of each line, so \
                 it cannot tell which of {}'s lines came after {} (it was created at {})",
                args.container,
                output::time(since),
                output::time(created)
            );
        }
    }

    let mut offsets = [0i64; 2];
    if let Some(lines) = args.tail {
        tail(&proc, &mut offsets, lines).await?;
    } else {
        while proc.copy_output(&mut offsets).await?.0 {}
    }
    if args.follow {
        follow(&proc, &mut offsets).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads both streams to their current end and prints the last `lines`
/// lines of each.
///
/// # Limitations
/// The whole output passes through memory once, since the service cannot
/// be asked for lines, only for bytes.
async fn tail(proc: &Proc, offsets: &mut [i64; 2], lines: usize) -> anyhow::Result<()> {
    let mut streams = [Vec::new(), Vec::new()];
    loop {
        let pulled = proc.pull(offsets).await?;
        if pulled.iter().all(|(data, _)| data.is_empty()) {
            break;
        }
        for (index, (data, _)) in pulled.iter().enumerate() {
            streams[index].extend_from_slice(data);
        }
    }
    std::io::stdout().write_all(last_lines(&streams[0], lines))?;
    std::io::stderr().write_all(last_lines(&streams[1], lines))?;
    std::io::stdout().flush()?;
    Ok(())
}

/// The last `lines` lines of `data`; a last line without a newline counts.
fn last_lines(data: &[u8], lines: usize) -> &[u8] {
    if lines == 0 {
        return &[];
    }
    let body = data.strip_suffix(b"\n").unwrap_or(data);
    let mut seen = 0;
    for (at, byte) in body.iter().enumerate().rev() {
        if *byte == b'\n' {
            seen += 1;
            if seen == lines {
                return &data[at + 1..];
            }
        }
    }
    data
}

/// Prints output as it comes until the task has exited and both streams
/// are at their end.
async fn follow(proc: &Proc, offsets: &mut [i64; 2]) -> anyhow::Result<()> {
    let mut pause = Duration::from_millis(10);
    loop {
        let (progressed, ended) = proc.copy_output(offsets).await?;
        if ended {
            return Ok(());
        }
        pause = if progressed {
            Duration::from_millis(10)
        } else {
            (pause * 2).min(Duration::from_millis(250))
        };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::last_lines;

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(last_lines(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(last_lines(b"a\nb\nc", 2), b"b\nc");
        assert_eq!(last_lines(b"a\nb\n", 5), b"a\nb\n");
        assert_eq!(last_lines(b"a\nb\n", 0), b"");
        assert_eq!(last_lines(b"", 3), b"");
    }
}
