//! kubectl-dchat: the `kubectl dchat` plugin for dchat relay clusters.
//!
//! Layout, in the order a command uses it:
//! - [`cli`]: the command line (kubectl-style `-n`, `--context`, `--kubeconfig`).
//! - [`connect`]: a client for the cluster and namespace the flags name.
//! - [`view`]: a DchatCluster read leniently, so a plugin works with operators older
//!   and newer than itself.
//! - [`contract`]: the annotations the plugin sets and the status it waits for, with the
//!   `--wait` predicates (pure).
//! - [`status`]: the status screen: fetch, summarize (pure), render (pure).
//! - [`actions`], [`wait`]: promote, abort, restart, pause, resume, hibernate, wake and
//!   backup, and the polling behind `--wait`.
//! - [`version`], [`complete`]: `version` and shell completion.
//! - [`style`], [`error`]: colours, tables, ages; the one error type with exit codes.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod actions;
pub mod cli;
pub mod complete;
pub mod connect;
pub mod contract;
pub mod error;
pub mod status;
pub mod style;
pub mod version;
pub mod view;
pub mod wait;

use std::io::Write;

use clap::CommandFactory;
use k8s_openapi::jiff::Timestamp;

use crate::actions::Action;
use crate::cli::{Cli, Command, CompletionShell, Output};
use crate::error::Error;
use crate::style::Style;

/// Runs one command; what it prints goes to `out`, warnings to `err`.
pub async fn run(cli: Cli, out: &mut dyn Write, err: &mut dyn Write) -> Result<(), Error> {
    let write = |out: &mut dyn Write, text: &str| {
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| Error::Output(e.to_string()))
    };
    let (action, wait, name) = match cli.command {
        Command::Completion(args) => {
            let text = completion_script(args.shell)?;
            return write(out, &text);
        }
        Command::Version(args) => {
            if args.client {
                return write(out, &version::render(None));
            }
            let operator = match connect::connect(&cli.kube).await {
                Ok(conn) => {
                    version::operator(&conn.client, args.operator_namespace.as_deref()).await
                }
                Err(e) => version::OperatorVersion::Unknown(e.to_string()),
            };
            return write(out, &version::render(Some(&operator)));
        }
        Command::Status(args) => {
            let conn = connect::connect(&cli.kube).await?;
            let snapshot =
                status::fetch::snapshot(&conn.client, &conn.namespace, &args.name).await?;
            let summary = status::summarize(&snapshot);
            let text = match args.output {
                None => status::screen::render(&summary, Timestamp::now(), &Style::detect()),
                Some(Output::Json) => serde_json::to_string_pretty(&summary)
                    .map(|s| s + "\n")
                    .map_err(|e| Error::Output(e.to_string()))?,
                Some(Output::Yaml) => {
                    serde_norway::to_string(&summary).map_err(|e| Error::Output(e.to_string()))?
                }
            };
            return write(out, &text);
        }
        Command::Backup(args) => {
            let conn = connect::connect(&cli.kube).await?;
            let wait = args.wait.then_some(args.timeout);
            return actions::backup(&conn, &args.name, wait, out).await;
        }
        Command::Promote(a) => (Action::Promote, a.wait.then_some(a.timeout), a.name),
        Command::Abort(a) => (Action::Abort, a.wait.then_some(a.timeout), a.name),
        Command::Restart(a) => (Action::Restart, a.wait.then_some(a.timeout), a.name),
        Command::Pause(a) => (Action::Pause, a.wait.then_some(a.timeout), a.name),
        Command::Resume(a) => (Action::Resume, a.wait.then_some(a.timeout), a.name),
        Command::Hibernate(a) => (Action::Hibernate, a.wait.then_some(a.timeout), a.name),
        Command::Wake(a) => (Action::Wake, a.wait.then_some(a.timeout), a.name),
    };
    let conn = connect::connect(&cli.kube).await?;
    actions::run(&conn, action, &name, wait, out, err).await
}

/// The completion script for `shell`.
pub fn completion_script(shell: CompletionShell) -> Result<String, Error> {
    let shell = match shell {
        CompletionShell::Kubectl => return Ok(complete::KUBECTL_COMPLETE_SCRIPT.to_string()),
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut buffer = Vec::new();
    clap_complete::generate(shell, &mut Cli::command(), "kubectl-dchat", &mut buffer);
    String::from_utf8(buffer).map_err(|e| Error::Output(e.to_string()))
}
