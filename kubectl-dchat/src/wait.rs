//! `--wait`: reads the DchatCluster about once a second until a predicate of
//! [`crate::contract`] says done or failed, or the timeout passes. Each new observation
//! is printed once, so a person sees the operator move.

use std::io::Write;
use std::time::Duration;

use kube::Client;

use crate::contract::Check;
use crate::error::Error;
use crate::status::fetch;
use crate::view::ClusterView;

/// Time between two reads: short enough to feel immediate, cheap for the API server.
pub const POLL: Duration = Duration::from_secs(1);

/// Waits until `check` of DchatCluster `namespace/name` is done (its description) or
/// failed ([`Error::Ended`]), at most `timeout` ([`Error::TimedOut`]).
pub async fn until(
    client: &Client,
    namespace: &str,
    name: &str,
    what: &str,
    timeout: Duration,
    out: &mut dyn Write,
    check: impl Fn(&ClusterView) -> Check,
) -> Result<String, Error> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    say(
        out,
        &format!(
            "waiting for {what} (at most {})",
            crate::style::duration(timeout.as_secs() as i64)
        ),
    )?;
    loop {
        let cluster = fetch::cluster(client, namespace, name).await?;
        match check(&cluster) {
            Check::Done(seen) => return Ok(seen),
            Check::Failed(why) => return Err(Error::Ended(why)),
            Check::Waiting(seen) => {
                if seen != last {
                    say(out, &format!("  {seen}"))?;
                    last = seen;
                }
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Error::TimedOut {
                what: what.to_string(),
                last,
                name: name.to_string(),
                namespace: namespace.to_string(),
                waited: timeout,
            });
        }
        tokio::time::sleep(POLL.min(deadline - tokio::time::Instant::now())).await;
    }
}

/// Writes one line.
pub fn say(out: &mut dyn Write, line: &str) -> Result<(), Error> {
    writeln!(out, "{line}")
        .and_then(|()| out.flush())
        .map_err(|e| Error::Output(e.to_string()))
}
