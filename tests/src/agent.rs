//! The real `cors-agent` binary, started as a child process.
//!
//! Finding the binary: Cargo only gives `CARGO_BIN_EXE_*` to tests of the package that owns the
//! binary, and this package is not it. So the first test that needs the binary runs
//! `cargo build -p cors-agent -p cors-agent-tests --bin cors-agent` (same profile as the test
//! executable) and takes the path from Cargo's JSON messages. Selecting this package too makes
//! Cargo unify features exactly as `cargo test -p cors-agent-tests` did, so the build is a
//! no-op or a relink, never a second compile of the dependencies, and the binary is never
//! stale. Cargo releases its build lock before it runs tests, so the nested call does not
//! deadlock. Set `CORS_AGENT_BIN` to use a prebuilt binary instead.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};

/// How long an agent may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The path of an up-to-date `cors-agent` binary.
pub fn binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("CORS_AGENT_BIN") {
            return PathBuf::from(path);
        }
        build_binary().unwrap_or_else(|e| panic!("cannot build the cors-agent binary: {e:#}"))
    })
}

fn build_binary() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("the tests crate has no parent folder"))?;
    let release = std::env::current_exe()
        .map(|p| p.components().any(|c| c.as_os_str() == "release"))
        .unwrap_or(false);
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "build",
        "-p",
        "cors-agent",
        "-p",
        "cors-agent-tests",
        "--bin",
        "cors-agent",
        "--message-format=json-render-diagnostics",
    ]);
    if release {
        cmd.arg("--release");
    }
    // Cargo gives this test process the variables it sets for a crate (CARGO_PKG_NAME, ...).
    // Some build scripts (ring's) ask to rerun when those change, so passing them on would
    // make this build and the next `cargo test` rebuild each other's dependencies forever.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(key);
        }
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("run cargo build")?;
    if !out.status.success() {
        bail!("cargo build failed ({})", out.status);
    }
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if msg["reason"] == "compiler-artifact"
            && msg["target"]["name"] == "cors-agent"
            && let Some(exe) = msg["executable"].as_str()
        {
            return Ok(PathBuf::from(exe));
        }
    }
    bail!("cargo build reported no cors-agent executable")
}

/// How to start an agent. Listeners bind port 0; the agent's log says which port it got.
#[derive(Clone, Debug)]
pub struct AgentBuilder {
    pub upstream: SocketAddr,
    pub files: Vec<PathBuf>,
    pub tls: Vec<(PathBuf, PathBuf)>,
    pub unmatched_preflights: Option<String>,
    pub admin: bool,
    pub args: Vec<String>,
}

impl AgentBuilder {
    pub fn new(upstream: SocketAddr, file: impl Into<PathBuf>) -> Self {
        Self {
            upstream,
            files: vec![file.into()],
            tls: Vec::new(),
            unmatched_preflights: None,
            admin: false,
            args: Vec::new(),
        }
    }

    pub fn tls(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.tls.push((cert, key));
        self
    }

    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    pub fn unmatched_preflights(mut self, value: Option<String>) -> Self {
        self.unmatched_preflights = value;
        self
    }

    /// Extra flags, e.g. `["--header-read-timeout", "1s"]`.
    pub fn arg(mut self, arg: &str) -> Self {
        self.args.push(arg.into());
        self
    }

    fn command(&self, log: &Path) -> anyhow::Result<Command> {
        let mut cmd = Command::new(binary());
        cmd.arg("proxy")
            .args(["--listen", "127.0.0.1:0"])
            .args(["--upstream", &self.upstream.to_string()]);
        for f in &self.files {
            cmd.arg("-f").arg(f);
        }
        for (cert, key) in &self.tls {
            cmd.arg("--tls-cert").arg(cert).arg("--tls-key").arg(key);
        }
        if let Some(u) = &self.unmatched_preflights {
            cmd.args(["--unmatched-preflights", u]);
        }
        if self.admin {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        cmd.args(&self.args)
            .env("RUST_LOG", "info,cors_agent=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(File::create(log.with_extension("out"))?)
            .stderr(File::create(log)?);
        Ok(cmd)
    }

    /// Starts the agent and waits until its listen port accepts connections.
    pub fn spawn(self) -> anyhow::Result<Agent> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("agent.log");
        let child = self.command(&log)?.spawn().context("start cors-agent")?;
        let mut agent = Agent {
            child,
            addr: None,
            admin: None,
            log,
            _dir: dir,
        };
        agent.wait_ready(self.admin)?;
        Ok(agent)
    }

    /// Runs the agent expecting it to exit by itself; returns its status and stderr.
    pub fn run_to_exit(self, within: Duration) -> anyhow::Result<(ExitStatus, String)> {
        let dir = tempfile::tempdir()?;
        let log = dir.path().join("agent.log");
        let mut child = self.command(&log)?.spawn().context("start cors-agent")?;
        let status = wait_exit(&mut child, within);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        match status {
            Some(s) => Ok((s, text)),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("cors-agent did not exit within {within:?}; log:\n{text}")
            }
        }
    }
}

/// A running agent; killed when dropped.
pub struct Agent {
    child: Child,
    addr: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Agent {
    /// The client listener.
    pub fn addr(&self) -> SocketAddr {
        self.addr.expect("agent is ready")
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("agent started with an admin listener")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal by name (`TERM`, `HUP`) with kill(1).
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits at most `within` for the agent to exit.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        wait_exit(&mut self.child, within)
    }

    /// Waits (at most `within`) until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, within: Duration) -> bool {
        poll(within, || self.log().contains(needle))
    }

    fn wait_ready(&mut self, admin: bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("cors-agent exited early ({status}); log:\n{}", self.log());
            }
            let log = self.log();
            self.addr = self
                .addr
                .or_else(|| logged_addr(&log, "cors-agent proxy listening", "listen="));
            if admin {
                self.admin = self
                    .admin
                    .or_else(|| logged_addr(&log, "admin listening", "addr="));
            }
            if let Some(addr) = self.addr
                && (!admin || self.admin.is_some())
                && std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("cors-agent not ready within {START_TIMEOUT:?}; log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The address after `key` on the first log line containing `marker`.
pub fn logged_addr(log: &str, marker: &str, key: &str) -> Option<SocketAddr> {
    let line = BufReader::new(log.as_bytes())
        .lines()
        .map_while(Result::ok)
        .find(|l| l.contains(marker))?;
    let start = line.find(key)? + key.len();
    line[start..].split_whitespace().next()?.parse().ok()
}

/// Polls `check` every 20 ms until it holds or `within` passes.
pub fn poll(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One HTTPRoute for every host and path whose rule allows `https://app.example.com` with
/// credentials: enough for the suites that test transport rather than policy.
pub const APP_ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: app
  namespace: default
spec:
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://app.example.com"]
        allowMethods: [GET, POST]
        allowHeaders: [Content-Type]
        exposeHeaders: [X-Request-Id]
        allowCredentials: true
    backendRefs:
    - name: app
      port: 8000
"#;

/// Writes `yaml` to `name` in `dir` and returns the path.
pub fn write_resources(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, yaml).expect("write resources");
    path
}
