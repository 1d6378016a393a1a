//! Why a reconcile failed: one error type for the controller, with a stable metric label.

use crate::build::SerializeError;

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The spec breaks a rule the schema cannot check; waits for a spec change.
    #[error("invalid spec of {cluster}: {message}")]
    InvalidSpec {
        /// namespace/name.
        cluster: String,
        /// Which fields are wrong.
        message: String,
    },
    /// A Kubernetes API call failed.
    #[error("{action} {kind} {namespace}/{name}: {source}")]
    Kube {
        /// What the operator was doing ("applying", "listing", ...).
        action: &'static str,
        /// Kind of object.
        kind: String,
        /// Namespace.
        namespace: String,
        /// Object name (empty for lists).
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// A child could not be serialized (a bug).
    #[error(transparent)]
    Serialize(#[from] SerializeError),
    /// The object lacks a namespace (the CRD is namespaced, so this is a bug).
    #[error("DchatCluster {0} has no namespace")]
    NoNamespace(String),
    /// The operating system could not provide randomness for the admin token.
    #[error("generating the relays' admin token: {0}")]
    Random(String),
}

impl Error {
    /// A stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::Kube { source, .. } => match source {
                kube::Error::Api(status) if status.code == 409 => "conflict",
                kube::Error::Api(status) if status.code >= 500 => "api_server",
                kube::Error::Api(_) => "api_request",
                _ => "transport",
            },
            Error::Serialize(_) => "serialize",
            Error::NoNamespace(_) => "internal",
            Error::Random(_) => "random",
        }
    }

    /// Whether only a spec change can fix this.
    pub fn is_invalid_spec(&self) -> bool {
        self.metric_label() == "invalid_spec"
    }
}

pub(super) fn kube_error(
    action: &'static str,
    kind: &str,
    namespace: &str,
    name: &str,
) -> impl FnOnce(kube::Error) -> Error {
    let (kind, namespace, name) = (kind.to_string(), namespace.to_string(), name.to_string());
    move |source| Error::Kube {
        action,
        kind,
        namespace,
        name,
        source,
    }
}

pub(super) fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.is_not_found())
}
