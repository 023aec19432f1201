//! The workloads and the load generators that drive them: Debian's `wrk` for HTTP/1.1
//! (plain and TLS), `h2load` (nghttp2-client) for HTTP/2, both run in the client namespace,
//! pinned to the load generator's cores, bounded by duration and by a kill deadline.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use super::topo::command_in;

/// The allowed origin of bench/routes.yaml and bench/nginx-cors.conf.
pub const ORIGIN: &str = "https://app.example.com";
/// The backend's static 1 KiB file.
pub const PATH: &str = "/1k.bin";
/// HTTP/1.1 workloads keep this many connections busy.
const CONNECTIONS: u32 = 64;
/// W5: 64 streams over 4 connections.
const H2_CONNECTIONS: u32 = 4;
const H2_STREAMS: u32 = 16;
/// A load generator still running this long after its duration is killed.
const OVERRUN: Duration = Duration::from_secs(30);

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// W1: GET with an allowed Origin, 1 KiB response, HTTP/1.1 keep-alive, 64 connections.
    Get,
    /// W2: an allowed preflight (answered by the proxy), keep-alive, 64 connections.
    Preflight,
    /// W3: W1 with a new TCP connection per request (steering and accept cost).
    NewConn,
    /// W4: W1 over HTTPS, keep-alive.
    Tls,
    /// W4: a new TLS connection per request: handshakes per second.
    Handshake,
    /// W5: W1 over HTTP/2 (prior knowledge), 64 streams over 4 connections.
    H2,
}

/// Which listener of a system a workload uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Listener {
    Http1,
    Tls,
    H2c,
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::Get,
        Workload::Preflight,
        Workload::NewConn,
        Workload::Tls,
        Workload::Handshake,
        Workload::H2,
    ];

    /// Short name, as in the issue (W4 has two measurements).
    pub fn id(self) -> &'static str {
        match self {
            Workload::Get => "W1",
            Workload::Preflight => "W2",
            Workload::NewConn => "W3",
            Workload::Tls => "W4",
            Workload::Handshake => "W4h",
            Workload::H2 => "W5",
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            Workload::Get => "GET, keep-alive",
            Workload::Preflight => "preflight, keep-alive",
            Workload::NewConn => "GET, new connection each",
            Workload::Tls => "HTTPS GET, keep-alive",
            Workload::Handshake => "HTTPS GET, new TLS connection each",
            Workload::H2 => "HTTP/2 GET, 64 streams / 4 conns",
        }
    }

    pub fn listener(self) -> Listener {
        match self {
            Workload::Tls | Workload::Handshake => Listener::Tls,
            Workload::H2 => Listener::H2c,
            _ => Listener::Http1,
        }
    }

    fn url(self, addr: SocketAddr) -> String {
        let scheme = if self.listener() == Listener::Tls {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://{addr}{PATH}")
    }

    /// The request headers besides Host.
    pub fn headers(self) -> Vec<(&'static str, &'static str)> {
        let mut h = vec![("Origin", ORIGIN)];
        match self {
            Workload::Preflight => {
                h.push(("Access-Control-Request-Method", "GET"));
                h.push(("Access-Control-Request-Headers", "content-type"));
            }
            Workload::NewConn | Workload::Handshake => h.push(("Connection", "close")),
            _ => {}
        }
        h
    }

    pub fn method(self) -> &'static str {
        if self == Workload::Preflight {
            "OPTIONS"
        } else {
            "GET"
        }
    }
}

/// One load generator run.
#[derive(Clone, Debug)]
pub struct Sample {
    pub requests: u64,
    pub seconds: f64,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Sample {
    pub fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
}

/// Runs the load generators from the client namespace.
pub struct LoadGen {
    client_ns: String,
    cpus: Option<String>,
    dir: PathBuf,
}

impl LoadGen {
    /// `dir` receives the wrk scripts and h2load's request logs.
    pub fn new(client_ns: &str, cpus: Option<String>, dir: &Path) -> Result<Self> {
        let report = include_str!("../../../bench/wrk-report.lua");
        fs::write(dir.join("get.lua"), report)?;
        // wrk has no method flag; the script sets it once, before the run.
        fs::write(
            dir.join("preflight.lua"),
            format!("wrk.method = \"OPTIONS\"\n{report}"),
        )?;
        Ok(Self {
            client_ns: client_ns.to_owned(),
            cpus,
            dir: dir.to_path_buf(),
        })
    }

    /// Drives `addr` with workload `w` for `seconds`.
    pub fn run(&self, w: Workload, addr: SocketAddr, seconds: u32) -> Result<Sample> {
        if w == Workload::H2 {
            self.h2load(addr, seconds)
        } else {
            self.wrk(w, addr, seconds)
        }
    }

    fn command(&self, program: &str) -> Command {
        command_in(
            Some(&self.client_ns),
            self.cpus.as_deref(),
            Path::new(program),
        )
    }

    fn wrk(&self, w: Workload, addr: SocketAddr, seconds: u32) -> Result<Sample> {
        let script = if w == Workload::Preflight {
            "preflight.lua"
        } else {
            "get.lua"
        };
        let mut cmd = self.command("wrk");
        cmd.args(["-t1", &format!("-c{CONNECTIONS}"), &format!("-d{seconds}s")])
            .args(["--timeout", "5s", "-s"])
            .arg(self.dir.join(script));
        for (name, value) in w.headers() {
            cmd.args(["-H", &format!("{name}: {value}")]);
        }
        cmd.arg(w.url(addr));
        let out = run_bounded(&mut cmd, seconds)?;
        parse_wrk(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("wrk {} against {addr}", w.id()))
    }

    fn h2load(&self, addr: SocketAddr, seconds: u32) -> Result<Sample> {
        let log = self.dir.join("h2load.log");
        let _ = fs::remove_file(&log);
        let mut cmd = self.command("h2load");
        cmd.args([
            "-t1",
            &format!("-c{H2_CONNECTIONS}"),
            &format!("-m{H2_STREAMS}"),
            &format!("-D{seconds}"),
        ])
        .arg(format!("--log-file={}", log.display()));
        for (name, value) in Workload::H2.headers() {
            cmd.args(["-H", &format!("{}: {value}", name.to_ascii_lowercase())]);
        }
        cmd.arg(Workload::H2.url(addr));
        let out = run_bounded(&mut cmd, seconds)?;
        let text = String::from_utf8_lossy(&out.stdout);
        let log_text = fs::read_to_string(&log).context("reading h2load's request log")?;
        parse_h2load(&text, &log_text).with_context(|| format!("h2load against {addr}:\n{text}"))
    }
}

/// Runs `cmd` to completion, killing it if it overruns its duration, and fails unless it
/// exits 0.
fn run_bounded(cmd: &mut Command, seconds: u32) -> Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let deadline = Instant::now() + Duration::from_secs(seconds.into()) + OVERRUN;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish in time; killed");
        }
        thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{cmd:?} exited with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// Reads the JSON line bench/wrk-report.lua prints, and fails on any error wrk counted
/// (non-2xx/3xx answers included): a run that did not work is not a measurement.
fn parse_wrk(stdout: &str) -> Result<Sample> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("BENCH "))
        .with_context(|| format!("no report line in wrk's output:\n{stdout}"))?;
    let v: Value = serde_json::from_str(line).context("wrk's report line")?;
    let num = |k: &str| v[k].as_u64().with_context(|| format!("{k} in {line}"));
    let errors: u64 = [
        "connect_errors",
        "read_errors",
        "write_errors",
        "status_errors",
        "timeouts",
    ]
    .iter()
    .map(|k| num(k))
    .sum::<Result<u64>>()?;
    ensure!(errors == 0, "wrk counted errors: {line}");
    let requests = num("requests")?;
    ensure!(requests > 0, "wrk made no request: {line}");
    Ok(Sample {
        requests,
        seconds: num("duration_us")? as f64 / 1e6,
        p50_us: num("p50_us")? as f64,
        p99_us: num("p99_us")? as f64,
    })
}

/// A duration as h2load prints it: `2.00s`, `999.96ms` (runs shorter than a second), `850us`.
fn h2load_duration(text: &str) -> Option<f64> {
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = text.strip_suffix("us") {
        (n, 1e-6)
    } else {
        (text.strip_suffix('s')?, 1.0)
    };
    number.trim().parse::<f64>().ok().map(|n| n * scale)
}

/// h2load's summary and its per-request log (start µs, status, duration µs).
fn parse_h2load(stdout: &str, log: &str) -> Result<Sample> {
    let seconds: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|r| h2load_duration(r.split(',').next()?))
        .context("no `finished in` line")?;
    let counts = stdout
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .context("no `requests:` line")?;
    let count = |what: &str| -> Result<u64> {
        counts
            .split(", ")
            .find_map(|part| part.strip_suffix(what))
            .and_then(|n| n.trim().parse().ok())
            .with_context(|| format!("no `{what}` count"))
    };
    let succeeded = count(" succeeded")?;
    // Streams still open when the duration ends are cut and counted as failed; more than
    // that is a real failure.
    let cut = u64::from(H2_CONNECTIONS * H2_STREAMS);
    ensure!(
        count(" failed")? <= cut && succeeded > 0,
        "h2load requests failed"
    );
    let mut latencies: Vec<f64> = log
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let status = f.nth(1)?;
            (status == "200")
                .then(|| f.next()?.trim().parse().ok())
                .flatten()
        })
        .collect();
    ensure!(!latencies.is_empty(), "h2load logged no successful request");
    latencies.sort_by(f64::total_cmp);
    Ok(Sample {
        requests: succeeded,
        seconds,
        p50_us: percentile(&latencies, 50.0),
        p99_us: percentile(&latencies, 99.0),
    })
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load() {
        let out = "finished in 2.00s, 100.00 req/s, 1MB/s\n\
                   requests: 210 total, 210 started, 200 done, 200 succeeded, 10 failed, 10 errored, 0 timeout\n";
        let log = "1\t200\t100\n2\t200\t300\n3\t-1\t5\n";
        let s = parse_h2load(out, log).unwrap();
        assert_eq!(s.requests, 200);
        assert_eq!(s.seconds, 2.0);
        assert_eq!(s.p50_us, 100.0);
        assert_eq!(s.p99_us, 300.0);
    }

    #[test]
    fn h2load_durations_below_a_second_are_in_milliseconds() {
        let close = |text: &str, seconds: f64| {
            let parsed = h2load_duration(text).unwrap();
            assert!((parsed - seconds).abs() < 1e-9, "{text}: {parsed}");
        };
        close("2.00s", 2.0);
        close("999.96ms", 0.99996);
        close("850us", 0.00085);
        assert_eq!(h2load_duration("soon"), None);
    }

    #[test]
    fn wrk_errors_fail_the_run() {
        let ok = "x\nBENCH {\"requests\":10,\"duration_us\":1000000,\"connect_errors\":0,\"read_errors\":0,\"write_errors\":0,\"status_errors\":0,\"timeouts\":0,\"p50_us\":5,\"p99_us\":9}\n";
        assert_eq!(parse_wrk(ok).unwrap().requests, 10);
        let bad = ok.replace("\"status_errors\":0", "\"status_errors\":3");
        assert!(parse_wrk(&bad).is_err());
    }
}
