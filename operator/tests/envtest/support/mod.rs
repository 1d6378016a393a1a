//! Test support on a real control plane: one shared control plane per test binary (a
//! private one for tests that change cluster-wide state), a namespace per test, the chart's
//! RBAC for the operator, a stand-in kubelet, and waiting helpers.

pub mod kubelet;
pub mod operator;
pub mod plane;
pub mod rbac;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use dchat_operator::api::{DchatBackup, DchatCluster, Phase};
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use k8s_openapi::NamespaceResourceScope;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, CustomResourceExt, Resource};
use serde::de::DeserializeOwned;

use kubelet::Kubelet;
use operator::{Replica, RunningOperator};
use plane::{locate, ControlPlane, Location};

/// Longest wait for anything in these scenarios.
pub const TIMEOUT: Duration = Duration::from_secs(120);
/// Field manager of what the tests apply (as `kubectl apply --server-side` would).
pub const USER: &str = "envtest-user";

struct Shared {
    plane: Arc<ControlPlane>,
    token: String,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

/// Installs the generated CRD and the chart's RBAC; returns the operator's token.
async fn prepare(plane: &ControlPlane) -> String {
    let admin = plane.admin().await;
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    for crd in [DchatCluster::crd(), DchatBackup::crd()] {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply(USER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .expect("the API server accepts the generated CRD");
        tokio::time::timeout(
            TIMEOUT,
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD established in time")
        .expect("watching the CRD");
    }
    rbac::install(&admin).await
}

/// The binary's shared control plane, started and prepared by the first test that asks.
fn shared(scripts: &std::path::Path) -> &'static Shared {
    SHARED.get_or_init(|| {
        tokio::task::block_in_place(|| {
            let plane = Arc::new(ControlPlane::start(scripts, "shared"));
            let token = tokio::runtime::Handle::current().block_on(prepare(&plane));
            Shared { plane, token }
        })
    })
}

/// One test's world: a namespace of its own on a control plane, an admin client, and a
/// kubelet for its Pods.
pub struct Env {
    /// The test's namespace.
    pub ns: String,
    /// A client of the admin user (what a person with kubectl does).
    pub admin: Client,
    /// Plays the kubelet for the namespace's Pods.
    pub kubelet: Kubelet,
    plane: Arc<ControlPlane>,
    token: String,
}

impl Env {
    /// A namespace on the shared control plane, or `None` (skipped) without one.
    pub async fn shared(test: &str) -> Option<Env> {
        let scripts = match locate() {
            Location::Found(dir) => dir,
            Location::Skip(why) => {
                eprintln!("skipped {test}: {why}");
                return None;
            }
        };
        let shared = shared(&scripts);
        Some(Self::on(shared.plane.clone(), shared.token.clone(), test).await)
    }

    /// A namespace on a control plane of its own, for a test that changes cluster-wide
    /// state (installs CRDs, stops the API server).
    pub async fn private(test: &str) -> Option<Env> {
        let scripts = match locate() {
            Location::Found(dir) => dir,
            Location::Skip(why) => {
                eprintln!("skipped {test}: {why}");
                return None;
            }
        };
        let plane = tokio::task::block_in_place(|| Arc::new(ControlPlane::start(&scripts, test)));
        let token = prepare(&plane).await;
        Some(Self::on(plane, token, test).await)
    }

    async fn on(plane: Arc<ControlPlane>, token: String, test: &str) -> Env {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let short: String = test
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .take(40)
            .collect();
        let ns = format!(
            "{}-{}",
            short.trim_matches('-'),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        let admin = plane.admin().await;
        let namespaces: Api<Namespace> = Api::all(admin.clone());
        namespaces
            .patch(
                &ns,
                &PatchParams::apply(USER),
                &Patch::Apply(serde_json::json!({
                    "apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}
                })),
            )
            .await
            .expect("creating the test namespace");
        let kubelet = Kubelet::start(admin.clone(), &ns);
        Env {
            ns,
            admin,
            kubelet,
            plane,
            token,
        }
    }

    /// The control plane this test runs on.
    pub fn plane(&self) -> &ControlPlane {
        &self.plane
    }

    /// Starts an operator replica watching this namespace, alone (no leader election),
    /// as the chart's ServiceAccount.
    pub async fn operator(&self) -> RunningOperator {
        self.operator_with(Replica {
            namespace: self.ns.clone(),
            identity: format!("{}-op", self.ns),
            lease: None,
        })
        .await
    }

    /// Starts an operator replica as the chart's ServiceAccount.
    pub async fn operator_with(&self, replica: Replica) -> RunningOperator {
        let config = self.plane.token_config(&self.token).await;
        RunningOperator::start(config, replica)
    }

    /// Starts an operator (alone, watching this namespace) as a ServiceAccount granted
    /// only the chart's rules that `keep` keeps — an install whose RBAC is out of date.
    pub async fn operator_with_rules(
        &self,
        keep: impl Fn(&serde_json::Value) -> bool,
    ) -> RunningOperator {
        let rules = rbac::chart_rules()
            .into_iter()
            .filter(|r| keep(r))
            .collect();
        let token =
            rbac::install_account(&self.admin, &self.ns, "restricted-operator", rules).await;
        let config = self.plane.token_config(&token).await;
        RunningOperator::start(
            config,
            Replica {
                namespace: self.ns.clone(),
                identity: format!("{}-restricted", self.ns),
                lease: None,
            },
        )
    }

    /// Every object the operator manages for cluster `name`: (kind, name,
    /// resourceVersion), sorted. Secrets (the admin token) included.
    pub async fn children(&self, name: &str) -> Vec<(String, String, String)> {
        let selector = format!(
            "app.kubernetes.io/instance={name},app.kubernetes.io/managed-by={}",
            dchat_operator::labels::MANAGED_BY
        );
        let mut kinds: Vec<ApiResource> = dchat_operator::build::managed_kinds()
            .into_iter()
            .filter(|k| !k.needs_monitoring_crds)
            .map(|k| k.resource)
            .collect();
        kinds.push(ApiResource::erase::<k8s_openapi::api::core::v1::Secret>(&()));
        let mut out = Vec::new();
        for resource in kinds {
            let api: Api<DynamicObject> =
                Api::namespaced_with(self.admin.clone(), &self.ns, &resource);
            let list = api
                .list(&kube::api::ListParams::default().labels(&selector))
                .await
                .expect("listing children");
            for object in list.items {
                out.push((
                    resource.kind.clone(),
                    object.metadata.name.clone().unwrap_or_default(),
                    object.metadata.resource_version.clone().unwrap_or_default(),
                ));
            }
        }
        out.sort();
        out
    }

    /// Merge-patches an annotation onto the DchatCluster (a metadata-only change, which
    /// triggers a reconcile); returns the resourceVersion the change produced.
    pub async fn poke(&self, name: &str, value: &str) -> String {
        let patched = self
            .clusters()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({
                    "metadata": {"annotations": {"envtest/poke": value}}
                })),
            )
            .await
            .expect("annotating the DchatCluster");
        patched.metadata.resource_version.unwrap_or_default()
    }

    /// The namespace's objects of kind `K`.
    pub fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>,
    {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    /// Applies every document of a YAML file of the project (e.g. `examples/dev.yaml`)
    /// into the namespace, as `kubectl apply -n <ns> --server-side -f` would.
    pub async fn apply_file(&self, relative: &str) {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(relative);
        let text = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        for document in serde_norway::Deserializer::from_str(&text) {
            let value: serde_json::Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{relative}: {e}"));
            if value.is_null() {
                continue;
            }
            self.apply(&value)
                .await
                .unwrap_or_else(|e| panic!("applying {relative}: {e}"));
        }
    }

    /// Server-side applies one namespaced object into the namespace.
    pub async fn apply(&self, object: &serde_json::Value) -> Result<DynamicObject, kube::Error> {
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let api: Api<DynamicObject> = Api::namespaced_with(self.admin.clone(), &self.ns, &resource);
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        api.patch(
            name,
            &PatchParams::apply(USER).force(),
            &Patch::Apply(object),
        )
        .await
    }

    /// Applies a DchatCluster `name` with `spec` (YAML).
    pub async fn apply_cluster(
        &self,
        name: &str,
        spec: &str,
    ) -> Result<DynamicObject, kube::Error> {
        let spec: serde_json::Value = serde_norway::from_str(spec).expect("spec YAML");
        self.apply(&serde_json::json!({
            "apiVersion": "dchat.network/v1alpha1",
            "kind": "DchatCluster",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .await
    }

    /// The DchatClusters of the namespace.
    pub fn clusters(&self) -> Api<DchatCluster> {
        self.api()
    }

    /// The DchatCluster `name` now.
    pub async fn cluster(&self, name: &str) -> DchatCluster {
        self.clusters()
            .get(name)
            .await
            .expect("reading the DchatCluster")
    }

    /// Applies `examples/dev.yaml` (the DchatCluster `dchat-dev`) and waits until it is
    /// `Running`; returns it then.
    pub async fn dev_cluster_running(&self) -> DchatCluster {
        self.apply_file("examples/dev.yaml").await;
        self.wait_cluster("dchat-dev", "Running", running).await
    }

    /// Waits until the DchatCluster `name` satisfies `ok`; returns it then.
    pub async fn wait_cluster(
        &self,
        name: &str,
        what: &str,
        ok: impl Fn(&DchatCluster) -> bool,
    ) -> DchatCluster {
        let clusters = self.clusters();
        let mut last = None;
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if let Ok(cluster) = clusters.get(name).await {
                if ok(&cluster) {
                    return cluster;
                }
                last = Some(cluster);
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {name}: {what}; last status: {}",
                    serde_json::to_string_pretty(&last.and_then(|c| c.status)).unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// The object `name` of kind `K`, if it exists.
    pub async fn get<K>(&self, name: &str) -> Option<K>
    where
        K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
            + Clone
            + DeserializeOwned
            + std::fmt::Debug,
    {
        self.api::<K>()
            .get_opt(name)
            .await
            .expect("reading an object")
    }

    /// The namespace's Events with `reason`.
    pub async fn events(&self, reason: &str) -> Vec<Event> {
        self.api::<Event>()
            .list(&ListParams::default())
            .await
            .expect("listing Events")
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some(reason))
            .collect()
    }
}

/// Polls `probe` until it gives a value; panics after [`TIMEOUT`] naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The condition `type_` of a cluster's status.
pub fn condition<'a>(cluster: &'a DchatCluster, type_: &str) -> Option<&'a Condition> {
    cluster
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// `status` of the condition `type_` ("True", "False", "Unknown"), or "" when absent.
pub fn condition_status(cluster: &DchatCluster, type_: &str) -> String {
    condition(cluster, type_)
        .map(|c| c.status.clone())
        .unwrap_or_default()
}

/// Whether the status describes the current generation.
pub fn observed(cluster: &DchatCluster) -> bool {
    cluster.status.as_ref().and_then(|s| s.observed_generation) == cluster.metadata.generation
}

/// Whether the current generation is `Running`.
pub fn running(cluster: &DchatCluster) -> bool {
    observed(cluster)
        && cluster
            .status
            .as_ref()
            .is_some_and(|s| s.phase == Phase::Running)
}

/// Whether the current generation runs `n` ready relays.
pub fn ready_with(n: i32) -> impl Fn(&DchatCluster) -> bool {
    move |c| {
        observed(c)
            && c.status
                .as_ref()
                .is_some_and(|s| s.phase == Phase::Running && s.ready_replicas == n)
    }
}
