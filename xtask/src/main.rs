//! Project automation: `cargo xtask <command>`.
//!
//! Keep this file a thin dispatcher: each command lives in its own module.

use clap::{Parser, Subcommand};

mod ebpf;

#[derive(Parser)]
#[command(name = "xtask", about = "cors-agent project tasks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the sk_lookup eBPF object and write it to cors-agent/src/steer/.
    BuildEbpf(ebpf::BuildEbpf),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::BuildEbpf(args) => ebpf::run(args),
    }
}
