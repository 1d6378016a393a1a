//! A real control plane from `../shared/envtest`: started once per test binary (or once
//! per test that changes cluster-wide state), stopped by a reaper process when the test
//! binary exits, whatever way it exits.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Where the envtest scripts are, or why the scenarios are skipped.
pub enum Location {
    /// The folder holding `kube-up` and `kube-down`.
    Found(PathBuf),
    /// No control plane here: the reason, printed once per test.
    Skip(String),
}

/// `DCHAT_ENVTEST` names the folder (or `off`); otherwise `../shared/envtest` beside the
/// project root. With `DCHAT_ENVTEST_REQUIRED=1` (set by scripts/test-all.sh when it
/// found one) a missing control plane fails instead of skipping.
pub fn locate() -> Location {
    dchat_operator::runner::install_crypto_provider();
    // The operator's logs, for debugging a scenario: RUST_LOG=info,kube=debug.
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
    let required = std::env::var("DCHAT_ENVTEST_REQUIRED").is_ok_and(|v| v == "1");
    let found = match std::env::var("DCHAT_ENVTEST") {
        Ok(v) if v == "off" => {
            return Location::Skip("DCHAT_ENVTEST=off".into());
        }
        Ok(v) => {
            let dir = PathBuf::from(v);
            assert!(
                dir.join("kube-up").is_file(),
                "DCHAT_ENVTEST={} has no kube-up",
                dir.display()
            );
            dir
        }
        Err(_) => {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/envtest");
            if !dir.join("kube-up").is_file() {
                let why = format!(
                    "no control plane: {} has no kube-up and DCHAT_ENVTEST is unset",
                    dir.display()
                );
                assert!(!required, "{why}");
                return Location::Skip(why);
            }
            dir
        }
    };
    Location::Found(found)
}

/// One running control plane (etcd, kube-apiserver, kube-controller-manager).
pub struct ControlPlane {
    scripts: PathBuf,
    dir: PathBuf,
    /// The admin kubeconfig (`system:masters`).
    pub kubeconfig: PathBuf,
}

impl ControlPlane {
    /// Starts a control plane in a fresh directory; blocks until it is ready.
    pub fn start(scripts: &Path, label: &str) -> Self {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dchat-envtest-{}-{}-{label}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("creating the control plane directory");
        let plane = Self {
            scripts: scripts.to_path_buf(),
            kubeconfig: dir.join("kubeconfig"),
            dir,
        };
        plane.spawn_reaper();
        plane.up();
        plane
    }

    /// Stops it after this process ends, even when it is killed: `kube-down` then the
    /// directory is removed. In its own process group, so Ctrl-C of the tests does not
    /// take it down before it did its work.
    fn spawn_reaper(&self) {
        use std::os::unix::process::CommandExt;
        let script = r#"while kill -0 "$1" 2>/dev/null; do sleep 1; done; "$2" "$3" >/dev/null 2>&1; rm -rf "$3""#;
        let spawned = Command::new("bash")
            .args(["-c", script, "reaper"])
            .arg(std::process::id().to_string())
            .arg(self.scripts.join("kube-down"))
            .arg(&self.dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn();
        if let Err(e) = spawned {
            panic!("starting the control plane reaper: {e}");
        }
    }

    /// Runs `kube-up` (again, after [`Self::down`]: same ports, same data).
    pub fn up(&self) {
        let out = Command::new(self.scripts.join("kube-up"))
            .arg(&self.dir)
            .output()
            .expect("running kube-up");
        if !out.status.success() {
            let logs = std::fs::read_to_string(self.dir.join("logs/kube-apiserver.log"))
                .unwrap_or_default();
            let tail: String = logs.lines().rev().take(30).collect::<Vec<_>>().join("\n");
            panic!(
                "kube-up failed: {}\n{}\napiserver log tail (reversed):\n{tail}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Runs `kube-down`: every process stops, the data stays.
    pub fn down(&self) {
        let _ = Command::new(self.scripts.join("kube-down"))
            .arg(&self.dir)
            .output();
    }

    /// The client configuration of the admin user.
    pub async fn admin_config(&self) -> Config {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("reading the kubeconfig");
        Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("a usable kubeconfig")
    }

    /// A client of the admin user.
    pub async fn admin(&self) -> Client {
        Client::try_from(self.admin_config().await).expect("an admin client")
    }

    /// The configuration of a client that authenticates with a bearer `token` only.
    pub async fn token_config(&self, token: &str) -> Config {
        let mut config = self.admin_config().await;
        config.auth_info =
            serde_json::from_value(serde_json::json!({ "token": token })).expect("auth info");
        config
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
