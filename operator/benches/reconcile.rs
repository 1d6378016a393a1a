//! Reconcile benchmark on the in-memory API: 1,000 DchatClusters (one per namespace, so
//! the in-memory server's list cost does not grow with the fleet) from cold, then a
//! steady-state pass. Prints a table; numbers are recorded in docs/performance.md.
//!
//! Run: `cargo bench -p dchat-operator --bench reconcile` (optionally `-- 200` clusters).

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

use support::Harness;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

struct Pass {
    name: &'static str,
    clusters: usize,
    seconds: f64,
    latencies_ms: Vec<f64>,
    requests: usize,
    writes: usize,
}

impl Pass {
    fn row(&self) -> String {
        let mut sorted = self.latencies_ms.clone();
        sorted.sort_by(|a, b| a.total_cmp(b));
        format!(
            "| {:<18} | {:>8} | {:>10.0} | {:>8.2} | {:>8.2} | {:>12.1} | {:>10.2} |",
            self.name,
            self.clusters,
            self.clusters as f64 / self.seconds,
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.99),
            self.requests as f64 / self.clusters as f64,
            self.writes as f64 / self.clusters as f64,
        )
    }
}

async fn pass(h: &Harness, name: &'static str, clusters: usize) -> Pass {
    h.reset_calls();
    let mut latencies_ms = Vec::with_capacity(clusters);
    let start = Instant::now();
    for i in 0..clusters {
        let t = Instant::now();
        h.reconcile_in(&format!("ns{i}"), "relays")
            .await
            .expect("reconcile");
        latencies_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let seconds = start.elapsed().as_secs_f64();
    Pass {
        name,
        clusters,
        seconds,
        latencies_ms,
        requests: h.all_calls().len(),
        writes: h.writes().len(),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let clusters: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1000);
    let h = Harness::new(true).await;
    for i in 0..clusters {
        h.create_cluster_in(
            &format!("ns{i}"),
            "relays",
            "version: '1.0.0'\nreplicas: 3\ndatabase: {secretRef: {name: db}}\nautoscaling: {enabled: true, minReplicas: 3, maxReplicas: 6}",
        )
        .await;
    }
    let cold = pass(&h, "cold (create)", clusters).await;
    // Play the StatefulSet controller, then let each cluster settle its status.
    for i in 0..clusters {
        h.set_statefulset_status_in(&format!("ns{i}"), "relays-blue", 3)
            .await;
    }
    let _ = pass(&h, "settle", clusters).await;
    let _ = pass(&h, "settle", clusters).await;
    let steady = pass(&h, "steady (unchanged)", clusters).await;

    println!("| pass               | clusters | clusters/s | p50 (ms) | p99 (ms) | requests/rec | writes/rec |");
    println!("|--------------------|---------:|-----------:|---------:|---------:|-------------:|-----------:|");
    println!("{}", cold.row());
    println!("{}", steady.row());
    println!("peak RSS: {:.1} MiB", peak_rss_mib());
    if steady.writes != 0 {
        eprintln!("FAIL: unchanged clusters caused {} writes", steady.writes);
        std::process::exit(1);
    }
}
