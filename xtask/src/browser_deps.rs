//! What the browser suite (`tests/tests/browser.rs`) needs on the machine: Debian's Chromium
//! (never a browser downloaded by a tool) and `certutil` from libnss3-tools, with which the
//! suite makes Chromium trust its test CA. Called by `cargo xtask ci` before the tests.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::ci::apt_install;

/// The path the suite starts Chromium from (`cors_agent_tests::browser::CHROMIUM`).
const CHROMIUM: &str = "/usr/bin/chromium";

/// Installs `chromium` and `libnss3-tools` from Debian when either is missing, then checks that
/// Chromium runs.
pub fn ensure() -> Result<()> {
    let mut packages = Vec::new();
    if !Path::new(CHROMIUM).exists() {
        packages.push("chromium");
    }
    let certutil = Command::new("sh")
        .args(["-c", "command -v certutil"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !certutil {
        packages.push("libnss3-tools");
    }
    if !packages.is_empty() {
        apt_install(&packages)?;
    }
    let out = Command::new(CHROMIUM)
        .arg("--version")
        .output()
        .with_context(|| format!("running {CHROMIUM} --version"))?;
    if !out.status.success() {
        bail!(
            "{CHROMIUM} --version failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    println!(
        "browser suite: {}",
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(())
}
