//! The command line: subcommands and the kubectl-style flags every one of them takes.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Operate dchat relay clusters (DchatCluster objects) from kubectl.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl-dchat",
    bin_name = "kubectl dchat",
    version,
    about,
    after_help = "Every change is an annotation on the DchatCluster that the operator acts on; \
                  see docs/kubectl-plugin.md."
)]
pub struct Cli {
    /// Where the cluster is.
    #[command(flatten)]
    pub kube: KubeFlags,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Kubeconfig, context and namespace, as kubectl takes them.
#[derive(Args, Debug, Clone, Default, PartialEq, Eq)]
pub struct KubeFlags {
    /// Namespace of the DchatCluster; default: the context's namespace.
    #[arg(short = 'n', long, global = true)]
    pub namespace: Option<String>,
    /// Kubeconfig context to use; default: the current context.
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Kubeconfig file; default: $KUBECONFIG, then ~/.kube/config, then in-cluster.
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Phase, conditions, slots, rollout, autoscaler, disruption budget, backups and
    /// recent Events of a DchatCluster, on one screen.
    Status(StatusArgs),
    /// Promote a rollout that waits for promotion (annotation dchat.network/promote).
    Promote(LongWait),
    /// Abort the rollout in flight; traffic goes back to the old slot (annotation
    /// dchat.network/abort).
    Abort(LongWait),
    /// Restart the relays (annotation dchat.network/restartedAt = now).
    Restart(Wait),
    /// Stop the operator from changing anything for the cluster (annotation
    /// dchat.network/reconcile=paused).
    Pause(Wait),
    /// Let the operator manage the cluster again (removes dchat.network/reconcile).
    Resume(Wait),
    /// Scale the relays to zero, keeping volumes and configuration (annotation
    /// dchat.network/hibernation=on).
    Hibernate(Wait),
    /// Bring a hibernated cluster back (removes dchat.network/hibernation).
    Wake(Wait),
    /// Take a backup now (creates a DchatBackup).
    Backup(LongWait),
    /// Print the plugin's version and the operator's.
    Version(VersionArgs),
    /// Print a shell completion script.
    Completion(CompletionArgs),
}

/// `status`.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// DchatCluster name.
    pub name: String,
    /// Print the summary as JSON or YAML instead of the screen.
    #[arg(short = 'o', long, value_enum)]
    pub output: Option<Output>,
}

/// Machine-readable output formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// JSON.
    Json,
    /// YAML.
    Yaml,
}

/// A change that may take minutes (wake, restart, pause).
#[derive(Args, Debug)]
pub struct Wait {
    /// DchatCluster name.
    pub name: String,
    /// Wait until the operator reports the change done.
    #[arg(long)]
    pub wait: bool,
    /// Longest wait with --wait, e.g. 90s, 10m.
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// A change that may take long (a rollout's windows, a backup upload).
#[derive(Args, Debug)]
pub struct LongWait {
    /// DchatCluster name.
    pub name: String,
    /// Wait until the operator reports the change done (or failed).
    #[arg(long)]
    pub wait: bool,
    /// Longest wait with --wait, e.g. 30m, 2h.
    #[arg(long, default_value = "30m", value_parser = parse_timeout)]
    pub timeout: Duration,
}

/// `version`.
#[derive(Args, Debug)]
pub struct VersionArgs {
    /// Print only the plugin's version; do not contact the cluster.
    #[arg(long)]
    pub client: bool,
    /// Namespace of the operator's Deployment; default: found by label in any
    /// namespace, else the chart's default `dchat-system`.
    #[arg(long)]
    pub operator_namespace: Option<String>,
}

/// `completion`.
#[derive(Args, Debug)]
pub struct CompletionArgs {
    /// The shell, or `kubectl` for the `kubectl_complete-dchat` script that lets
    /// `kubectl dchat <TAB>` complete (kubectl 1.26+).
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Shells `completion` writes a script for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    /// bash.
    Bash,
    /// zsh.
    Zsh,
    /// fish.
    Fish,
    /// The `kubectl_complete-dchat` executable for kubectl's plugin completion.
    Kubectl,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    dchat_operator::quantity::parse_duration(text).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn kube_flags_go_anywhere_like_kubectls() {
        let cli = Cli::try_parse_from([
            "kubectl-dchat",
            "pause",
            "chat",
            "-n",
            "prod",
            "--context",
            "eu",
            "--wait",
            "--timeout",
            "90s",
        ])
        .unwrap();
        assert_eq!(cli.kube.namespace.as_deref(), Some("prod"));
        assert_eq!(cli.kube.context.as_deref(), Some("eu"));
        let Command::Pause(wait) = cli.command else {
            panic!("pause")
        };
        assert!(wait.wait);
        assert_eq!(wait.timeout, Duration::from_secs(90));
        let cli = Cli::try_parse_from([
            "kubectl-dchat",
            "-n",
            "prod",
            "status",
            "chat",
            "-o",
            "yaml",
        ])
        .unwrap();
        assert_eq!(cli.kube.namespace.as_deref(), Some("prod"));
        assert!(matches!(
            cli.command,
            Command::Status(StatusArgs {
                output: Some(Output::Yaml),
                ..
            })
        ));
    }

    #[test]
    fn a_bad_timeout_is_a_usage_error() {
        let error = Cli::try_parse_from(["kubectl-dchat", "wake", "chat", "--timeout", "soon"])
            .unwrap_err();
        assert_eq!(error.exit_code(), 2);
    }
}
