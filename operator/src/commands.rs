//! `dchat-operator promote` and `dchat-operator abort`: set the rollout annotations on a
//! DchatCluster, the same thing `kubectl annotate` does, so runbooks and pipelines have
//! one command.

use kube::api::{Api, Patch, PatchParams};
use kube::Client;
use serde_json::json;

use crate::api::DchatCluster;
use crate::labels::CLI_FIELD_MANAGER;
use crate::rollout::{ABORT_ANNOTATION, PROMOTE_ANNOTATION};

/// What to ask of a rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RolloutCommand {
    /// Promote a rollout awaiting promotion.
    Promote,
    /// Abort the rollout in flight and return traffic to the old slot.
    Abort,
}

impl RolloutCommand {
    /// The annotation that carries the request.
    pub fn annotation(self) -> &'static str {
        match self {
            Self::Promote => PROMOTE_ANNOTATION,
            Self::Abort => ABORT_ANNOTATION,
        }
    }
}

/// The annotation could not be set.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// No such DchatCluster.
    #[error("DchatCluster {namespace}/{name} not found")]
    NotFound {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
    },
    /// The API call failed.
    #[error("annotating DchatCluster {namespace}/{name}: {source}")]
    Kube {
        /// Namespace.
        namespace: String,
        /// Name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Sets the command's annotation (value: the current time, for the audit trail) on
/// `namespace/name`. The operator acts on it at its next reconcile and removes it.
pub async fn request(
    client: Client,
    namespace: &str,
    name: &str,
    command: RolloutCommand,
) -> Result<(), CommandError> {
    let api: Api<DchatCluster> = Api::namespaced(client, namespace);
    let patch = json!({
        "metadata": {"annotations": {command.annotation(): k8s_openapi::jiff::Timestamp::now().to_string()}}
    });
    match api
        .patch(
            name,
            &PatchParams {
                field_manager: Some(CLI_FIELD_MANAGER.to_string()),
                ..PatchParams::default()
            },
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.is_not_found() => Err(CommandError::NotFound {
            namespace: namespace.to_string(),
            name: name.to_string(),
        }),
        Err(source) => Err(CommandError::Kube {
            namespace: namespace.to_string(),
            name: name.to_string(),
            source,
        }),
    }
}
