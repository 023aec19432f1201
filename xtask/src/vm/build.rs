//! Static builds of the end-to-end test binaries and of `cors-agent`, for a guest that has no
//! Rust toolchain and no glibc of its own.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// The package whose test binaries hold the suite.
const TESTS_PACKAGE: &str = "cors-agent-tests";

/// The eBPF end-to-end suites: the test targets that steer traffic in network namespaces
/// (`steer*`, `*node*`). They run whole, exactly as on the host. The other suites of the
/// package (proxy, routing, validation, the Chromium browser suite) do not touch the kernel
/// features that differ between supported kernels, and already run on the host.
fn is_ebpf_suite(target_name: &str) -> bool {
    target_name.starts_with("steer") || target_name.contains("node")
}
const TARGET: &str = "x86_64-unknown-linux-gnu";

/// What goes into the guest.
pub struct Built {
    /// The eBPF suites' test executables, sorted by file name (e.g. `steer_netns-0123abcd`).
    pub tests: Vec<PathBuf>,
    pub agent: PathBuf,
}

/// Builds into `target_dir`, which only this command uses: the different RUSTFLAGS would
/// otherwise invalidate the host build on every switch.
pub fn build(root: &Path, target_dir: &Path) -> Result<Built> {
    println!(
        "vm-test: building the test binaries statically into {}",
        target_dir.display()
    );
    let test_messages = cargo(root, target_dir, &["test", "-p", TESTS_PACKAGE, "--no-run"])?;
    let mut tests: Vec<PathBuf> = test_messages
        .iter()
        .filter(|m| m["profile"]["test"] == true)
        .filter(|m| m["target"]["name"].as_str().is_some_and(is_ebpf_suite))
        .filter_map(executable)
        .collect();
    tests.sort_by_key(|p| p.file_name().map(|n| n.to_owned()));
    tests.dedup();
    if tests.is_empty() {
        bail!(
            "cargo test -p {TESTS_PACKAGE} --no-run reported no eBPF suite (steer*, *node*) \
             among its test executables"
        );
    }
    // Same package selection as tests/src/agent.rs uses, so features unify as in the test build
    // and this is a link step, not a second compile.
    let agent_messages = cargo(
        root,
        target_dir,
        &[
            "build",
            "-p",
            "cors-agent",
            "-p",
            TESTS_PACKAGE,
            "--bin",
            "cors-agent",
        ],
    )?;
    let agent = agent_messages
        .iter()
        .filter(|m| m["target"]["name"] == "cors-agent")
        .find_map(executable)
        .context("cargo build reported no cors-agent executable")?;
    Ok(Built { tests, agent })
}

/// Runs cargo with the static-build settings and returns its JSON artifact messages.
fn cargo(root: &Path, target_dir: &Path, args: &[&str]) -> Result<Vec<Value>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root)
        .args(args)
        .args([
            "--target",
            TARGET,
            "--message-format=json-render-diagnostics",
        ])
        .env("CARGO_TARGET_DIR", target_dir)
        // An explicit --target keeps these flags away from build scripts and proc macros,
        // which must stay dynamic host binaries.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        // Line tables keep panic locations and backtraces readable while making the binaries
        // about a third of their full-debuginfo size, which the guest unpacks into RAM.
        .env("CARGO_PROFILE_DEV_DEBUG", "line-tables-only")
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("cargo {} failed ({})", args.join(" "), out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact")
        .collect())
}

fn executable(message: &Value) -> Option<PathBuf> {
    message["executable"].as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suite_selection() {
        for name in [
            "steer_netns",
            "node_cases",
            "node_errors",
            "steer_fail_closed",
        ] {
            assert!(is_ebpf_suite(name), "{name}");
        }
        for name in ["proxy_cases", "browser", "routing", "cors_agent_tests"] {
            assert!(!is_ebpf_suite(name), "{name}");
        }
    }
}
