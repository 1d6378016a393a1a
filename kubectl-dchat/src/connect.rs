//! A client for the cluster the flags name, as kubectl would pick it: `--kubeconfig`,
//! else `$KUBECONFIG`, else `~/.kube/config`, else the in-cluster service account;
//! `--context` or the current context; `-n` or the context's namespace.

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::cli::KubeFlags;
use crate::error::Error;

/// A client and the namespace to work in.
pub struct Connection {
    /// The API client.
    pub client: Client,
    /// `-n`, or the context's default namespace.
    pub namespace: String,
}

/// Connects as the flags say. Nothing is sent yet: a wrong server shows in the first
/// request.
pub async fn connect(flags: &KubeFlags) -> Result<Connection, Error> {
    dchat_operator::runner::install_crypto_provider();
    let options = KubeConfigOptions {
        context: flags.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match &flags.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| Error::Config(format!("reading {}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?
        }
        // A context can only come from a kubeconfig, never from in-cluster settings.
        None if flags.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
        None => Config::infer()
            .await
            .map_err(|e| Error::Config(e.to_string()))?,
    };
    let namespace = flags
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| Error::Config(e.to_string()))?;
    Ok(Connection { client, namespace })
}
