//! `dchat-relay`: runs one relay until SIGTERM/SIGINT, then drains.
#![forbid(unsafe_code)]

use clap::Parser;
use dchat_relay::config::{Cli, Config, StorageSettings};
use dchat_relay::server::{Relay, ServerError};
use dchat_relay::store::StoreError;

/// jemalloc instead of glibc's malloc: the relay allocates and frees small buffers at a
/// high rate on its runtime threads while the store's writer thread frees the storage
/// engine's blocks, and in glibc's allocator that cost ~18 % of the reconnect drain's
/// core (consolidation and free-list walks). With jemalloc S3's put phase and drain ran
/// ~16 % and ~18 % faster (11 alternated runs) and S2 sustained 250k deliveries/s more
/// often; S1 and S4 unchanged (docs/performance.md). Feature `jemalloc`: on in the
/// image, the tests and the benchmarks.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let cfg = match Config::from_cli(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("dchat-relay: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    init_logging(&cfg);
    raise_fd_limit(&cfg);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dchat-relay: cannot start the async runtime: {e}");
            return std::process::ExitCode::from(1);
        }
    };
    match rt.block_on(run(cfg)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // Not `{e:#}`: the relay's errors already name their cause in their message,
        // so the alternate form would print every cause twice.
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("dchat-relay: {e}");
            std::process::ExitCode::from(exit_code(&e))
        }
    }
}

/// 2 for a data directory this release refuses to read (invalid input, like an invalid
/// setting), 1 for every other failure.
fn exit_code(e: &anyhow::Error) -> u8 {
    match e.downcast_ref::<ServerError>() {
        Some(ServerError::Store(StoreError::PreReleaseData { .. })) => 2,
        _ => 1,
    }
}

/// Raises the open-file soft limit to the hard limit (see `dchat_relay::fd_limit`) and
/// warns when the settings allow more connections than that. Not fatal: the relay still
/// serves, and accepting pauses while descriptors are exhausted.
fn raise_fd_limit(cfg: &Config) {
    let show = |l: Option<u64>| l.map_or("unlimited".to_string(), |l| l.to_string());
    let limit = match dchat_relay::fd_limit::raise_to_hard() {
        Ok(r) => {
            if r.before != r.now {
                tracing::info!(
                    from = %show(r.before),
                    to = %show(r.now),
                    "raised the open-file limit to its hard limit"
                );
            }
            r.now
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not raise the open-file limit");
            return;
        }
    };
    let needed = dchat_relay::fd_limit::needed(cfg);
    if let Some(limit) = limit.filter(|l| *l < needed) {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit is below DCHAT_MAX_CONNECTIONS + 2 x DCHAT_MAX_HANDSHAKES + {}: \
             connections fail before those bounds are reached",
            dchat_relay::fd_limit::RESERVED
        );
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only on a terminal: log collectors (and tests) read plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    if cfg.log_json {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let backend = match &cfg.storage {
        StorageSettings::Embedded { dir, options } => format!(
            "embedded ({}, write buffer {} MiB)",
            dir.display(),
            options.write_buffer_bytes >> 20
        ),
        StorageSettings::Postgres {
            host, port, dbname, ..
        } => {
            format!("postgres ({host}:{port}/{dbname})")
        }
    };
    if cfg.chain_rpc.is_some() {
        tracing::info!("DCHAT_CHAIN_RPC is set; it is reserved and not used by this version");
    }
    let relay = Relay::bind(cfg).await?;
    tracing::info!(
        listen = %relay.local_addr(),
        metrics = %relay.metrics_addr(),
        storage = %backend,
        "dchat-relay started"
    );
    let report = relay.run(dchat_relay::shutdown::signal()).await?;
    if report.abandoned_connections > 0 || !report.flushed {
        anyhow::bail!(
            "drain incomplete: {} connections abandoned, storage flushed: {}",
            report.abandoned_connections,
            report.flushed
        );
    }
    Ok(())
}
