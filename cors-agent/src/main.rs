//! The `cors-agent` command line.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cors_agent::cli;

#[derive(Parser)]
#[command(
    name = "cors-agent",
    version,
    about = "Route-scoped CORS enforcement in front of your apps, configured with Gateway API HTTPRoute CORS filters and AgentgatewayPolicy resources"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Validate(cli::validate::ValidateArgs),
    Explain(cli::explain::ExplainArgs),
    Proxy(cors_agent::app::ProxyArgs),
    #[cfg(target_os = "linux")]
    Node(cors_agent::node::NodeArgs),
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    cors_agent::memory::configure();
    let cli = Cli::parse();
    match cli.command {
        Command::Validate(args) => cli::validate::run(&args),
        Command::Explain(args) => cli::explain::run(&args),
        Command::Proxy(args) => cors_agent::app::run_proxy(args),
        #[cfg(target_os = "linux")]
        Command::Node(args) => cors_agent::node::run(args),
    }
}
