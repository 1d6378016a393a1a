//! `dchat-operator`: run the operator, or use its offline commands.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use dchat_operator::api::{DchatBackup, DchatCluster};
use dchat_operator::commands::{create_backup, request, wait_for_backup, RolloutCommand};
use dchat_operator::controller::DISCOVERY_INTERVAL;
use dchat_operator::http::{router, HttpState};
use dchat_operator::metrics::Metrics;
use dchat_operator::render::{render_file, RenderOptions};
use dchat_operator::runner::{
    self, install_crypto_provider, LeaderElection, Options, LEASE_DURATION,
};
use kube::CustomResourceExt;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info};

/// jemalloc instead of glibc's malloc (feature `jemalloc`, on in the image): the
/// operator's memory churns with every burst of watch events and reconciles, and glibc's
/// allocator kept the peak resident (docs/performance.md, "Operator on a real API server").
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Kubernetes operator for dchat relay clusters.
#[derive(Parser, Debug)]
#[command(name = "dchat-operator", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the CustomResourceDefinitions (DchatCluster, DchatBackup) as YAML, or the one
    /// named.
    Crd {
        /// `dchatclusters.dchat.network` or `dchatbackups.dchat.network`; absent prints both
        /// as one multi-document stream (`| kubectl apply -f -`).
        name: Option<String>,
    },
    /// Print the RBAC rules the operator needs, as YAML PolicyRules.
    Rbac,
    /// Print every object the operator would create for the DchatClusters in a file,
    /// without contacting a cluster.
    Render {
        /// YAML file with one or more DchatClusters (other kinds are skipped).
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Namespace for clusters that do not name one.
        #[arg(short = 'n', long, default_value = "default")]
        namespace: String,
        /// Leave out ServiceMonitor and PrometheusRule, as on a cluster without the
        /// Prometheus Operator.
        #[arg(long)]
        no_monitoring: bool,
    },
    /// Run the operator against the cluster in KUBECONFIG or the in-cluster config.
    Run(RunArgs),
    /// Promote a rollout that awaits promotion (sets dchat.network/promote).
    Promote(TargetArgs),
    /// Abort the rollout in flight and send traffic back to the old slot (sets
    /// dchat.network/abort).
    Abort(TargetArgs),
    /// Take a backup of a DchatCluster now (creates a DchatBackup).
    Backup(BackupArgs),
}

#[derive(clap::Args, Debug)]
struct BackupArgs {
    /// DchatCluster name.
    name: String,
    /// Its namespace.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
    /// Wait until the backup is Completed (exit 0) or Failed (exit 1).
    #[arg(long)]
    wait: bool,
    /// Longest wait with --wait, e.g. 30m.
    #[arg(long, default_value = "30m", value_parser = parse_timeout)]
    timeout: Duration,
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    dchat_operator::quantity::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(clap::Args, Debug)]
struct TargetArgs {
    /// DchatCluster name.
    name: String,
    /// Its namespace.
    #[arg(short = 'n', long, default_value = "default")]
    namespace: String,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Namespace to watch; empty watches all namespaces.
    #[arg(long, env = "DCHAT_WATCH_NAMESPACE", default_value = "")]
    namespace: String,
    /// Address of the /metrics, /healthz and /readyz server.
    #[arg(long, env = "DCHAT_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Log format.
    #[arg(long, env = "DCHAT_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Namespace of the leader-election Lease (the operator's own namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "DCHAT_LEASE_NAME",
        default_value = "dchat-operator-leader"
    )]
    lease_name: String,
    /// This replica's identity in the Lease.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Disable leader election (one replica only, e.g. local development).
    #[arg(long, env = "DCHAT_DISABLE_LEADER_ELECTION")]
    disable_leader_election: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        // Colour codes only on a terminal: in a file, a pipe or a log collector they are
        // noise. NO_COLOR (https://no-color.org) turns them off on a terminal too.
        LogFormat::Text => builder
            .with_ansi(std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crd { name } => print_crds(name.as_deref()),
        Command::Rbac => print_yaml(&dchat_operator::rbac::policy_rules()),
        Command::Render {
            file,
            namespace,
            no_monitoring,
        } => {
            let options = RenderOptions {
                namespace,
                monitoring_available: !no_monitoring,
            };
            match render_file(&file, &options) {
                Ok(out) => {
                    print!("{out}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Promote(target) => rollout_command(target, RolloutCommand::Promote),
        Command::Abort(target) => rollout_command(target, RolloutCommand::Abort),
        Command::Backup(args) => backup_command(args),
        Command::Run(args) => {
            init_tracing(args.log_format);
            let runtime = match tokio::runtime::Runtime::new() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("error: starting the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    error!("{e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn rollout_command(target: TargetArgs, command: RolloutCommand) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    install_crypto_provider();
    let result = runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("loading Kubernetes configuration (KUBECONFIG or in-cluster)")?;
        request(client, &target.namespace, &target.name, command)
            .await
            .map_err(anyhow::Error::from)
    });
    match result {
        Ok(()) => {
            println!(
                "dchatcluster {}/{} annotated {}",
                target.namespace,
                target.name,
                command.annotation()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn backup_command(args: BackupArgs) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    install_crypto_provider();
    let result = runtime.block_on(async {
        let client = kube::Client::try_default()
            .await
            .context("loading Kubernetes configuration (KUBECONFIG or in-cluster)")?;
        let name = create_backup(client.clone(), &args.namespace, &args.name).await?;
        println!("dchatbackup {}/{name} created", args.namespace);
        if !args.wait {
            println!(
                "watch it: kubectl -n {} get dchatbackup {name} -w",
                args.namespace
            );
            return Ok(None);
        }
        let status = wait_for_backup(client, &args.namespace, &name, args.timeout).await?;
        Ok::<_, anyhow::Error>(Some(status))
    });
    match result {
        Ok(Some(status)) => {
            println!(
                "completed: {} bytes at {}",
                status.size_bytes.unwrap_or_default(),
                status.location.unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn print_crds(name: Option<&str>) -> ExitCode {
    let crds = [DchatCluster::crd(), DchatBackup::crd()];
    let chosen: Vec<_> = crds
        .iter()
        .filter(|crd| name.is_none() || crd.metadata.name.as_deref() == name)
        .collect();
    if chosen.is_empty() {
        let known: Vec<_> = crds
            .iter()
            .filter_map(|c| c.metadata.name.clone())
            .collect();
        eprintln!(
            "error: no CRD named {:?}; known: {}",
            name.unwrap_or_default(),
            known.join(", ")
        );
        return ExitCode::from(2);
    }
    for (index, crd) in chosen.iter().enumerate() {
        if chosen.len() > 1 && index > 0 {
            println!("---");
        }
        if print_yaml(crd) != ExitCode::SUCCESS {
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn print_yaml<T: serde::Serialize>(value: &T) -> ExitCode {
    match serde_norway::to_string(value) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn serve_http(addr: SocketAddr, state: HttpState) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics server to {addr}"))?;
    info!(%addr, "serving /metrics, /healthz, /readyz");
    axum::serve(listener, router(state))
        .await
        .context("metrics server")
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    install_crypto_provider();
    let metrics = Arc::new(Metrics::new());
    let config = kube::Config::infer()
        .await
        .context("loading Kubernetes configuration (KUBECONFIG or in-cluster)")?;
    let client = runner::counted_client(config, &metrics).context("building the API client")?;
    let ready = Arc::new(AtomicBool::new(false));
    let http = tokio::spawn(serve_http(
        args.metrics_addr,
        HttpState {
            metrics: metrics.clone(),
            ready: ready.clone(),
        },
    ));

    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = sigterm.recv() => info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => info!("interrupt: shutting down"),
        }
    };
    let options = Options {
        namespace: (!args.namespace.is_empty()).then(|| args.namespace.clone()),
        identity: args
            .identity
            .clone()
            .unwrap_or_else(|| format!("dchat-operator-{}", std::process::id())),
        leader_election: (!args.disable_leader_election).then(|| LeaderElection {
            lease_namespace: args.lease_namespace.clone(),
            lease_name: args.lease_name.clone(),
            lease_duration: LEASE_DURATION,
        }),
        discovery_interval: DISCOVERY_INTERVAL,
    };
    // A standby replica is healthy and ready: it serves metrics and waits for the lease.
    ready.store(true, Ordering::Relaxed);
    let result = runner::run(client, options, metrics, shutdown).await;
    http.abort();
    result.map_err(anyhow::Error::from)
}
