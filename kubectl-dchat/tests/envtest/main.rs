//! `kubectl dchat` on a real control plane (`../shared/envtest`), the built binary run
//! as a person runs it, with the operator (in-process, as the chart's ServiceAccount)
//! where the operator side of a command exists. Skipped (with a note) where no control
//! plane exists, like the operator's own scenarios.

// The operator's real-control-plane support, shared by path so both crates start
// control planes, operators and the stand-in kubelet the same way; this binary uses
// only part of it.
#[allow(dead_code)]
#[path = "../../../operator/tests/envtest/support/mod.rs"]
mod support;

mod plugin;

mod access;
mod backups;
mod day2;
mod rollouts;
