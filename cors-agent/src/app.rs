//! Wiring for the long-running modes. (Stub: the proxy arrives with the data path.)

use std::process::ExitCode;

#[derive(clap::Args, Debug)]
#[command(about = "Run the agent in front of one app (no eBPF)")]
pub struct ProxyArgs {}

pub fn run_proxy(_args: ProxyArgs) -> ExitCode {
    eprintln!("proxy mode is not built yet");
    ExitCode::FAILURE
}
