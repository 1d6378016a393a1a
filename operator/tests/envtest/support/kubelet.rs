//! A stand-in kubelet: there are no nodes, so Pods stay Pending until this patches their
//! status the way a kubelet would. A policy decides each Pod's fate; the StatefulSet and
//! Job controllers then update their own status as on a real cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

/// What becomes of a Pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Running and Ready.
    Ready,
    /// Running, not Ready, its container in CrashLoopBackOff with growing restarts.
    CrashLoop,
    /// Its containers exited 0 (a Job's Pod).
    Succeed,
    /// Its containers exited 1 (a Job's Pod).
    Fail,
    /// Left alone (Pending).
    Pending,
    /// Its container exits with this code and termination message (a Job's Pod).
    Exit(i32, String),
}

type Policy = dyn Fn(&Pod) -> Fate + Send + Sync;

/// The name of the Job that owns `pod`, if any.
pub fn job_name(pod: &Pod) -> Option<&str> {
    pod.labels()
        .get("batch.kubernetes.io/job-name")
        .or_else(|| pod.labels().get("job-name"))
        .map(String::as_str)
}

/// The relay version a Pod runs: its first container's image tag.
pub fn image_tag(pod: &Pod) -> Option<String> {
    let image = pod.spec.as_ref()?.containers.first()?.image.clone()?;
    image.rsplit_once(':').map(|(_, tag)| tag.to_string())
}

/// Job Pods succeed, every other Pod becomes Ready.
pub fn default_fate(pod: &Pod) -> Fate {
    if job_name(pod).is_some() {
        Fate::Succeed
    } else {
        Fate::Ready
    }
}

/// The kubelet of one namespace; stops when dropped.
pub struct Kubelet {
    policy: Arc<Mutex<Box<Policy>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Kubelet {
    /// Starts playing the kubelet for the Pods of `namespace` with [`default_fate`].
    pub fn start(client: Client, namespace: &str) -> Self {
        let policy: Arc<Mutex<Box<Policy>>> = Arc::new(Mutex::new(Box::new(default_fate)));
        let pods: Api<Pod> = Api::namespaced(client, namespace);
        let p = policy.clone();
        let task = tokio::spawn(async move {
            let mut restarts: HashMap<String, (i32, Instant)> = HashMap::new();
            loop {
                if let Ok(list) = pods.list(&ListParams::default()).await {
                    for pod in list.items {
                        tick(&pods, &p, &mut restarts, &pod).await;
                    }
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        Self { policy, task }
    }

    /// Decides the fate of Pods from now on.
    pub fn set_policy(&self, policy: impl Fn(&Pod) -> Fate + Send + Sync + 'static) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = Box::new(policy);
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn tick(
    pods: &Api<Pod>,
    policy: &Mutex<Box<Policy>>,
    restarts: &mut HashMap<String, (i32, Instant)>,
    pod: &Pod,
) {
    let name = pod.name_any();
    // Its containers are gone the moment the kubelet is asked: finish the deletion.
    if pod.metadata.deletion_timestamp.is_some() {
        let _ = pods
            .delete(
                &name,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await;
        return;
    }
    let fate = (policy.lock().unwrap_or_else(|e| e.into_inner()))(pod);
    let restart_count = match &fate {
        Fate::CrashLoop => {
            let entry = restarts
                .entry(format!("{name}/{}", pod.uid().unwrap_or_default()))
                .or_insert((0, Instant::now() - Duration::from_secs(10)));
            if entry.1.elapsed() >= Duration::from_secs(1) {
                entry.0 += 1;
                entry.1 = Instant::now();
            }
            entry.0
        }
        _ => 0,
    };
    let Some(status) = desired_status(pod, fate, restart_count) else {
        return;
    };
    if already(pod, &status) {
        return;
    }
    let _ = pods
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await;
}

fn now() -> String {
    Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn condition(type_: &str, status: bool) -> Value {
    json!({"type": type_, "status": if status {"True"} else {"False"}, "lastTransitionTime": now()})
}

/// The status a kubelet would report for `pod` with `fate`; `None` leaves it alone.
pub fn desired_status(pod: &Pod, fate: Fate, restart_count: i32) -> Option<Value> {
    let containers = &pod.spec.as_ref()?.containers;
    let started = pod
        .status
        .as_ref()
        .and_then(|s| s.start_time.as_ref())
        .map(|t| t.0.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(now);
    let statuses = |ready: bool, state: Value, last: Value| -> Value {
        Value::Array(
            containers
                .iter()
                .map(|c| {
                    json!({
                        "name": c.name,
                        "image": c.image,
                        "imageID": "",
                        "ready": ready,
                        "started": ready,
                        "restartCount": restart_count,
                        "state": state,
                        "lastState": last,
                    })
                })
                .collect(),
        )
    };
    let exited_with = |code: i32, reason: &str, message: Option<&str>| {
        let mut terminated =
            json!({"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": now()});
        if let Some(message) = message {
            terminated["message"] = json!(message);
        }
        json!({ "terminated": terminated })
    };
    let exited = |code: i32, reason: &str| exited_with(code, reason, None);
    let base = |phase: &str, ready: bool, containers: Value| {
        json!({
            "phase": phase,
            "hostIP": "192.0.2.20",
            "podIP": "10.244.0.10",
            "startTime": started,
            "conditions": [
                condition("PodScheduled", true),
                condition("Initialized", true),
                condition("ContainersReady", ready),
                condition("Ready", ready),
            ],
            "containerStatuses": containers,
        })
    };
    Some(match fate {
        Fate::Pending => return None,
        Fate::Ready => base(
            "Running",
            true,
            statuses(true, json!({"running": {"startedAt": started}}), json!({})),
        ),
        Fate::CrashLoop => base(
            "Running",
            false,
            statuses(
                false,
                json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}),
                exited(1, "Error"),
            ),
        ),
        Fate::Succeed => base(
            "Succeeded",
            false,
            statuses(false, exited(0, "Completed"), json!({})),
        ),
        Fate::Fail => base(
            "Failed",
            false,
            statuses(false, exited(1, "Error"), json!({})),
        ),
        Fate::Exit(0, message) => base(
            "Succeeded",
            false,
            statuses(
                false,
                exited_with(0, "Completed", Some(&message)),
                json!({}),
            ),
        ),
        Fate::Exit(code, message) => base(
            "Failed",
            false,
            statuses(false, exited_with(code, "Error", Some(&message)), json!({})),
        ),
    })
}

/// Whether the Pod already shows what `status` would set (so no write is needed).
pub fn already(pod: &Pod, status: &Value) -> bool {
    let Some(current) = pod.status.as_ref() else {
        return false;
    };
    let phase = status["phase"].as_str();
    let ready = status["conditions"][3]["status"].as_str() == Some("True");
    let restarts = status["containerStatuses"][0]["restartCount"].as_i64();
    let current_ready = current
        .conditions
        .iter()
        .flatten()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let current_restarts = current
        .container_statuses
        .iter()
        .flatten()
        .next()
        .map(|c| i64::from(c.restart_count));
    current.phase.as_deref() == phase && current_ready == ready && current_restarts == restarts
}
