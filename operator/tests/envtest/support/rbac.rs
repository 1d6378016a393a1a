//! The operator's identity on the control plane: the chart's own RBAC objects, rendered
//! with the Helm SDK and applied as they are, and a ServiceAccount token from the
//! TokenRequest API. A request the API server refuses with 403 is recorded by a client
//! layer, so a test can fail on any missing rule.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use http::{Request, Response};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::Client;

/// Namespace the chart is installed into (its ServiceAccount and the leader Lease).
pub const RELEASE_NAMESPACE: &str = "dchat-system";
/// The chart's ServiceAccount.
pub const SERVICE_ACCOUNT: &str = "dchat-operator";

const RBAC_KINDS: &[&str] = &[
    "ServiceAccount",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
];

/// Renders `charts/dchat-operator` with default values (a cluster-wide install) through
/// scripts/checks/render_chart.py in the project's .venv; once per test binary.
fn render_chart() -> Vec<serde_json::Value> {
    rendered_chart()
}

/// Every object `charts/dchat-operator` renders with default values (as JSON, each as
/// render_chart.py prints it).
pub fn rendered_chart() -> Vec<serde_json::Value> {
    static RENDERED: std::sync::OnceLock<Vec<serde_json::Value>> = std::sync::OnceLock::new();
    RENDERED.get_or_init(render_chart_now).clone()
}

fn render_chart_now() -> Vec<serde_json::Value> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let python = std::env::var("DCHAT_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| root.join(".venv/bin/python"));
    assert!(
        python.is_file(),
        "{} missing: the real-control-plane tests render the chart's RBAC with the Helm SDK; \
         run scripts/ensure-deps.sh (or set DCHAT_PYTHON)",
        python.display()
    );
    let out = Command::new(&python)
        .arg(root.join("scripts/checks/render_chart.py"))
        .arg(root.join("charts/dchat-operator"))
        .arg(RELEASE_NAMESPACE)
        .output()
        .expect("running render_chart.py");
    assert!(
        out.status.success(),
        "rendering the chart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("render_chart.py prints a JSON list")
}

/// Installs the chart's ServiceAccount, ClusterRole, Role and bindings; returns a token
/// of the ServiceAccount.
pub async fn install(admin: &Client) -> String {
    let apply = PatchParams::apply("envtest").force();
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    namespaces
        .patch(
            RELEASE_NAMESPACE,
            &apply,
            &Patch::Apply(serde_json::json!({
                "apiVersion": "v1", "kind": "Namespace",
                "metadata": {"name": RELEASE_NAMESPACE}
            })),
        )
        .await
        .expect("creating the release namespace");
    let objects = render_chart();
    let mut installed = 0;
    for object in objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        if !RBAC_KINDS.contains(&kind) {
            continue;
        }
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(admin.clone(), ns, &resource),
            None => Api::all_with(admin.clone(), &resource),
        };
        api.patch(&name, &apply, &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("applying the chart's {kind} {name}: {e}"));
        installed += 1;
    }
    assert!(
        installed >= 5,
        "the chart rendered {installed} RBAC objects"
    );
    token(admin).await
}

/// The rules of the chart's ClusterRole.
pub fn chart_rules() -> Vec<serde_json::Value> {
    render_chart()
        .into_iter()
        .find(|o| o["kind"] == "ClusterRole")
        .and_then(|o| o["rules"].as_array().cloned())
        .expect("the chart renders a ClusterRole with rules")
}

/// Makes ServiceAccount `account` in `namespace` with a ClusterRole of exactly `rules`
/// (e.g. the chart's minus one, as an outdated install would have); returns its token.
pub async fn install_account(
    admin: &Client,
    namespace: &str,
    account: &str,
    rules: Vec<serde_json::Value>,
) -> String {
    let apply = PatchParams::apply("envtest").force();
    let role_name = format!("{namespace}-{account}");
    let objects = [
        serde_json::json!({
            "apiVersion": "v1", "kind": "ServiceAccount",
            "metadata": {"name": account, "namespace": namespace},
        }),
        serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
            "metadata": {"name": role_name}, "rules": rules,
        }),
        serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": {"name": role_name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role_name},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        }),
    ];
    for object in objects {
        let kind = object["kind"].as_str().unwrap_or_default();
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
        let name = object["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(admin.clone(), ns, &resource),
            None => Api::all_with(admin.clone(), &resource),
        };
        api.patch(&name, &apply, &Patch::Apply(&object))
            .await
            .unwrap_or_else(|e| panic!("applying {kind} {name}: {e}"));
    }
    token_of(admin, namespace, account).await
}

async fn token(admin: &Client) -> String {
    token_of(admin, RELEASE_NAMESPACE, SERVICE_ACCOUNT).await
}

async fn token_of(admin: &Client, namespace: &str, account: &str) -> String {
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), namespace);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(4 * 3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let answer = accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .expect("a token for the operator's ServiceAccount");
    answer.status.expect("token in the answer").token
}

/// Requests the API server refused with 403 Forbidden: "METHOD path" each.
#[derive(Clone, Default)]
pub struct Refusals(Arc<Mutex<Vec<String>>>);

impl Refusals {
    /// Forgets what was recorded so far.
    pub fn clear(&self) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Everything refused so far.
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl<S> tower::Layer<S> for Refusals {
    type Service = RecordRefusals<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RecordRefusals {
            inner,
            refusals: self.clone(),
        }
    }
}

/// The service [`Refusals`] wraps around the client's stack.
pub struct RecordRefusals<S> {
    inner: S,
    refusals: Refusals,
}

impl<S, B, RB> tower::Service<Request<B>> for RecordRefusals<S>
where
    S: tower::Service<Request<B>, Response = Response<RB>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    RB: 'static,
{
    type Response = Response<RB>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Response<RB>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<B>) -> Self::Future {
        let what = format!("{} {}", request.method(), request.uri().path());
        let refusals = self.refusals.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if response.status() == http::StatusCode::FORBIDDEN {
                refusals
                    .0
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(what);
            }
            Ok(response)
        })
    }
}
