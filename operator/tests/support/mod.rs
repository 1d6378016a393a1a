//! A reconcile harness on an in-memory Kubernetes API (kube-fake-client): create a
//! DchatCluster, run reconciles exactly as the controller would, play the StatefulSet
//! controller by setting status, inject API failures and count requests by verb.

#![allow(dead_code)]

use std::sync::{Arc, Mutex};

use dchat_operator::api::DchatCluster;
use dchat_operator::build::{PrometheusRule, ServiceMonitor};
use dchat_operator::controller::{self, Capabilities, Context, Error, OptionalKinds};
use dchat_operator::metrics::Metrics;
use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Client, Resource};
use kube_fake_client::{interceptor, ClientBuilder};

/// Namespace every scenario runs in.
pub const NS: &str = "apps";

/// One API request the operator made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// create, get, list, patch, patch_status, delete, replace, ...
    pub verb: &'static str,
    /// Object name, or the namespace for lists.
    pub target: String,
}

/// A failure to inject into the next matching requests.
#[derive(Clone, Debug)]
pub struct Fault {
    /// Verb to fail.
    pub verb: &'static str,
    /// HTTP code: 409 or 500.
    pub code: u16,
    /// How many more requests fail.
    pub remaining: usize,
}

/// The in-memory API with the operator's context.
pub struct Harness {
    pub client: Client,
    /// What the in-memory API serves of the optional kinds (it has no discovery).
    pub capabilities: Arc<Capabilities>,
    pub ctx: Arc<Context>,
    pub calls: Arc<Mutex<Vec<Call>>>,
    pub fault: Arc<Mutex<Option<Fault>>>,
}

fn record(
    calls: &Arc<Mutex<Vec<Call>>>,
    fault: &Arc<Mutex<Option<Fault>>>,
    verb: &'static str,
    target: &str,
) -> kube_fake_client::Result<()> {
    calls.lock().unwrap().push(Call {
        verb,
        target: target.to_string(),
    });
    let mut fault = fault.lock().unwrap();
    if let Some(f) = fault.as_mut() {
        if f.verb == verb && f.remaining > 0 {
            f.remaining -= 1;
            return Err(match f.code {
                409 => kube_fake_client::Error::Conflict(format!("injected conflict on {target}")),
                _ => kube_fake_client::Error::Internal(format!("injected failure on {target}")),
            });
        }
    }
    Ok(())
}

impl Harness {
    /// An empty cluster; `monitoring` says whether the Prometheus Operator CRDs exist.
    pub async fn new(monitoring: bool) -> Self {
        let calls: Arc<Mutex<Vec<Call>>> = Arc::default();
        let fault: Arc<Mutex<Option<Fault>>> = Arc::default();
        let (c, f) = (calls.clone(), fault.clone());
        macro_rules! hook {
            ($funcs:expr, $method:ident, $verb:literal, $target:expr) => {{
                let (c, f) = (c.clone(), f.clone());
                $funcs.$method(move |ctx| {
                    record(&c, &f, $verb, &$target(&ctx))?;
                    Ok(None)
                })
            }};
        }
        let funcs = interceptor::Funcs::new();
        let funcs = hook!(
            funcs,
            create,
            "create",
            |ctx: &interceptor::CreateContext<'_>| ctx
                .object
                .pointer("/metadata/name")
                .and_then(|v| v.as_str())
                .unwrap_or("")
                .to_string()
        );
        let funcs = hook!(funcs, get, "get", |ctx: &interceptor::GetContext<'_>| ctx
            .name
            .to_string());
        let funcs = hook!(funcs, list, "list", |ctx: &interceptor::ListContext<'_>| {
            ctx.namespace.unwrap_or("").to_string()
        });
        let funcs = hook!(funcs, patch, "patch", |ctx: &interceptor::PatchContext<
            '_,
        >| ctx.name.to_string());
        let funcs = hook!(
            funcs,
            patch_status,
            "patch_status",
            |ctx: &interceptor::PatchStatusContext<'_>| ctx.name.to_string()
        );
        let funcs = hook!(
            funcs,
            delete,
            "delete",
            |ctx: &interceptor::DeleteContext<'_>| ctx.name.to_string()
        );
        let funcs = hook!(
            funcs,
            replace,
            "replace",
            |ctx: &interceptor::ReplaceContext<'_>| ctx.name.to_string()
        );
        let funcs = hook!(
            funcs,
            update,
            "update",
            |_ctx: &interceptor::UpdateContext<'_>| String::new()
        );
        let funcs = hook!(
            funcs,
            replace_status,
            "replace_status",
            |ctx: &interceptor::ReplaceStatusContext<'_>| ctx.name.to_string()
        );
        let mut builder = ClientBuilder::new()
            .with_resource::<DchatCluster>()
            .with_status_subresource::<DchatCluster>()
            .with_resource::<dchat_operator::api::DchatBackup>()
            .with_status_subresource::<dchat_operator::api::DchatBackup>()
            .with_status_subresource::<StatefulSet>()
            .with_return_managed_fields()
            .with_interceptor_funcs(funcs);
        if monitoring {
            builder = builder
                .with_resource::<ServiceMonitor>()
                .with_resource::<PrometheusRule>();
        }
        let client = builder.build().await.expect("fake client builds");
        let capabilities = Arc::new(Capabilities::fixed(if monitoring {
            OptionalKinds::ALL
        } else {
            OptionalKinds::NONE
        }));
        let ctx = Arc::new(
            Context::new(
                client.clone(),
                Arc::new(Metrics::new()),
                Some("test".into()),
            )
            .with_capabilities(capabilities.clone()),
        );
        Self {
            client,
            capabilities,
            ctx,
            calls,
            fault,
        }
    }

    /// Creates `apps/<name>` with the spec YAML.
    pub async fn create_cluster(&self, name: &str, spec_yaml: &str) -> DchatCluster {
        self.create_cluster_in(NS, name, spec_yaml).await
    }

    /// Creates `<namespace>/<name>` with the spec YAML.
    pub async fn create_cluster_in(
        &self,
        namespace: &str,
        name: &str,
        spec_yaml: &str,
    ) -> DchatCluster {
        let mut cluster = DchatCluster::new(name, serde_norway::from_str(spec_yaml).unwrap());
        cluster.metadata.namespace = Some(namespace.into());
        cluster.metadata.generation = Some(1);
        Api::<DchatCluster>::namespaced(self.client.clone(), namespace)
            .create(&PostParams::default(), &cluster)
            .await
            .unwrap()
    }

    /// One reconcile of `<namespace>/<name>`.
    pub async fn reconcile_in(&self, namespace: &str, name: &str) -> Result<Action, Error> {
        let cluster = Api::<DchatCluster>::namespaced(self.client.clone(), namespace)
            .get(name)
            .await
            .unwrap();
        controller::reconcile(Arc::new(cluster), self.ctx.clone()).await
    }

    /// Replaces the whole spec of a cluster, as `kubectl apply` of a new file would.
    pub async fn update_spec(&self, name: &str, spec_yaml: &str) {
        let spec: serde_json::Value = serde_norway::from_str(spec_yaml).unwrap();
        let patch: json_patch::Patch = serde_json::from_value(serde_json::json!([
            {"op": "replace", "path": "/spec", "value": spec}
        ]))
        .unwrap();
        self.clusters()
            .patch(name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
            .unwrap();
    }

    /// The cluster API.
    pub fn clusters(&self) -> Api<DchatCluster> {
        Api::namespaced(self.client.clone(), NS)
    }

    /// The current cluster object.
    pub async fn cluster(&self, name: &str) -> DchatCluster {
        self.clusters().get(name).await.unwrap()
    }

    /// One reconcile of the current object, exactly as the controller runs it.
    pub async fn reconcile(&self, name: &str) -> Result<Action, Error> {
        let cluster = self.cluster(name).await;
        controller::reconcile(Arc::new(cluster), self.ctx.clone()).await
    }

    /// Reconciles until a reconcile sends no write (at most 5 times).
    pub async fn settle(&self, name: &str) {
        for _ in 0..5 {
            self.reset_calls();
            self.reconcile(name).await.unwrap();
            if self.writes().is_empty() {
                return;
            }
        }
        panic!(
            "cluster {name} did not settle: last writes {:?}",
            self.writes()
        );
    }

    /// Forgets the requests recorded so far.
    pub fn reset_calls(&self) {
        self.calls.lock().unwrap().clear();
    }

    /// Requests that change something.
    pub fn writes(&self) -> Vec<Call> {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|c| !matches!(c.verb, "get" | "list"))
            .cloned()
            .collect()
    }

    /// Every request recorded since the last reset.
    pub fn all_calls(&self) -> Vec<Call> {
        self.calls.lock().unwrap().clone()
    }

    /// Fails the next `count` requests of `verb` with HTTP `code`.
    pub fn inject(&self, verb: &'static str, code: u16, count: usize) {
        *self.fault.lock().unwrap() = Some(Fault {
            verb,
            code,
            remaining: count,
        });
    }

    /// Typed API of a namespaced kind.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.client.clone(), NS)
    }

    /// Whether `apps/<name>` of kind `K` exists.
    pub async fn exists<K>(&self, name: &str) -> bool
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
    {
        self.api::<K>().get_opt(name).await.unwrap().is_some()
    }

    /// Plays the StatefulSet controller: every desired pod exists, `ready` of them ready,
    /// all on the current revision.
    pub async fn set_statefulset_status(&self, name: &str, ready: i32) {
        self.set_statefulset_status_in(NS, name, ready).await
    }

    /// [`Self::set_statefulset_status`] in another namespace.
    pub async fn set_statefulset_status_in(&self, namespace: &str, name: &str, ready: i32) {
        let api: Api<StatefulSet> = Api::namespaced(self.client.clone(), namespace);
        let sts = api.get(name).await.unwrap();
        let desired = sts.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let status = StatefulSetStatus {
            observed_generation: sts.metadata.generation,
            replicas: desired,
            ready_replicas: Some(ready),
            available_replicas: Some(ready),
            updated_replicas: Some(desired),
            current_replicas: Some(desired),
            current_revision: Some("rev-1".into()),
            update_revision: Some("rev-1".into()),
            ..StatefulSetStatus::default()
        };
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": status})),
        )
        .await
        .unwrap();
    }

    /// First reconcile, then all relays ready, then settled.
    pub async fn set_statefulset_status_after_reconcile(&self, name: &str) {
        self.reconcile(name).await.unwrap();
        let cluster = self.cluster(name).await;
        let replicas = cluster.spec.replicas;
        let slot = cluster.status.map(|s| s.active_slot).unwrap_or_default();
        self.set_statefulset_status(&format!("{name}-{slot}"), replicas)
            .await;
        self.settle(name).await;
    }
}
