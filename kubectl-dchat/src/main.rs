//! `kubectl-dchat`: the binary kubectl runs for `kubectl dchat ...`. The CLI only; the
//! commands live in the library.

use std::process::ExitCode;

use clap::Parser;
use kubectl_dchat::cli::Cli;
use kubectl_dchat::complete::{answer, COMPLETE_ARG};

fn main() -> ExitCode {
    // kube's logs, for debugging a command: RUST_LOG=kube=debug kubectl dchat ...
    if std::env::var_os("RUST_LOG").is_some() {
        use std::io::IsTerminal;
        // Colour only on a terminal, like the rest of the plugin's output.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init();
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let args: Vec<String> = std::env::args().collect();
    // kubectl's plugin completion (kubectl_complete-dchat) asks here; not a subcommand,
    // so it stays out of --help and the clap-generated scripts.
    if args.get(1).map(String::as_str) == Some(COMPLETE_ARG) {
        print!("{}", runtime.block_on(answer(&args[2..])));
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr();
    match runtime.block_on(kubectl_dchat::run(cli, &mut out, &mut err)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
