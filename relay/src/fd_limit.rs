//! The process's limit of open files (`RLIMIT_NOFILE`): every connection is a file
//! descriptor, and the relay's connection bounds mean nothing if the process runs out
//! of descriptors first.
//!
//! `dchat-relay` raises its soft limit to the hard limit at start ([`raise_to_hard`]),
//! as the Go runtime does for every Go program: container runtimes commonly start
//! processes with a soft limit of 1,024 and a hard limit far above it, and only the
//! process itself can use the difference. It then warns when even the raised limit is
//! below what its settings allow ([`needed`]).

use crate::config::Config;

/// Descriptors kept aside beside connections: listeners, the embedded store's files or
/// the PostgreSQL pool, peer links, the runtime.
pub const RESERVED: u64 = 256;

/// The soft limit before and after [`raise_to_hard`] (`None`: unlimited).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Raised {
    /// Soft limit found at start.
    pub before: Option<u64>,
    /// Soft limit now.
    pub now: Option<u64>,
}

/// The soft limit to set given the current soft and hard limits, if it should change:
/// the hard limit, when that is finite and higher. (An unlimited hard limit is left
/// alone: Linux caps descriptors at `fs.nr_open` and refuses an unlimited soft limit.)
pub fn target(soft: Option<u64>, hard: Option<u64>) -> Option<u64> {
    match (soft, hard) {
        (Some(s), Some(h)) if h > s => Some(h),
        _ => None,
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (see [`target`]).
pub fn raise_to_hard() -> std::io::Result<Raised> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let before = lim.current;
    let Some(new) = target(lim.current, lim.maximum) else {
        return Ok(Raised {
            before,
            now: before,
        });
    };
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(new),
            maximum: lim.maximum,
        },
    )?;
    Ok(Raised {
        before,
        now: Some(new),
    })
}

/// Descriptors the settings allow the relay to use: every WebSocket
/// (`DCHAT_MAX_CONNECTIONS`), every handshake place of both ports
/// (2 × `DCHAT_MAX_HANDSHAKES`) and [`RESERVED`].
pub fn needed(cfg: &Config) -> u64 {
    (cfg.max_connections as u64)
        .saturating_add(2 * cfg.max_handshakes as u64)
        .saturating_add(RESERVED)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_goes_up_to_a_finite_hard_limit_only() {
        assert_eq!(target(Some(1024), Some(524_288)), Some(524_288));
        assert_eq!(target(Some(20_000), Some(20_000)), None);
        assert_eq!(target(Some(1024), None), None);
        assert_eq!(target(None, None), None);
    }

    #[test]
    fn raising_is_idempotent() {
        let first = raise_to_hard().unwrap();
        let second = raise_to_hard().unwrap();
        assert_eq!(second.before, first.now);
        assert_eq!(second.now, first.now);
    }

    #[test]
    fn needed_counts_connections_both_pools_and_a_reserve() {
        let mut cfg = Config::for_test("/nonexistent");
        cfg.max_connections = 1000;
        cfg.max_handshakes = 100;
        assert_eq!(needed(&cfg), 1000 + 200 + RESERVED);
    }
}
