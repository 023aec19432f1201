//! What a bench run needs before it starts: root, the tools (installed from Debian when
//! missing), the release binary, file descriptors for 10,000 connections, a certificate and
//! the backend's file.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

use crate::ci::apt_install;
use crate::{target_dir, workspace_root};

/// (program, Debian package) the bench runs.
const TOOLS: &[(&str, &str)] = &[
    ("nginx", "nginx"),
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    ("iptables", "iptables"),
    ("curl", "curl"),
    ("openssl", "openssl"),
    ("ip", "iproute2"),
    ("taskset", "util-linux"),
];

/// File descriptors the bench and its children need: 10,000 idle connections on each side
/// of the memory scenario, with room to spare.
const NOFILE_NEEDED: u64 = 12_000;

pub fn require_root() -> Result<()> {
    ensure!(
        rustix::process::geteuid().is_root(),
        "cargo xtask bench needs root (network namespaces, eBPF, iptables): run it as root"
    );
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Installs the Debian packages of the missing tools, saying which.
pub fn install_tools(allowed: bool) -> Result<()> {
    let missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(program, _)| !have(program))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !allowed {
        bail!("missing Debian packages: {}", missing.join(" "));
    }
    // Debian's nginx package starts its own service where an init system allows it; the
    // bench never uses that one (it runs private instances with their own prefix).
    apt_install(&missing)
}

/// `cargo build --release -p cors-agent`; returns the binary.
pub fn build_agent() -> Result<PathBuf> {
    let root = workspace_root();
    let status = Command::new(env!("CARGO"))
        .args(["build", "--release", "-p", "cors-agent"])
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    ensure!(
        status.success(),
        "cargo build --release -p cors-agent failed"
    );
    let binary = target_dir().join("release/cors-agent");
    ensure!(binary.exists(), "{} is missing", binary.display());
    Ok(binary)
}

/// Raises the open-file limit to the hard limit (raising that needs CAP_SYS_RESOURCE, which
/// containers often lack); every process the bench starts inherits it.
pub fn raise_fd_limit() -> Result<()> {
    let limit = getrlimit(Resource::Nofile);
    let hard = limit.maximum.unwrap_or(u64::MAX);
    ensure!(
        hard >= NOFILE_NEEDED,
        "the hard open-file limit is {hard}; the memory scenario needs {NOFILE_NEEDED} \
         (raise it, e.g. `ulimit -Hn 65536` as root, or pass --connections/--no-memory)"
    );
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: limit.maximum,
            maximum: limit.maximum,
        },
    )
    .context("raising the open-file limit to the hard limit (setrlimit NOFILE)")
}

/// An ECDSA P-256 certificate for every TLS listener (the same key type for all systems:
/// the handshake cost depends on it).
pub fn write_certificate(dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .args(["-days", "2", "-subj", "/CN=app.bench.test"])
        .args(["-addext", "subjectAltName=DNS:app.bench.test"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((cert, key))
}

/// The backend's document root: one 1 KiB file.
pub fn write_www(dir: &Path) -> Result<PathBuf> {
    let www = dir.join("www");
    fs::create_dir_all(&www)?;
    let body: Vec<u8> = (0..1024u32).map(|i| b'a' + (i % 26) as u8).collect();
    fs::write(www.join(super::load::PATH.trim_start_matches('/')), body)?;
    Ok(www)
}

/// First line of `program --version`-style output, for the record.
pub fn version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// The cores online, to choose default pinning.
pub fn cpu_count() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
