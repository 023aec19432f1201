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

use std::cell::Cell;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Notify;

use super::text;

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
///
/// Values are appended as bytes, without `core::fmt` where it can be helped: formatting was
/// most of the line's cost, and the line is on every request's path.
pub struct Line<'a> {
    out: &'a mut Vec<u8>,
}

impl Line<'_> {
    fn prefix(&mut self) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        // `YYYY-MM-DDTHH:MM:SS`, made once a second per thread.
        thread_local! {
            static SECOND: Cell<(u64, [u8; 19])> = const { Cell::new((u64::MAX, [0; 19])) };
        }
        let secs = now.as_secs();
        let (cached, mut text) = SECOND.get();
        if cached != secs {
            let full = humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + now).to_string();
            if let Some(head) = full.as_bytes().get(..19) {
                text.copy_from_slice(head);
            }
            SECOND.set((secs, text));
        }
        self.out.extend_from_slice(&text);
        self.out.push(b'.');
        self.padded(now.subsec_micros(), 6);
        self.out.extend_from_slice(b"Z  INFO ");
        self.out.extend_from_slice(TARGET.as_bytes());
        self.out.push(b':');
    }

    fn key(&mut self, key: &str) {
        self.out.push(b' ');
        self.out.extend_from_slice(key.as_bytes());
        self.out.push(b'=');
    }

    fn padded(&mut self, n: u32, width: usize) {
        let mut digits = itoa::Buffer::new();
        let digits = digits.format(n);
        self.out.extend(std::iter::repeat_n(
            b'0',
            width.saturating_sub(digits.len()),
        ));
        self.out.extend_from_slice(digits.as_bytes());
    }

    /// A field whose value needs no quoting (names the agent made, or vetted tokens).
    pub fn plain(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        self.out.extend_from_slice(value.as_bytes());
        self
    }

    pub fn number(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        text::push_number(self.out, value);
        self
    }

    pub fn flag(&mut self, key: &str, value: bool) -> &mut Self {
        self.plain(key, if value { "true" } else { "false" })
    }

    /// `ip:port`, `[ipv6]:port` for IPv6.
    pub fn addr(&mut self, key: &str, addr: SocketAddr) -> &mut Self {
        self.key(key);
        let v6 = addr.is_ipv6();
        if v6 {
            self.out.push(b'[');
        }
        text::push_ip(self.out, addr.ip());
        if v6 {
            self.out.push(b']');
        }
        self.out.push(b':');
        text::push_number(self.out, addr.port());
        self
    }

    /// Milliseconds with at most three decimals and no trailing zeros (`0.412`, `1.5`, `2`).
    pub fn millis(&mut self, key: &str, elapsed: Duration) -> &mut Self {
        let micros = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.number(key, micros / 1000);
        let mut fraction = micros % 1000;
        if fraction != 0 {
            self.out.push(b'.');
            let mut width = 3;
            while fraction % 10 == 0 {
                fraction /= 10;
                width -= 1;
            }
            self.padded(u32::try_from(fraction).unwrap_or(0), width);
        }
        self
    }

    /// A field quoted and escaped like Rust's `Debug` for strings: values from the client
    /// cannot forge fields or lines.
    pub fn quoted(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        self.out.push(b'"');
        let clean = |b: &u8| (b' '..=b'~').contains(b) && *b != b'"' && *b != b'\\';
        if value.as_bytes().iter().all(clean) {
            self.out.extend_from_slice(value.as_bytes());
        } else {
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
            l.number("status", 200)
                .quoted("path", "/a b")
                .plain("x", "y")
                .flag("complete", false);
        });
        assert_eq!(line, r#" status=200 path="/a b" x=y complete=false"#);
    }

    #[test]
    fn addresses_print_as_socket_addresses_do() {
        for addr in [
            "10.0.0.1:50000",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:8080",
        ] {
            let parsed: SocketAddr = addr.parse().unwrap();
            assert_eq!(
                render(|l| {
                    l.addr("peer", parsed);
                }),
                format!(" peer={addr}")
            );
        }
    }

    #[test]
    fn durations_are_milliseconds_with_up_to_three_decimals() {
        for (micros, text) in [
            (412, "0.412"),
            (1500, "1.5"),
            (2000, "2"),
            (0, "0"),
            (12_340, "12.34"),
            (7, "0.007"),
        ] {
            let line = render(|l| {
                l.millis("duration_ms", Duration::from_micros(micros));
            });
            assert_eq!(line, format!(" duration_ms={text}"), "{micros} us");
        }
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
        let parsed = humantime::parse_rfc3339(time).unwrap();
        let skew = SystemTime::now().duration_since(parsed).unwrap();
        assert!(skew < Duration::from_secs(5), "{time} is {skew:?} old");
        assert_eq!(rest, "INFO cors_agent::access:");
    }
}
