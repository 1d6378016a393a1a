//! Process signals that start a drain.

/// Resolves on SIGTERM or SIGINT (Ctrl-C). If a signal handler cannot be installed,
/// falls back to the other one so the process can still be stopped cleanly.
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received"),
                    r = tokio::signal::ctrl_c() => {
                        if r.is_ok() { tracing::info!("SIGINT received") }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C drains");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
