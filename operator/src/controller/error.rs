//! Why a reconcile failed: one error type for the controller, with a stable metric label.

use kube::api::PatchParams;

use super::status::Failure;
use crate::build::SerializeError;
use crate::labels::FIELD_MANAGER;

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
    #[error("{action} {kind} {namespace}/{name}: {}", describe(.source))]
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
    /// API discovery (which optional kinds the cluster serves) failed.
    #[error("asking the API server which kinds it serves: {}", describe(.0))]
    Discovery(#[source] kube::Error),
}

impl Error {
    /// A stable label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidSpec { .. } => "invalid_spec",
            Error::Kube { source, .. } | Error::Discovery(source) => match source {
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

    /// Whether retrying alone cannot fix this: the API server refused the request as
    /// unauthorized, forbidden or invalid (missing RBAC, an admission policy, a quota).
    /// Status then says `Stalled` instead of `Reconciling`; the operator still retries.
    pub fn needs_intervention(&self) -> bool {
        match self {
            Error::InvalidSpec { .. } => true,
            Error::Kube {
                source: kube::Error::Api(status),
                ..
            } => matches!(status.code, 400 | 401 | 403 | 422),
            _ => false,
        }
    }

    /// How status reports this error.
    pub fn as_failure(&self) -> Failure {
        Failure {
            message: self.to_string(),
            needs_intervention: self.needs_intervention(),
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

/// A kube error as a person reads it in a condition or Event: the API server's message,
/// reason and code, without kube's debug dump of the whole `Status`.
pub fn describe(err: &kube::Error) -> String {
    match err {
        kube::Error::Api(status) => {
            let reason = if status.reason.is_empty() {
                String::new()
            } else {
                format!("{}, ", status.reason)
            };
            format!("{} ({reason}HTTP {})", status.message, status.code)
        }
        other => other.to_string(),
    }
}

pub(super) fn is_not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(status) if status.is_not_found())
}

/// Parameters of the operator's non-apply patches (finalizer, annotations): under its own
/// field manager, so `managedFields` says who changed what.
pub(super) fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api_error(code: u16) -> Error {
        Error::Kube {
            action: "applying",
            kind: "StatefulSet".into(),
            namespace: "apps".into(),
            name: "chat-blue".into(),
            source: kube::Error::Api(
                kube::core::Status::failure("refused", "Forbidden")
                    .with_code(code)
                    .boxed(),
            ),
        }
    }

    #[test]
    fn refusals_need_a_person_and_outages_do_not() {
        for code in [400, 401, 403, 422] {
            assert!(api_error(code).needs_intervention(), "{code}");
        }
        for code in [404, 409, 429, 500, 503] {
            assert!(!api_error(code).needs_intervention(), "{code}");
        }
        let failure = api_error(403).as_failure();
        assert!(failure
            .message
            .contains("applying StatefulSet apps/chat-blue"));
        assert!(failure.needs_intervention);
    }

    #[test]
    fn an_api_error_reads_as_the_servers_message_reason_and_code() {
        assert_eq!(
            api_error(422).to_string(),
            "applying StatefulSet apps/chat-blue: refused (Forbidden, HTTP 422)"
        );
        let discovery = Error::Discovery(kube::Error::Api(
            kube::core::Status::failure("the server is down", "")
                .with_code(503)
                .boxed(),
        ));
        assert_eq!(
            discovery.to_string(),
            "asking the API server which kinds it serves: the server is down (HTTP 503)"
        );
    }
}
