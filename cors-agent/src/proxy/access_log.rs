//! The access log: one line per request on stderr, formatted by hand and written in batches.
//!
//! It used to be a `tracing` event; formatting that event and writing it with one system call
//! per request was a fifth of a preflight's CPU (`cargo xtask bench`, W2). Lines now go into a
//! process-wide buffer that a flusher task writes out shortly after the first line of a batch
//! (or at once when the buffer is full), as nginx's `access_log ... buffer= flush=` does. The
//! layout is the one the `tracing` formatter printed, so nothing reading the logs changes:
//!
//! ```text
//! 2026-12-03T20:31:00.123456Z  INFO cors_agent::access: peer=10.0.0.1:50000 proto=HTTP/1.1 method=GET host="app.example" path="/" status=200 route=default/app/0 policy="HTTPRoute default/app" cors="allowed" upstream=10.0.0.2:8080 bytes=1024 duration_ms=0.412 complete=true
//! ```
//!
//! `RUST_LOG` still switches it: the line is written only when target `cors_agent::access` is
//! enabled at `info`.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

/// A batch is written this long after its first line at the latest.
pub const FLUSH_DELAY: Duration = Duration::from_millis(50);
/// A batch this large is written at once.
const FLUSH_BYTES: usize = 32 * 1024;

/// The target operators filter on, as in `RUST_LOG=cors_agent::access=off`.
pub const TARGET: &str = "cors_agent::access";

struct Sink {
    pending: Mutex<Vec<u8>>,
    /// Taken while a batch is written, so batches reach stderr in order.
    writing: Mutex<()>,
    /// Set once a flusher task runs; until then every line is written at once.
    batching: AtomicBool,
    first_line: Notify,
}

static SINK: LazyLock<Sink> = LazyLock::new(|| Sink {
    pending: Mutex::new(Vec::with_capacity(FLUSH_BYTES)),
    writing: Mutex::new(()),
    batching: AtomicBool::new(false),
    first_line: Notify::new(),
});

/// Whether access-log lines are wanted (`RUST_LOG`).
pub fn enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

/// Appends one line built by `fill` (which writes the fields, without the prefix or the
/// newline).
pub fn write_line(fill: impl FnOnce(&mut Line<'_>)) {
    let sink = &*SINK;
    let full = {
        let Ok(mut pending) = sink.pending.lock() else {
            return;
        };
        let was_empty = pending.is_empty();
        let mut line = Line { out: &mut pending };
        line.prefix();
        fill(&mut line);
        pending.push(b'\n');
        if was_empty && sink.batching.load(Ordering::Relaxed) {
            sink.first_line.notify_one();
        }
        pending.len() >= FLUSH_BYTES || !sink.batching.load(Ordering::Relaxed)
    };
    if full {
        flush();
    }
}

/// Writes whatever is buffered. Called by the flusher and before the process exits.
pub fn flush() {
    let sink = &*SINK;
    let Ok(_writing) = sink.writing.lock() else {
        return;
    };
    let batch = match sink.pending.lock() {
        Ok(mut pending) if !pending.is_empty() => {
            std::mem::replace(&mut *pending, Vec::with_capacity(FLUSH_BYTES))
        }
        _ => return,
    };
    // Nowhere to report a failing stderr; the tracing formatter ignored it too.
    let _ = std::io::stderr().lock().write_all(&batch);
}

/// Writes batches from now on: each one [`FLUSH_DELAY`] after its first line. Needs a Tokio
/// runtime; call [`flush`] before the process exits.
pub fn start_flusher() {
    let sink = &*SINK;
    if sink.batching.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async move {
        loop {
            sink.first_line.notified().await;
            tokio::time::sleep(FLUSH_DELAY).await;
            flush();
        }
    });
}

/// One line being written: `key=value` fields separated by spaces.
pub struct Line<'a> {
    out: &'a mut Vec<u8>,
}

impl Line<'_> {
    fn prefix(&mut self) {
        let now = humantime::format_rfc3339_micros(SystemTime::now());
        let _ = write!(self, "{now}  INFO {TARGET}:");
    }

    /// A field whose value needs no quoting (numbers, addresses, names the agent made).
    pub fn plain(&mut self, key: &str, value: impl std::fmt::Display) -> &mut Self {
        let _ = write!(self, " {key}={value}");
        self
    }

    /// A field quoted and escaped like Rust's `Debug` for strings: values from the client
    /// cannot forge fields or lines.
    pub fn quoted(&mut self, key: &str, value: &str) -> &mut Self {
        let _ = write!(self, " {key}=\"");
        for c in value.chars() {
            match c {
                '"' | '\\' => {
                    self.out.push(b'\\');
                    self.out.push(c as u8);
                }
                c if c.is_ascii_graphic() || c == ' ' => self.out.push(c as u8),
                c => {
                    let _ = write!(self, "{}", c.escape_debug());
                }
            }
        }
        self.out.push(b'"');
        self
    }
}

impl std::fmt::Write for Line<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.out.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(fill: impl FnOnce(&mut Line<'_>)) -> String {
        let mut out = Vec::new();
        fill(&mut Line { out: &mut out });
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn fields_are_written_as_key_value_pairs() {
        let line = render(|l| {
            l.plain("status", 200)
                .quoted("path", "/a b")
                .plain("x", "y");
        });
        assert_eq!(line, r#" status=200 path="/a b" x=y"#);
    }

    #[test]
    fn quoted_values_cannot_break_out_of_their_field_or_line() {
        let line = render(|l| {
            l.quoted("host", "a\" evil=\"1\nb\\é");
        });
        assert_eq!(line, r#" host="a\" evil=\"1\nb\\é""#);
        assert!(!line.contains('\n'));
    }

    #[test]
    fn the_prefix_names_the_time_level_and_target() {
        let line = render(|l| l.prefix());
        let (time, rest) = line.split_once("  ").unwrap();
        assert!(time.ends_with('Z') && time.len() == 27, "{time}");
        assert_eq!(rest, "INFO cors_agent::access:");
    }
}
