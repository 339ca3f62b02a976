//! What a run tells: the event log `metrics.jsonl` (one brisk-schema `Event` per line,
//! fields in docs/training.md) and the progress display — an indicatif bar with ETA on a
//! terminal, plain periodic lines otherwise.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use brisk_schema::Event;
use indicatif::{ProgressBar, ProgressStyle};

use crate::error::{Error, Result};

/// The append-only event log.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: std::fs::File,
    bytes: u64,
}

impl EventLog {
    /// Opens the log at `path`: empty when `keep` is `None`, else cut back to its first
    /// `keep` bytes (the length a checkpoint recorded), then appended to.
    pub fn open(path: &Path, keep: Option<u64>) -> Result<Self> {
        let io = |e| Error::io("cannot open event log", path, e);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let bytes = keep.map_or(0, |k| k.min(len));
        file.set_len(bytes).map_err(io)?;
        Ok(EventLog {
            path: path.to_path_buf(),
            file,
            bytes,
        })
    }

    /// Appends one event as a line.
    pub fn write(&mut self, event: &Event) -> Result<()> {
        let mut line = event.to_line()?;
        line.push('\n');
        self.file
            .write_all(line.as_bytes())
            .map_err(|e| Error::io("cannot write event log", &self.path, e))?;
        self.bytes += line.len() as u64;
        Ok(())
    }

    /// Makes the events so far durable and returns the log's length: called before a
    /// checkpoint records that length.
    pub fn sync(&mut self) -> Result<u64> {
        self.file
            .sync_data()
            .map_err(|e| Error::io("cannot sync event log", &self.path, e))?;
        Ok(self.bytes)
    }
}

/// Progress on stderr: a bar when stderr is a terminal, else a line every so often.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
    /// Plain mode: when the last line was printed.
    last_line: Option<Instant>,
    every: Duration,
    quiet: bool,
}

impl Progress {
    /// A display for `total` batches, `done` of them already done; `quiet` shows nothing.
    pub fn new(total: u64, done: u64, quiet: bool) -> Self {
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = ProgressBar::new(total);
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} batches, ETA {eta} | {msg}",
            )
            .map(|s| s.progress_chars("=> "))
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_position(done);
            bar
        });
        Progress {
            bar,
            last_line: None,
            every: Duration::from_secs(15),
            quiet,
        }
    }

    /// Reports `done` batches with a status message (empty: keep the last one); plain
    /// mode prints a message when `force` is set or 15 s have passed since the last line.
    pub fn update(&mut self, done: u64, message: &str, force: bool) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(message.to_string());
        } else if !self.quiet && !message.is_empty() {
            let due = self.last_line.is_none_or(|t| t.elapsed() >= self.every);
            if force || due {
                eprintln!("{message}");
                self.last_line = Some(Instant::now());
            }
        }
    }

    /// A line printed above the bar (or plainly).
    pub fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None if !self.quiet => eprintln!("{text}"),
            None => {}
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_appends_lines_and_cuts_back_on_resume() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tempdir", Path::new("/tmp"), e))?;
        let path = dir.path().join("metrics.jsonl");
        let at = |step| Event::Checkpoint {
            step,
            epoch: 0,
            path: "c".into(),
        };
        let mut log = EventLog::open(&path, None)?;
        log.write(&at(1))?;
        let kept = log.sync()?;
        log.write(&at(2))?;
        drop(log);
        let mut log = EventLog::open(&path, Some(kept))?;
        let resume = Event::Resume {
            step: 1,
            epoch: 0,
            batch: 3,
            from: None,
            skipped: Vec::new(),
        };
        log.write(&resume)?;
        let events: Vec<Event> = Event::read_log(&path)?.into_iter().map(|r| r.event).collect();
        assert_eq!(events, [at(1), resume]);
        Ok(())
    }
}
