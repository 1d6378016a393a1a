//! The plugin's one error type: every way a command can fail, each naming the object and
//! namespace it was about, with the exit code it ends the process with.

use std::time::Duration;

/// Why a `kubectl dchat` command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No usable kubeconfig, context or in-cluster configuration.
    #[error("kubeconfig: {0}")]
    Config(String),
    /// The DchatCluster does not exist.
    #[error("DchatCluster \"{name}\" not found in namespace \"{namespace}\"")]
    ClusterNotFound {
        /// Namespace looked in.
        namespace: String,
        /// Name asked for.
        name: String,
    },
    /// The API server refused the request for lack of permission (RBAC).
    #[error(
        "forbidden: {action} in namespace \"{namespace}\" is not allowed for this user \
         (check with `kubectl auth can-i`): {message}"
    )]
    Forbidden {
        /// What was attempted, e.g. `patching DchatCluster "chat"`.
        action: String,
        /// Namespace of the request.
        namespace: String,
        /// The API server's message (names the user, verb and resource).
        message: String,
    },
    /// Any other API failure.
    #[error("{action} in namespace \"{namespace}\": {source}")]
    Api {
        /// What was attempted.
        action: String,
        /// Namespace of the request.
        namespace: String,
        /// The cause (boxed: kube's error is large and every result carries this type).
        #[source]
        source: Box<kube::Error>,
    },
    /// The object exists but does not look like what this plugin understands.
    #[error("{what}: {message}")]
    Unreadable {
        /// The object, e.g. `DchatCluster prod/chat`.
        what: String,
        /// What could not be read.
        message: String,
    },
    /// The request makes no sense in the cluster's current state (nothing to promote, …).
    #[error("{0}")]
    Refused(String),
    /// `--wait` saw the operator end the operation some other way than asked.
    #[error("{0}")]
    Ended(String),
    /// `--wait` ran out of time.
    #[error(
        "timed out after {}: still waiting for {what} (last seen: {last}); \
         is the operator running? `kubectl dchat status {name} -n {namespace}` shows more",
        format_timeout(*waited)
    )]
    TimedOut {
        /// What was awaited.
        what: String,
        /// The last observation.
        last: String,
        /// The DchatCluster.
        name: String,
        /// Its namespace.
        namespace: String,
        /// How long it waited.
        waited: Duration,
    },
    /// Printing the result failed (e.g. a closed pipe).
    #[error("writing output: {0}")]
    Output(String),
}

impl Error {
    /// The process exit code: 2 for bad input or configuration, 1 for everything the
    /// cluster answered (not found, forbidden, refused, failed, timed out).
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) => 2,
            _ => 1,
        }
    }

    /// Classifies an API error of `action` (e.g. `reading DchatCluster "chat"`): 403
    /// becomes [`Error::Forbidden`], everything else [`Error::Api`]. Not-found is
    /// the caller's to decide, as only it knows which object was missing.
    pub fn api(action: impl Into<String>, namespace: &str, source: kube::Error) -> Self {
        let action = action.into();
        match &source {
            kube::Error::Api(status) if status.is_forbidden() => Self::Forbidden {
                action,
                namespace: namespace.to_string(),
                message: status.message.clone(),
            },
            _ => Self::Api {
                action,
                namespace: namespace.to_string(),
                source: Box::new(source),
            },
        }
    }

    /// The error of `dchat_operator::commands` (promote, abort, annotations), in the
    /// plugin's terms.
    pub fn from_command(error: dchat_operator::commands::CommandError) -> Self {
        use dchat_operator::commands::CommandError;
        match error {
            CommandError::NotFound { namespace, name } => Self::ClusterNotFound { namespace, name },
            CommandError::Kube {
                namespace,
                name,
                source,
            } => Self::api(
                format!("annotating DchatCluster \"{name}\""),
                &namespace,
                source,
            ),
        }
    }

    /// The error of `dchat_operator::commands` backups, in the plugin's terms.
    pub fn from_backup(error: dchat_operator::commands::BackupCommandError) -> Self {
        use dchat_operator::commands::BackupCommandError as E;
        match error {
            E::NotFound { namespace, name } => Self::ClusterNotFound { namespace, name },
            E::Kube {
                action,
                namespace,
                name,
                source,
            } => Self::api(format!("{action} \"{name}\""), &namespace, source),
            other @ E::NotConfigured { .. } => Self::Refused(other.to_string()),
            other @ (E::Failed { .. } | E::TimedOut { .. }) => Self::Ended(other.to_string()),
        }
    }
}

fn format_timeout(waited: Duration) -> String {
    crate::style::duration(waited.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Box::new(kube::core::Status {
            code,
            reason: reason.into(),
            message: format!(
                "dchatclusters.dchat.network \"chat\" is {reason}: User \"bob\" cannot patch"
            ),
            ..kube::core::Status::default()
        }))
    }

    #[test]
    fn forbidden_names_the_action_namespace_and_the_servers_message() {
        let error = Error::api(
            "patching DchatCluster \"chat\"",
            "prod",
            status(403, "Forbidden"),
        );
        let text = error.to_string();
        assert!(matches!(error, Error::Forbidden { .. }));
        assert!(text.starts_with("forbidden: patching DchatCluster \"chat\" in namespace \"prod\""));
        assert!(text.contains("User \"bob\" cannot patch"), "{text}");
        assert_eq!(error.exit_code(), 1);
    }

    #[test]
    fn other_api_errors_keep_their_cause() {
        let error = Error::api("reading x", "prod", status(500, "InternalError"));
        assert!(matches!(error, Error::Api { .. }));
    }

    #[test]
    fn not_found_names_cluster_and_namespace() {
        let text = Error::ClusterNotFound {
            namespace: "prod".into(),
            name: "chat".into(),
        }
        .to_string();
        assert_eq!(
            text,
            "DchatCluster \"chat\" not found in namespace \"prod\""
        );
    }

    #[test]
    fn configuration_errors_exit_2() {
        assert_eq!(Error::Config("no context x".into()).exit_code(), 2);
        let timed_out = Error::TimedOut {
            what: "condition Paused=True".into(),
            last: "no Paused condition".into(),
            name: "chat".into(),
            namespace: "prod".into(),
            waited: Duration::from_secs(90),
        };
        assert_eq!(timed_out.exit_code(), 1);
        assert!(timed_out.to_string().starts_with("timed out after 90s"));
    }
}
