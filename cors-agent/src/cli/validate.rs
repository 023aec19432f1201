//! `cors-agent validate`: errors (exit 2) and lint warnings (exit 0).

use std::path::PathBuf;
use std::process::ExitCode;

use crate::engine::load_table;
use crate::routes::BuildOptions;

#[derive(clap::Args, Debug)]
#[command(
    about = "Check HTTPRoute, Gateway and AgentgatewayPolicy resources",
    after_help = "Examples:\n  cors-agent validate -f examples/httpbin.yaml\n  cors-agent validate -f routes/ -f policies.yaml\n\nExit status: 0 when valid (warnings are printed), 2 when any resource is invalid."
)]
pub struct ValidateArgs {
    /// A YAML file or a folder of *.yaml / *.yml files (repeatable), as with kubectl apply -f.
    #[arg(short = 'f', long = "filename", required = true, value_name = "PATH")]
    pub files: Vec<PathBuf>,
}

pub fn run(args: &ValidateArgs) -> ExitCode {
    match load_table(&args.files, &BuildOptions::default()) {
        Ok((table, diags)) => {
            eprint!("{diags}");
            let rules = table.rules().len();
            let with_policy = table
                .rules()
                .iter()
                .filter(|r| r.policy().is_some())
                .count();
            println!(
                "valid: {} HTTPRoute(s), {rules} rule(s), {with_policy} with a CORS policy, {} warning(s)",
                table.routes().len(),
                diags.warnings.len()
            );
            ExitCode::SUCCESS
        }
        Err(diags) => {
            eprint!("{diags}");
            eprintln!("invalid: {} error(s)", diags.errors.len());
            ExitCode::from(super::EXIT_INVALID)
        }
    }
}
