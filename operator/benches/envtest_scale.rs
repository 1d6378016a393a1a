//! The operator at scale on a real control plane (`../shared/envtest`: etcd,
//! kube-apiserver and kube-controller-manager 1.34 on loopback, no kubelet): the release
//! `dchat-operator run` binary as a process of its own, a cluster-wide stand-in kubelet,
//! and a fleet of DchatClusters (one per namespace, PostgreSQL, autoscaling, Ingress,
//! monitoring: every child kind) taken through three phases:
//!
//! - cold: every DchatCluster created at once, until all are Running;
//! - steady: nothing changes for a while; the operator must write nothing;
//! - rollout: `spec.version` changed on all at once, until every rollout is Complete.
//!
//! It prints Markdown tables (recorded in docs/performance.md): the operator's own API
//! requests by verb (its `dchat_operator_kube_requests_total`), the API server's
//! (`apiserver_request_total`, every client), 429s, CPU seconds of each process and the
//! operator's resident memory. Exits 0 with a note where no control plane exists, 1 when a
//! phase did not finish or the steady phase wrote.
//!
//! Run: `cargo bench -p dchat-operator --bench envtest_scale -- [CLUSTERS] [--replicas N]
//! [--steady SECONDS] [--timeout SECONDS] [--kcm-qps N]` (defaults 1000, 1, 300, 1800;
//! `--kcm-qps` restarts kube-controller-manager with that client-side request rate and
//! twice as much burst, instead of its default 20 and 30).

#[path = "../tests/envtest/support/kubelet.rs"]
#[allow(dead_code)]
mod kubelet;
#[path = "../tests/envtest/support/plane.rs"]
#[allow(dead_code)]
mod plane;
#[path = "../tests/envtest/support/rbac.rs"]
#[allow(dead_code)]
mod rbac;

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dchat_operator::api::{DchatBackup, DchatCluster, Phase, RolloutStep};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::{ApiResource, DynamicObject, GroupVersionKind};
use kube::runtime::wait::{await_condition, conditions};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use plane::{locate, ControlPlane, Location};

/// Field manager of what the benchmark applies.
const MANAGER: &str = "envtest-scale";
/// Namespace of the operator's ServiceAccount.
const OPERATOR_NAMESPACE: &str = "dchat-system";
/// Name of every DchatCluster (one per namespace).
const CLUSTER: &str = "relays";
/// Requests in flight when the benchmark creates or changes the fleet.
const CONCURRENCY: usize = 32;

struct Args {
    clusters: usize,
    replicas: i32,
    steady: Duration,
    timeout: Duration,
    kcm_qps: Option<u64>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        clusters: 1000,
        replicas: 1,
        steady: Duration::from_secs(300),
        timeout: Duration::from_secs(1800),
        kcm_qps: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut value = |name: &str| -> Result<u64, String> {
            it.next()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| format!("{name} needs a number"))
        };
        match arg.as_str() {
            // cargo bench passes --bench to every harness = false bench.
            "--bench" => {}
            "--replicas" => args.replicas = value("--replicas")? as i32,
            "--steady" => args.steady = Duration::from_secs(value("--steady")?),
            "--timeout" => args.timeout = Duration::from_secs(value("--timeout")?),
            "--kcm-qps" => args.kcm_qps = Some(value("--kcm-qps")?).filter(|&q| q > 0),
            other => {
                args.clusters = other
                    .parse()
                    .map_err(|_| format!("unknown argument {other:?}"))?
            }
        }
    }
    if args.clusters == 0 || args.replicas < 1 {
        return Err("CLUSTERS and --replicas must be at least 1".into());
    }
    Ok(args)
}

fn namespace(i: usize) -> String {
    format!("scale-{i:04}")
}

// ---------------------------------------------------------------- processes

/// `getconf CLK_TCK`: the unit of the CPU times in /proc/PID/stat.
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds of a process (its threads included).
fn cpu_seconds(pid: u32, ticks: f64) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name may hold spaces; the fields after it are fixed.
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (field(11) + field(12)) / ticks
}

/// A `/proc/PID/status` size field (`VmRSS:`, `VmHWM:`) in MiB.
fn status_mib(pid: u32, key: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The processes whose CPU time is reported, by name.
struct Processes {
    pids: Vec<(&'static str, u32)>,
    ticks: f64,
}

impl Processes {
    fn cpu(&self) -> BTreeMap<&'static str, f64> {
        self.pids
            .iter()
            .map(|(name, pid)| (*name, cpu_seconds(*pid, self.ticks)))
            .collect()
    }
}

/// The control plane's processes, from kube-up's pid files.
fn plane_pids(plane: &ControlPlane) -> Vec<(&'static str, u32)> {
    let run = plane
        .kubeconfig
        .parent()
        .unwrap_or(Path::new("."))
        .join("run");
    ["etcd", "kube-apiserver", "kube-controller-manager"]
        .into_iter()
        .filter_map(|name| {
            let pid = std::fs::read_to_string(run.join(format!("{name}.pid"))).ok()?;
            Some((name, pid.trim().parse().ok()?))
        })
        .collect()
}

/// Restarts kube-controller-manager with the command line kube-up gave it plus a
/// client-side request rate of `qps` (burst twice that), under the same pid file, so
/// `kube-down` stops it as its own.
fn restart_controller_manager(plane: &ControlPlane, qps: u64) -> Result<(), String> {
    use std::os::unix::process::CommandExt;
    let dir = plane.kubeconfig.parent().unwrap_or(Path::new("."));
    let pid_file = dir.join("run/kube-controller-manager.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .map_err(|e| format!("reading {}: {e}", pid_file.display()))?
        .trim()
        .parse()
        .map_err(|e| format!("{}: {e}", pid_file.display()))?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map_err(|e| format!("reading kube-controller-manager's command line: {e}"))?;
    let mut argv: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    if argv.is_empty() {
        return Err("kube-controller-manager's command line is empty".into());
    }
    let port = argv
        .iter()
        .find_map(|a| a.strip_prefix("--secure-port="))
        .map(str::to_string)
        .ok_or("kube-controller-manager has no --secure-port")?;
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let gone = Instant::now();
    // Gone, or a zombie left for whoever adopted it.
    let alive = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|r| !r.trim_start().starts_with('Z'))
        })
    };
    while alive() {
        if gone.elapsed() > Duration::from_secs(20) {
            return Err(format!("kube-controller-manager {pid} did not stop"));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    argv.push(format!("--kube-api-qps={qps}"));
    argv.push(format!("--kube-api-burst={}", qps * 2));
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("logs/kube-controller-manager.log"))
        .map_err(|e| format!("opening the controller-manager log: {e}"))?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    let child = Command::new(&argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting kube-controller-manager: {e}"))?;
    std::fs::write(&pid_file, child.id().to_string()).map_err(|e| e.to_string())?;
    let started = Instant::now();
    loop {
        let healthy = Command::new("curl")
            .args(["-fsSk", &format!("https://127.0.0.1:{port}/healthz")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if healthy {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            return Err("the restarted kube-controller-manager did not become healthy".into());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `dchat-operator run` as a process of its own; killed when dropped, and by a reaper
/// when the benchmark dies some other way.
struct OperatorProcess {
    child: Child,
    metrics: SocketAddr,
    log: PathBuf,
}

impl OperatorProcess {
    fn start(kubeconfig: &Path, log: PathBuf) -> Self {
        let metrics = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port for the operator's metrics");
        let out = std::fs::File::create(&log).expect("creating the operator log");
        let err = out.try_clone().expect("the operator log");
        let child = Command::new(env!("CARGO_BIN_EXE_dchat-operator"))
            .args(["run", "--disable-leader-election", "--metrics-addr"])
            .arg(metrics.to_string())
            .env("KUBECONFIG", kubeconfig)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("starting dchat-operator run");
        let reaper = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; kill "$2" 2>/dev/null"#;
        let _ = Command::new("bash")
            .args(["-c", reaper, "reaper"])
            .arg(std::process::id().to_string())
            .arg(child.id().to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        Self {
            child,
            metrics,
            log,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "the operator exited ({status}); log: {}",
                self.log.display()
            )),
            _ => None,
        }
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    Ok(response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default())
}

// ---------------------------------------------------------------- metrics

/// One sample of a Prometheus text exposition: `name{labels} value`.
fn samples<'a>(
    text: &'a str,
    name: &'a str,
) -> impl Iterator<Item = (BTreeMap<String, String>, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = match rest.strip_prefix('{') {
            Some(rest) => rest.rsplit_once('}')?,
            None if rest.starts_with(' ') => ("", rest),
            None => return None,
        };
        let value: f64 = value.split_whitespace().next()?.parse().ok()?;
        let mut map = BTreeMap::new();
        let mut remaining = labels;
        while let Some((key, after)) = remaining.split_once("=\"") {
            let mut end = 0;
            let bytes = after.as_bytes();
            while end < bytes.len()
                && !(bytes[end] == b'"' && (end == 0 || bytes[end - 1] != b'\\'))
            {
                end += 1;
            }
            map.insert(
                key.trim_start_matches(',').to_string(),
                after[..end].to_string(),
            );
            remaining = after.get(end + 1..).unwrap_or_default();
        }
        Some((map, value))
    })
}

/// Everything measured at one moment.
struct Sample {
    at: Instant,
    /// The operator's requests: (verb, resource, code) → count.
    operator: BTreeMap<(String, String, String), f64>,
    reconciles: f64,
    /// The API server's requests, every client: (verb, code) → count.
    apiserver: BTreeMap<(String, String), f64>,
    cpu: BTreeMap<&'static str, f64>,
    /// The API server's requests by "verb resource[/subresource]".
    by_resource: BTreeMap<String, f64>,
    /// 429 answers by "verb resource", and API Priority and Fairness rejections by
    /// flow schema.
    rejected: BTreeMap<String, f64>,
    rss_mib: f64,
    hwm_mib: f64,
}

const READ_VERBS: &[&str] = &["get", "list", "watch"];

impl Sample {
    async fn take(admin: &Client, operator: &OperatorProcess, processes: &Processes) -> Sample {
        let text = http_get(operator.metrics, "/metrics")
            .await
            .unwrap_or_default();
        let mut requests = BTreeMap::new();
        for (labels, value) in samples(&text, "dchat_operator_kube_requests_total") {
            let key = (
                labels.get("verb").cloned().unwrap_or_default(),
                labels.get("resource").cloned().unwrap_or_default(),
                labels.get("code").cloned().unwrap_or_default(),
            );
            *requests.entry(key).or_default() += value;
        }
        let reconciles = samples(&text, "dchat_operator_reconciles_total")
            .map(|(_, v)| v)
            .sum();
        let request = http::Request::get("/metrics")
            .body(Vec::new())
            .expect("a metrics request");
        let text = admin.request_text(request).await.unwrap_or_default();
        let mut apiserver = BTreeMap::new();
        let mut by_resource = BTreeMap::new();
        for (labels, value) in samples(&text, "apiserver_request_total") {
            // The API server's verbs are HTTP methods where the client's are not.
            let verb = match labels.get("verb").map(|v| v.to_ascii_lowercase()) {
                Some(v) if v == "post" => "create".to_string(),
                Some(v) if v == "put" => "update".to_string(),
                Some(v) => v,
                None => String::new(),
            };
            let resource = format!(
                "{} {}{}",
                verb,
                labels.get("resource").cloned().unwrap_or_default(),
                labels
                    .get("subresource")
                    .filter(|s| !s.is_empty())
                    .map(|s| format!("/{s}"))
                    .unwrap_or_default(),
            );
            *by_resource.entry(resource).or_default() += value;
            let key = (verb, labels.get("code").cloned().unwrap_or_default());
            *apiserver.entry(key).or_default() += value;
        }
        let mut rejected = BTreeMap::new();
        for (labels, value) in samples(&text, "apiserver_request_total") {
            if labels.get("code").map(String::as_str) == Some("429") {
                let key = format!(
                    "{} {}{}",
                    labels
                        .get("verb")
                        .cloned()
                        .unwrap_or_default()
                        .to_ascii_lowercase(),
                    labels.get("resource").cloned().unwrap_or_default(),
                    labels
                        .get("subresource")
                        .filter(|s| !s.is_empty())
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                );
                *rejected.entry(key).or_default() += value;
            }
        }
        for (labels, value) in samples(&text, "apiserver_flowcontrol_rejected_requests_total") {
            let key = format!(
                "flow schema {} ({})",
                labels.get("flow_schema").cloned().unwrap_or_default(),
                labels.get("reason").cloned().unwrap_or_default(),
            );
            *rejected.entry(key).or_default() += value;
        }
        Sample {
            by_resource,
            rejected,
            at: Instant::now(),
            operator: requests,
            reconciles,
            apiserver,
            cpu: processes.cpu(),
            rss_mib: status_mib(operator.pid(), "VmRSS:"),
            hwm_mib: status_mib(operator.pid(), "VmHWM:"),
        }
    }

    /// The operator's requests since `before`, by verb.
    fn operator_by_verb(&self, before: &Sample) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for ((verb, resource, code), value) in &self.operator {
            let key = (verb.clone(), resource.clone(), code.clone());
            let delta = value - before.operator.get(&key).copied().unwrap_or(0.0);
            *out.entry(verb.clone()).or_default() += delta;
        }
        out
    }

    /// The operator's writes since `before`: (verb, resource) → count.
    fn operator_writes(&self, before: &Sample) -> BTreeMap<(String, String), f64> {
        let mut out = BTreeMap::new();
        for ((verb, resource, code), value) in &self.operator {
            if READ_VERBS.contains(&verb.as_str()) {
                continue;
            }
            let key = (verb.clone(), resource.clone(), code.clone());
            let delta = value - before.operator.get(&key).copied().unwrap_or(0.0);
            if delta > 0.0 {
                *out.entry((verb.clone(), resource.clone())).or_default() += delta;
            }
        }
        out
    }

    fn operator_total(&self) -> f64 {
        self.operator.values().sum()
    }

    fn operator_writes_total(&self) -> f64 {
        self.operator
            .iter()
            .filter(|((verb, _, _), _)| !READ_VERBS.contains(&verb.as_str()))
            .map(|(_, v)| v)
            .sum()
    }

    fn operator_code(&self, before: &Sample, code: &str) -> f64 {
        let count = |s: &Sample| -> f64 {
            s.operator
                .iter()
                .filter(|((_, _, c), _)| c == code)
                .map(|(_, v)| v)
                .sum()
        };
        count(self) - count(before)
    }

    fn apiserver_by_verb(&self, before: &Sample) -> BTreeMap<String, f64> {
        let mut out = BTreeMap::new();
        for ((verb, code), value) in &self.apiserver {
            let delta = value
                - before
                    .apiserver
                    .get(&(verb.clone(), code.clone()))
                    .copied()
                    .unwrap_or(0.0);
            *out.entry(verb.clone()).or_default() += delta;
        }
        out
    }

    fn apiserver_code(&self, before: &Sample, code: &str) -> f64 {
        let count = |s: &Sample| -> f64 {
            s.apiserver
                .iter()
                .filter(|((_, c), _)| c == code)
                .map(|(_, v)| v)
                .sum()
        };
        count(self) - count(before)
    }
}

// ---------------------------------------------------------------- the fleet

/// What the benchmark knows of one DchatCluster, from its watch.
#[derive(Clone, Debug, Default)]
struct Seen {
    observed: bool,
    phase: Option<Phase>,
    version: Option<String>,
    step: Option<RolloutStep>,
}

type Fleet = Arc<Mutex<HashMap<String, Seen>>>;

fn watch_fleet(admin: Client) -> (Fleet, tokio::task::JoinHandle<()>) {
    let fleet: Fleet = Arc::default();
    let seen = fleet.clone();
    let api: Api<DchatCluster> = Api::all(admin);
    let task = tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            let (cluster, deleted) = match event {
                Ok(watcher::Event::Apply(c) | watcher::Event::InitApply(c)) => (c, false),
                Ok(watcher::Event::Delete(c)) => (c, true),
                _ => continue,
            };
            let key = cluster.namespace().unwrap_or_default();
            let mut fleet = seen.lock().unwrap_or_else(|e| e.into_inner());
            if deleted {
                fleet.remove(&key);
                continue;
            }
            let status = cluster.status.clone().unwrap_or_default();
            fleet.insert(
                key,
                Seen {
                    observed: status.observed_generation.is_some()
                        && status.observed_generation == cluster.metadata.generation,
                    phase: cluster.status.as_ref().map(|s| s.phase),
                    version: status.active_version.clone(),
                    step: status.rollout.as_ref().map(|r| r.step),
                },
            );
        }
    });
    (fleet, task)
}

/// Waits until `count` clusters satisfy `ok`; the time it took, or what the others were
/// doing when `timeout` passed (state → clusters).
async fn wait_fleet(
    fleet: &Fleet,
    count: usize,
    start: Instant,
    timeout: Duration,
    operator: &mut OperatorProcess,
    ok: impl Fn(&Seen) -> bool,
) -> Result<Duration, String> {
    loop {
        let (done, others) = {
            let fleet = fleet.lock().unwrap_or_else(|e| e.into_inner());
            let done = fleet.values().filter(|s| ok(s)).count();
            let mut others: BTreeMap<String, usize> = BTreeMap::new();
            for seen in fleet.values().filter(|s| !ok(s)) {
                let state = format!(
                    "phase={:?} step={:?} version={:?} observed={}",
                    seen.phase, seen.step, seen.version, seen.observed
                );
                *others.entry(state).or_default() += 1;
            }
            if fleet.len() < count {
                others.insert("not seen yet".into(), count - fleet.len());
            }
            (done, others)
        };
        if done >= count {
            return Ok(start.elapsed());
        }
        if let Some(why) = operator.exited() {
            return Err(why);
        }
        if start.elapsed() > timeout {
            return Err(format!(
                "{done}/{count} after {timeout:?}; the others: {others:#?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs `make(i)` for every cluster index, `CONCURRENCY` at a time.
async fn for_each_cluster<F, Fut>(clusters: usize, make: F)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    futures::stream::iter(0..clusters)
        .map(make)
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

fn cluster_spec(ns: &str, replicas: i32, version: &str) -> serde_json::Value {
    json!({
        "apiVersion": "dchat.network/v1alpha1",
        "kind": "DchatCluster",
        "metadata": {"name": CLUSTER, "namespace": ns},
        "spec": {
            "version": version,
            "replicas": replicas,
            "database": {"secretRef": {"name": "db"}},
            "autoscaling": {"enabled": true, "minReplicas": replicas, "maxReplicas": replicas + 2},
            "ingress": {"enabled": true, "host": format!("{ns}.example.com")},
            // Short windows: a rollout takes seconds once its relays are ready.
            "rollout": {
                "postPromotionWindow": "5s",
                "scaleDownDelay": "5s",
                "validation": {"readyTimeout": "20m"},
                "progressDeadline": "30m",
            },
        },
    })
}

fn resource_of(object: &serde_json::Value) -> ApiResource {
    let api_version = object["apiVersion"].as_str().unwrap_or_default();
    let kind = object["kind"].as_str().unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

/// Server-side applies `object` (namespaced when it names a namespace).
async fn apply(admin: &Client, object: &serde_json::Value) -> Result<(), kube::Error> {
    let resource = resource_of(object);
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(admin.clone(), ns, &resource),
        None => Api::all_with(admin.clone(), &resource),
    };
    api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(object),
    )
    .await
    .map(|_| ())
}

// ---------------------------------------------------------------- the kubelet

#[derive(Default)]
struct KubeletStats {
    /// Status patches sent.
    patches: AtomicU64,
    /// Pods whose deletion it finished.
    deletions: AtomicU64,
    /// When each status patch was sent: the Pods' arrival, so the rate at which the
    /// StatefulSet controller creates them.
    patched_at: Mutex<Vec<Instant>>,
}

impl KubeletStats {
    /// Pods patched in `[from, to]`: how many, and the first and last patch after `from`.
    fn patched_between(&self, from: Instant, to: Instant) -> (usize, Duration, Duration) {
        let times = self.patched_at.lock().unwrap_or_else(|e| e.into_inner());
        let within: Vec<Duration> = times
            .iter()
            .filter(|t| **t >= from && **t <= to)
            .map(|t| t.duration_since(from))
            .collect();
        let first = within.iter().min().copied().unwrap_or_default();
        let last = within.iter().max().copied().unwrap_or_default();
        (within.len(), first, last)
    }
}

/// One kubelet for every namespace, driven by a watch of all Pods: each Pod becomes
/// Ready (a Job's Pod: Succeeded) as `kubelet::default_fate` says.
fn start_kubelet(admin: Client, stats: Arc<KubeletStats>) -> tokio::task::JoinHandle<()> {
    let pods: Api<Pod> = Api::all(admin.clone());
    tokio::spawn(async move {
        watcher(pods, watcher::Config::default())
            .default_backoff()
            .applied_objects()
            .for_each_concurrent(CONCURRENCY, |pod| {
                let admin = admin.clone();
                let stats = stats.clone();
                async move {
                    if let Ok(pod) = pod {
                        play(&admin, &stats, &pod).await;
                    }
                }
            })
            .await;
    })
}

async fn play(admin: &Client, stats: &KubeletStats, pod: &Pod) {
    let ns = pod.namespace().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &ns);
    let name = pod.name_any();
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
        stats.deletions.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let fate = kubelet::default_fate(pod);
    let Some(status) = kubelet::desired_status(pod, fate, 0) else {
        return;
    };
    if kubelet::already(pod, &status) {
        return;
    }
    let _ = pods
        .patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await;
    stats.patches.fetch_add(1, Ordering::Relaxed);
    stats
        .patched_at
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Instant::now());
}

// ---------------------------------------------------------------- setup

async fn install_crds(admin: &Client) {
    let crds: Api<CustomResourceDefinition> = Api::all(admin.clone());
    let mut all = vec![DchatCluster::crd(), DchatBackup::crd()];
    // The Prometheus Operator's kinds, so ServiceMonitor and PrometheusRule are created.
    let monitoring = include_str!("../tests/envtest/fixtures/monitoring-crds.yaml");
    for document in serde_norway::Deserializer::from_str(monitoring) {
        all.push(serde::Deserialize::deserialize(document).expect("monitoring CRD fixture"));
    }
    for crd in all {
        let name = crd.metadata.name.clone().unwrap_or_default();
        crds.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        tokio::time::timeout(
            Duration::from_secs(60),
            await_condition(crds.clone(), &name, conditions::is_crd_established()),
        )
        .await
        .unwrap_or_else(|_| panic!("CRD {name} established in time"))
        .unwrap_or_else(|e| panic!("watching CRD {name}: {e}"));
    }
}

/// A kubeconfig for the operator: the control plane's server and CA, and the token of
/// a ServiceAccount bound to exactly `dchat-operator rbac`'s rules.
async fn operator_kubeconfig(plane: &ControlPlane, admin: &Client) -> PathBuf {
    apply(
        admin,
        &json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": OPERATOR_NAMESPACE}}),
    )
    .await
    .expect("creating the operator's namespace");
    let rules = serde_json::to_value(dchat_operator::rbac::policy_rules())
        .ok()
        .and_then(|v| v.as_array().cloned())
        .expect("the operator's rules as JSON");
    let token = rbac::install_account(admin, OPERATOR_NAMESPACE, "dchat-operator", rules).await;
    let admin_config: serde_json::Value = serde_norway::from_str(
        &std::fs::read_to_string(&plane.kubeconfig).expect("reading the admin kubeconfig"),
    )
    .expect("the admin kubeconfig");
    let cluster = &admin_config["clusters"][0]["cluster"];
    let config = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "envtest", "cluster": cluster}],
        "users": [{"name": "dchat-operator", "user": {"token": token}}],
        "contexts": [{"name": "envtest", "context": {"cluster": "envtest", "user": "dchat-operator"}}],
        "current-context": "envtest",
    });
    let path = plane
        .kubeconfig
        .parent()
        .unwrap_or(Path::new("."))
        .join("operator.kubeconfig");
    std::fs::write(&path, serde_json::to_vec(&config).expect("kubeconfig JSON"))
        .expect("writing the operator's kubeconfig");
    path
}

// ---------------------------------------------------------------- report

fn per_cluster_table(title: &str, columns: &[(&str, BTreeMap<String, f64>)], clusters: usize) {
    let mut verbs: Vec<String> = columns
        .iter()
        .flat_map(|(_, m)| m.keys().cloned())
        .collect();
    verbs.sort();
    verbs.dedup();
    println!("\n{title}\n");
    print!("| verb |");
    for (name, _) in columns {
        print!(" {name} |");
    }
    println!();
    print!("|---|");
    for _ in columns {
        print!("---:|");
    }
    println!();
    for verb in verbs.iter().chain(std::iter::once(&"total".to_string())) {
        print!("| {verb} |");
        for (_, m) in columns {
            let v = if verb == "total" {
                m.values().sum::<f64>()
            } else {
                m.get(verb).copied().unwrap_or(0.0)
            };
            print!(" {:.2} |", v / clusters as f64);
        }
        println!();
    }
}

struct PhaseReport {
    name: &'static str,
    seconds: f64,
    before: Sample,
    after: Sample,
}

fn cpu_table(phases: &[&PhaseReport]) {
    let names: Vec<&'static str> = phases[0].after.cpu.keys().copied().collect();
    println!("\nCPU seconds by process (2 cores: at most 2 s per wall second in all)\n");
    print!("| phase | wall (s) |");
    for name in &names {
        print!(" {name} |");
    }
    println!();
    print!("|---|---:|");
    for _ in &names {
        print!("---:|");
    }
    println!();
    for phase in phases {
        print!("| {} | {:.1} |", phase.name, phase.seconds);
        for name in &names {
            let used = phase.after.cpu.get(name).copied().unwrap_or(0.0)
                - phase.before.cpu.get(name).copied().unwrap_or(0.0);
            print!(" {used:.1} |");
        }
        println!();
    }
}

fn main() {
    let args = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let scripts = match locate() {
        Location::Found(dir) => dir,
        Location::Skip(why) => {
            println!("skipped: {why}");
            return;
        }
    };
    let plane = ControlPlane::start(&scripts, "scale");
    if let Some(qps) = args.kcm_qps {
        if let Err(e) = restart_controller_manager(&plane, qps) {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
        println!(
            "kube-controller-manager: --kube-api-qps={qps} --kube-api-burst={}",
            qps * 2
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let failed = runtime.block_on(bench(&plane, &args));
    drop(runtime);
    drop(plane);
    if failed {
        std::process::exit(1);
    }
}

/// Runs the three phases; true when one failed.
async fn bench(plane: &ControlPlane, args: &Args) -> bool {
    let n = args.clusters;
    let admin = plane.admin().await;
    install_crds(&admin).await;
    let kubeconfig = operator_kubeconfig(plane, &admin).await;
    for_each_cluster(n, |i| {
        let admin = admin.clone();
        async move {
            let ns = namespace(i);
            let objects = [
                json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
                json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": "db", "namespace": ns},
                    "stringData": {"host": "postgres.example", "port": "5432", "name": "dchat",
                                   "username": "dchat", "password": "bench"},
                }),
            ];
            for object in objects {
                apply(&admin, &object)
                    .await
                    .unwrap_or_else(|e| panic!("setting up {ns}: {e}"));
            }
        }
    })
    .await;

    let stats = Arc::new(KubeletStats::default());
    let kubelet_task = start_kubelet(admin.clone(), stats.clone());
    let (fleet, fleet_task) = watch_fleet(admin.clone());
    let log = std::env::temp_dir().join(format!("dchat-envtest-scale-{}.log", std::process::id()));
    let mut operator = OperatorProcess::start(&kubeconfig, log);
    let mut pids = plane_pids(plane);
    pids.push(("dchat-operator", operator.pid()));
    pids.push(("bench (kubelet, driver)", std::process::id()));
    let processes = Processes {
        pids,
        ticks: clock_ticks(),
    };
    // Started: its watches are open (the first watch request is counted when it returns,
    // so wait for its lists instead).
    let started = Instant::now();
    loop {
        let s = Sample::take(&admin, &operator, &processes).await;
        if s.operator
            .keys()
            .any(|(verb, resource, _)| verb == "list" && resource.starts_with("dchatclusters"))
        {
            break;
        }
        if let Some(why) = operator.exited() {
            eprintln!("FAIL: {why}");
            return true;
        }
        if started.elapsed() > Duration::from_secs(60) {
            eprintln!(
                "FAIL: the operator did not list DchatClusters within 60 s; log: {}",
                operator.log.display()
            );
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!(
        "{n} namespaces ready, operator started (log {}); load {}",
        operator.log.display(),
        load_average()
    );
    let mut failed = false;

    // ---- cold
    let load_cold = load_average();
    let before = Sample::take(&admin, &operator, &processes).await;
    let start = Instant::now();
    for_each_cluster(n, |i| {
        let admin = admin.clone();
        let replicas = args.replicas;
        async move {
            let ns = namespace(i);
            apply(&admin, &cluster_spec(&ns, replicas, "1.0.0"))
                .await
                .unwrap_or_else(|e| panic!("creating the DchatCluster in {ns}: {e}"));
        }
    })
    .await;
    let created = start.elapsed();
    let statused = wait_fleet(&fleet, n, start, args.timeout, &mut operator, |s| {
        s.observed
    })
    .await;
    let running = wait_fleet(&fleet, n, start, args.timeout, &mut operator, |s| {
        s.observed && s.phase == Some(Phase::Running)
    })
    .await;
    let after = Sample::take(&admin, &operator, &processes).await;
    let (cold_start, cold_end) = (start, Instant::now());
    if let Err(why) = &running {
        eprintln!("FAIL: cold: {why}");
        failed = true;
    }
    let cold = PhaseReport {
        name: "cold",
        seconds: after.at.duration_since(before.at).as_secs_f64(),
        before,
        after,
    };
    eprintln!(
        "cold done in {:.1} s; load {}",
        cold.seconds,
        load_average()
    );
    if failed {
        return true;
    }

    // ---- settle: until the operator has written nothing for 20 s
    let settle_start = Instant::now();
    let mut last_writes = cold.after.operator_writes_total();
    let mut quiet_since = Instant::now();
    while quiet_since.elapsed() < Duration::from_secs(20)
        && settle_start.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let s = Sample::take(&admin, &operator, &processes).await;
        if s.operator_writes_total() != last_writes {
            last_writes = s.operator_writes_total();
            quiet_since = Instant::now();
        }
    }
    let settled = settle_start.elapsed();

    // ---- steady
    let load_steady = load_average();
    let before = Sample::take(&admin, &operator, &processes).await;
    let mut rss = vec![before.rss_mib];
    while before.at.elapsed() < args.steady {
        tokio::time::sleep(Duration::from_secs(10).min(args.steady)).await;
        rss.push(status_mib(operator.pid(), "VmRSS:"));
    }
    let after = Sample::take(&admin, &operator, &processes).await;
    rss.push(after.rss_mib);
    let steady = PhaseReport {
        name: "steady",
        seconds: after.at.duration_since(before.at).as_secs_f64(),
        before,
        after,
    };
    let steady_writes = steady.after.operator_writes(&steady.before);
    if !steady_writes.is_empty() {
        eprintln!("FAIL: the steady phase wrote: {steady_writes:?}");
        failed = true;
    }
    eprintln!("steady done; load {}", load_average());

    // ---- rollout
    let load_rollout = load_average();
    let before = Sample::take(&admin, &operator, &processes).await;
    let start = Instant::now();
    for_each_cluster(n, |i| {
        let admin = admin.clone();
        async move {
            let ns = namespace(i);
            let api: Api<DchatCluster> = Api::namespaced(admin, &ns);
            api.patch(
                CLUSTER,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"version": "1.1.0"}})),
            )
            .await
            .unwrap_or_else(|e| panic!("changing the version in {ns}: {e}"));
        }
    })
    .await;
    let changed = start.elapsed();
    let complete = wait_fleet(&fleet, n, start, args.timeout, &mut operator, |s| {
        s.observed
            && s.step == Some(RolloutStep::Complete)
            && s.version.as_deref() == Some("1.1.0")
            && s.phase == Some(Phase::Running)
    })
    .await;
    let after = Sample::take(&admin, &operator, &processes).await;
    if let Err(why) = &complete {
        eprintln!("FAIL: rollout: {why}");
        failed = true;
    }
    let failed_rollouts = fleet
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .filter(|s| s.step == Some(RolloutStep::Failed))
        .count();
    let rollout = PhaseReport {
        name: "rollout",
        seconds: after.at.duration_since(before.at).as_secs_f64(),
        before,
        after,
    };

    // ---- report
    let secs = |r: &Result<Duration, String>| match r {
        Ok(d) => format!("{:.1}", d.as_secs_f64()),
        Err(_) => "did not finish".to_string(),
    };
    println!(
        "\n{n} DchatClusters, {} relay(s) each (PostgreSQL, autoscaling, Ingress, monitoring), one per namespace",
        args.replicas
    );
    println!("\n| phase | result | load (1/5/15 min) at start |");
    println!("|---|---|---|");
    println!(
        "| cold | created in {:.1} s; all reconciled (status written) at {} s; all Running at {} s | {load_cold} |",
        created.as_secs_f64(),
        secs(&statused),
        secs(&running)
    );
    let (pods, first_pod, last_pod) = stats.patched_between(cold_start, cold_end);
    let spread = (last_pod - first_pod).as_secs_f64();
    println!(
        "| cold Pods | {pods} relay Pods made Ready by the stand-in kubelet between {:.1} s and {:.1} s: {:.1} per second (as fast as the StatefulSet controller creates them) | |",
        first_pod.as_secs_f64(),
        last_pod.as_secs_f64(),
        if spread > 0.0 { pods as f64 / spread } else { 0.0 },
    );
    let minutes = steady.seconds / 60.0;
    let steady_ops = steady.after.operator_total() - steady.before.operator_total();
    let steady_api: f64 = steady
        .after
        .apiserver_by_verb(&steady.before)
        .values()
        .sum();
    println!(
        "| steady ({:.0} s, after {:.0} s settling) | operator writes {:.0}; operator {:.0} requests/min ({:.0} reconciles/min); API server {:.0} requests/min; operator RSS {:.1}–{:.1} MiB | {load_steady} |",
        steady.seconds,
        settled.as_secs_f64(),
        steady_writes.values().sum::<f64>().abs(),
        steady_ops / minutes,
        (steady.after.reconciles - steady.before.reconciles) / minutes,
        steady_api / minutes,
        rss.iter().copied().fold(f64::INFINITY, f64::min),
        rss.iter().copied().fold(0.0, f64::max),
    );
    println!(
        "| rollout | changed in {:.1} s; all Complete at {} s; {} Failed; API server 429s {:.0}, operator 429s {:.0} (after retries) | {load_rollout} |",
        changed.as_secs_f64(),
        secs(&complete),
        failed_rollouts,
        rollout.after.apiserver_code(&rollout.before, "429"),
        rollout.after.operator_code(&rollout.before, "429"),
    );
    println!(
        "\noperator peak RSS (VmHWM): {:.1} MiB; API server 429s in all: {:.0}",
        rollout.after.hwm_mib,
        rollout.after.apiserver_code(&cold.before, "429")
    );
    per_cluster_table(
        "Requests per cluster by verb: the operator's own (dchat_operator_kube_requests_total) and the API server's from every client (apiserver_request_total: kube-controller-manager, the stand-in kubelet and the benchmark too)",
        &[
            ("operator cold", cold.after.operator_by_verb(&cold.before)),
            ("operator steady", steady.after.operator_by_verb(&steady.before)),
            ("operator rollout", rollout.after.operator_by_verb(&rollout.before)),
            ("API server cold", cold.after.apiserver_by_verb(&cold.before)),
            ("API server steady", steady.after.apiserver_by_verb(&steady.before)),
            ("API server rollout", rollout.after.apiserver_by_verb(&rollout.before)),
        ],
        n,
    );
    println!("\n| | cold | steady | rollout |");
    println!("|---|---:|---:|---:|");
    let row = |what: &str, f: &dyn Fn(&PhaseReport) -> String| {
        println!(
            "| {what} | {} | {} | {} |",
            f(&cold),
            f(&steady),
            f(&rollout)
        );
    };
    row("reconciles per cluster", &|p| {
        format!(
            "{:.2}",
            (p.after.reconciles - p.before.reconciles) / n as f64
        )
    });
    row("API server 429s", &|p| {
        format!("{:.0}", p.after.apiserver_code(&p.before, "429"))
    });
    row("operator RSS at the end (MiB)", &|p| {
        format!("{:.1}", p.after.rss_mib)
    });
    let writes = cold.after.operator_writes(&cold.before);
    println!("\nOperator writes in the cold phase, per cluster\n");
    println!("| verb | resource | per cluster |");
    println!("|---|---|---:|");
    for ((verb, resource), count) in &writes {
        println!("| {verb} | {resource} | {:.2} |", count / n as f64);
    }
    cpu_table(&[&cold, &steady, &rollout]);
    println!("\nThe API server's most frequent requests (every client), per cluster\n");
    println!("| phase | requests |");
    println!("|---|---|");
    for phase in [&cold, &steady, &rollout] {
        let mut top: Vec<(f64, &String)> = phase
            .after
            .by_resource
            .iter()
            .map(|(what, v)| {
                (
                    v - phase.before.by_resource.get(what).copied().unwrap_or(0.0),
                    what,
                )
            })
            .filter(|(v, _)| *v > 0.0)
            .collect();
        top.sort_by(|a, b| b.0.total_cmp(&a.0));
        let listed: Vec<String> = top
            .iter()
            .take(8)
            .map(|(v, what)| format!("{what} {:.1}", v / n as f64))
            .collect();
        println!("| {} | {} |", phase.name, listed.join(", "));
    }
    for phase in [&cold, &steady, &rollout] {
        for (what, count) in &phase.after.rejected {
            let delta = count - phase.before.rejected.get(what).copied().unwrap_or(0.0);
            if delta > 0.0 {
                println!("{}: {delta:.0} × 429 {what}", phase.name);
            }
        }
    }
    println!(
        "\nstand-in kubelet: {} status patches, {} deletions finished",
        stats.patches.load(Ordering::Relaxed),
        stats.deletions.load(Ordering::Relaxed)
    );
    let _ = std::io::stdout().flush();
    kubelet_task.abort();
    fleet_task.abort();
    failed
}
