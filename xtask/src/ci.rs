//! `cargo xtask ci`: the whole test suite, as CI runs it. Installs what the tests need when it
//! is missing, then runs formatting, lints, unit, integration and end-to-end tests (on this
//! kernel, and the eBPF suites again in a VM on the oldest supported one), the eBPF object
//! check, the demo's smoke run and the benchmark's (`bench --quick`). Any step that cannot run
//! fails the run.

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::workspace_root;

#[derive(clap::Args)]
pub struct Ci {}

pub fn run(_args: Ci) -> Result<()> {
    let started = Instant::now();
    let xtask = std::env::current_exe().context("locating the xtask binary")?;
    step("prerequisites", install_prerequisites)?;
    step("cargo fmt --check", || {
        cargo(&["fmt", "--all", "--", "--check"])
    })?;
    step("cargo clippy", || {
        cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ])
    })?;
    step("cargo test", || cargo(&["test", "--workspace"]))?;
    step("end-to-end eBPF suites in a VM on Linux 6.1", || {
        run_cmd(Command::new(&xtask).args(["vm-test", "--kernel", "6.1"]))
    })?;
    step("eBPF object matches its source", || {
        run_cmd(Command::new(&xtask).args(["build-ebpf", "--check"]))
    })?;
    step("demo smoke run", || {
        run_cmd(Command::new(&xtask).args(["demo", "--smoke"]))
    })?;
    // Checks that every system and workload of the benchmark still runs and answers
    // correctly; it never fails on speed.
    step("benchmark smoke run", || {
        run_cmd(Command::new(&xtask).args(["bench", "--quick"]))
    })?;
    println!("\nci: every step passed in {:.0?}", started.elapsed());
    Ok(())
}

fn step(name: &str, f: impl FnOnce() -> Result<()>) -> Result<()> {
    println!("\n==> {name}");
    let t = Instant::now();
    f().with_context(|| format!("ci step failed: {name}"))?;
    println!("==> {name}: ok ({:.1?})", t.elapsed());
    Ok(())
}

fn cargo(args: &[&str]) -> Result<()> {
    run_cmd(
        Command::new(env!("CARGO"))
            .args(args)
            .current_dir(workspace_root()),
    )
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} exited with {status}");
    }
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The end-to-end suites create network namespaces and load eBPF programs: they need root and
/// iproute2; the browser suite needs Debian's Chromium. rustfmt and clippy come from rustup.
fn install_prerequisites() -> Result<()> {
    let uid = Command::new("id")
        .arg("-u")
        .output()
        .context("running id -u")?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        bail!(
            "the test suite needs root (network namespaces, eBPF): run it as root, e.g. with sudo -E"
        );
    }
    crate::browser_deps::ensure()?;
    for component in ["rustfmt", "clippy"] {
        let listed = Command::new("rustup")
            .args(["component", "list", "--installed"])
            .output()
            .context("running rustup (the Rust toolchain is required)")?;
        if !String::from_utf8_lossy(&listed.stdout).contains(component) {
            run_cmd(Command::new("rustup").args(["component", "add", component]))?;
        }
    }
    let mut packages = Vec::new();
    // `ip` builds the test namespaces; `setpriv` drops capabilities in the node error tests;
    // qemu boots the oldest supported kernel for the VM run.
    for (program, package) in [
        ("ip", "iproute2"),
        ("setpriv", "util-linux"),
        ("qemu-system-x86_64", "qemu-system-x86"),
    ] {
        if !have(program) {
            packages.push(package);
        }
    }
    if !packages.is_empty() {
        apt_install(&packages)?;
    }
    Ok(())
}

pub fn apt_install(packages: &[&str]) -> Result<()> {
    println!("installing Debian packages: {}", packages.join(" "));
    run_cmd(Command::new("apt-get").args(["update", "-qq"]))?;
    run_cmd(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}
