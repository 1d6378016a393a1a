//! The operator on a real control plane (`../shared/envtest`: kube-apiserver and
//! kube-controller-manager 1.34), running as the Helm chart's ServiceAccount under the
//! chart's RBAC, with a stand-in kubelet. Skipped (with a note) where no control plane
//! exists; `scripts/test-all.sh` runs these. See docs/development.md.

mod support;

mod backups;
mod day2;
mod deletion;
mod discovery;
mod events;
mod failures;
mod production;
mod quiet;
mod resilience;
mod rollouts;
mod triggers;
mod validation;
