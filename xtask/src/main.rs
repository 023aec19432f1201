//! Project automation: `cargo xtask <command>`.
//!
//! Keep this file a thin dispatcher: each command lives in its own module.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod browser_deps;
mod ci;
mod demo;
mod ebpf;
mod vm;

#[derive(Parser)]
#[command(name = "xtask", about = "cors-agent project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the whole test suite as CI does, installing what it needs.
    Ci(ci::Ci),
    /// Start a demo app behind cors-agent with the guide's policy, and print curl commands.
    Demo(demo::Demo),
    /// Build the sk_lookup eBPF object and write it to cors-agent/src/steer/.
    BuildEbpf(ebpf::BuildEbpf),
    /// Run the eBPF end-to-end suites in a qemu VM on Debian's 6.1 and/or 6.12 cloud kernel.
    VmTest(vm::VmTest),
    /// Measure cors-agent against direct, nginx and iptables REDIRECT (root; see bench.rs).
    Bench(bench::Bench),
}

fn main() -> ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Ci(args) => ci::run(args),
        Cmd::Demo(args) => demo::run(args),
        Cmd::BuildEbpf(args) => ebpf::run(args),
        Cmd::VmTest(args) => vm::run(args),
        Cmd::Bench(args) => bench::run(args),
    };
    // One readable line per cause, without the backtrace RUST_BACKTRACE would add.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The workspace root: xtask lives one level below it.
fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// Where the builds xtask starts put their output: `CARGO_TARGET_DIR`, or `<root>/target`.
/// Those builds run in the workspace root, so a relative `CARGO_TARGET_DIR` starts there.
fn target_dir() -> PathBuf {
    let root = workspace_root();
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}
