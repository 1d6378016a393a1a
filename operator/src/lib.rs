//! dchat-operator: runs dchat relay clusters declared as `DchatCluster` objects.
//!
//! Layout, in the order a reconcile uses it:
//! - [`api`]: the `DchatCluster` types, defaults and validation.
//! - [`labels`]: every name, label and owner reference the operator writes.
//! - [`build`]: pure builders, one per child kind.
//! - [`rollout`]: the blue-green rollout state machine (pure).
//! - [`day2`]: pause, hibernation and declarative restart requests (pure).
//! - [`controller`]: the effects — apply, cleanup, status, events.
//! - [`runner`]: leader election around the controller (what `dchat-operator run` runs).
//! - [`render`], [`commands`]: the offline CLI commands and `promote`/`abort`.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod analysis;
pub mod api;
pub mod backup;
pub mod build;
pub mod commands;
pub mod controller;
pub mod day2;
pub mod events;
pub mod http;
pub mod job_end;
pub mod labels;
pub mod leader;
pub mod metrics;
pub mod quantity;
pub mod rbac;
pub mod render;
pub mod rollout;
pub mod runner;

#[cfg(test)]
mod testing;
