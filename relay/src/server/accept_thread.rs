//! The thread each listener accepts on, below the priority of the sessions.
//!
//! A connection is accepted and its first request head read on its listener's own
//! thread ([`AcceptThread`]), which runs at the lowest scheduling priority (nice 19);
//! only a connection whose head is complete moves to the relay's runtime, where hyper
//! serves the request and the WebSocket lives (`accept.rs`). A flood of sockets that
//! never complete a request — accepted, read a byte at a time, timed out, closed and
//! reopened by the thousand each second — then costs the thread that serves them, and
//! the kernel runs the sessions' work first whenever both are ready: with 10,000 such
//! sockets the relay's own core spent its bursts of timeouts between messages and
//! clients' p99 grew six-fold (docs/performance.md, S5).
//!
//! Lowest is not never: a nice-19 thread still gets about 1.5 % of a core that the
//! sessions saturate, so probes and new clients are slowed under full load, not starved.

use std::future::Future;
use std::io;

use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// The nice value of the accepting threads (19: the lowest priority).
pub const ACCEPT_NICE: i32 = 19;

/// A listener's accepting thread, running one future on a runtime of its own.
pub(super) struct AcceptThread {
    /// Resolves when the thread's future has returned or was abandoned (or the thread
    /// ended any other way: the sender is dropped).
    done: oneshot::Receiver<()>,
    /// Cancelled by [`AcceptThread::abandon`]: the future is dropped where it stands.
    abandon: CancellationToken,
}

impl AcceptThread {
    /// Starts the thread `dchat-accept-{name}` and runs `serve` on it. The runtime is
    /// built here, so a failure is the caller's error rather than a silent thread.
    pub(super) fn start<F>(name: &'static str, serve: F) -> io::Result<AcceptThread>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (finished, done) = oneshot::channel();
        let abandon = CancellationToken::new();
        let abandoned = abandon.clone();
        std::thread::Builder::new()
            .name(format!("dchat-accept-{name}"))
            .spawn(move || {
                lower_priority(name);
                runtime.block_on(async move {
                    tokio::select! {
                        () = serve => {}
                        () = abandoned.cancelled() => {}
                    }
                });
                // Dropping the runtime drops the connections still being read on it.
                drop(runtime);
                let _ = finished.send(());
            })?;
        Ok(AcceptThread { done, abandon })
    }

    /// Waits until the thread's future has returned (or the thread ended otherwise).
    pub(super) async fn finished(&mut self) {
        let _ = (&mut self.done).await;
    }

    /// Drops the thread's future where it stands; connections already handed to the
    /// relay's runtime are not affected.
    pub(super) fn abandon(&self) {
        self.abandon.cancel();
    }
}

/// Sets the calling thread's nice value to [`ACCEPT_NICE`]. On Linux a nice value
/// belongs to a thread (`setpriority` with a thread id). Lowering one's own priority
/// needs no privilege; if it fails anyway, the relay serves at normal priority.
fn lower_priority(name: &'static str) {
    let tid = rustix::thread::gettid();
    match rustix::process::setpriority_process(Some(tid), ACCEPT_NICE) {
        Ok(()) => debug!(
            listener = name,
            nice = ACCEPT_NICE,
            "accepting thread started"
        ),
        Err(e) => warn!(
            listener = name,
            error = %e,
            "could not lower the accepting thread's priority; it runs at normal priority"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_the_future_at_nice_19_and_reports_its_end() {
        let (tx, rx) = oneshot::channel();
        let mut thread = AcceptThread::start("test", async move {
            let tid = rustix::thread::gettid();
            let _ = tx.send(rustix::process::getpriority_process(Some(tid)));
        })
        .expect("thread");
        let nice = rx.await.expect("ran").expect("getpriority");
        assert_eq!(nice, ACCEPT_NICE);
        tokio::time::timeout(std::time::Duration::from_secs(10), thread.finished())
            .await
            .expect("the thread ends with its future");
    }

    #[tokio::test]
    async fn abandon_drops_a_future_that_never_ends() {
        let mut thread = AcceptThread::start("test", std::future::pending::<()>()).expect("thread");
        thread.abandon();
        tokio::time::timeout(std::time::Duration::from_secs(10), thread.finished())
            .await
            .expect("the thread ends once abandoned");
    }
}
