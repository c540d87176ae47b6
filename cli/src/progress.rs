//! A progress bar for long transfers, drawn on stderr only when stderr is a
//! terminal, so scripts and logs see nothing of it.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressStyle};

/// Transfers smaller than this finish before a bar would be worth drawing.
const MIN_BYTES: u64 = 4 * 1024 * 1024;

/// A byte counter that may be drawn as a bar; clones count into the same bar.
#[derive(Clone)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar for `total` bytes labelled `what`, or an invisible counter
    /// when stderr is not a terminal or the transfer is small.
    pub fn new(what: &str, total: u64) -> Progress {
        if total < MIN_BYTES || !std::io::stderr().is_terminal() {
            return Progress { bar: None };
        }
        let bar = ProgressBar::new(total);
        let style = ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
        )
        .map(|style| style.progress_chars("=> "))
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.set_message(what.to_string());
        Progress { bar: Some(bar) }
    }

    /// Counts `bytes` more as done.
    pub fn add(&self, bytes: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
