//! The post-promotion metric check (`spec.rollout.analysis`): one Prometheus instant
//! query, its placeholders filled in, its largest value compared with a threshold by
//! the rollout state machine.
//!
//! Parsing and rendering are pure; [`instant_query`] is the only I/O. A query that
//! cannot be answered (Prometheus down, bad PromQL, NaN) is *inconclusive*: it does
//! not roll back a release on its own, and status says so.

use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// Longest answer read from Prometheus; a sane instant query returns a few KiB.
const MAX_ANSWER: usize = 1 << 20;

/// What one evaluation of the analysis query gave.
#[derive(Clone, Debug, PartialEq)]
pub enum Reading {
    /// The query's value (largest sample; 0 for an empty result).
    Value(f64),
    /// No usable value; why.
    Inconclusive(String),
}

/// Why a query gave no value.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AnalysisError {
    /// The answer is not what the Prometheus HTTP API returns.
    #[error("unexpected answer from Prometheus: {0}")]
    Malformed(String),
    /// Prometheus refused the query.
    #[error("Prometheus error ({kind}): {message}")]
    Refused {
        /// `errorType`.
        kind: String,
        /// `error`.
        message: String,
    },
    /// A sample is NaN or infinite (e.g. a division by zero).
    #[error("the query returned {0}")]
    NotANumber(String),
}

/// Fills the placeholders of an analysis query.
pub fn render_query(
    template: &str,
    namespace: &str,
    cluster: &str,
    slot: &str,
    version: &str,
) -> String {
    template
        .replace("{{namespace}}", namespace)
        .replace("{{cluster}}", cluster)
        .replace("{{slot}}", slot)
        .replace("{{version}}", version)
}

/// The value of a Prometheus `/api/v1/query` answer: the largest sample of a vector
/// (0 when empty), or the scalar.
pub fn parse_answer(body: &[u8]) -> Result<f64, AnalysisError> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| AnalysisError::Malformed(format!("not JSON: {e}")))?;
    if v["status"] != "success" {
        return Err(AnalysisError::Refused {
            kind: v["errorType"].as_str().unwrap_or("unknown").to_string(),
            message: v["error"]
                .as_str()
                .unwrap_or("no error message")
                .to_string(),
        });
    }
    let data = &v["data"];
    let sample = |pair: &serde_json::Value| -> Result<f64, AnalysisError> {
        let text = pair[1]
            .as_str()
            .ok_or_else(|| AnalysisError::Malformed(format!("sample {pair} has no value")))?;
        let value: f64 = text
            .parse()
            .map_err(|_| AnalysisError::Malformed(format!("sample value {text:?}")))?;
        if value.is_finite() {
            Ok(value)
        } else {
            Err(AnalysisError::NotANumber(text.to_string()))
        }
    };
    match data["resultType"].as_str() {
        Some("scalar") => sample(&data["result"]),
        Some("vector") => {
            let series = data["result"]
                .as_array()
                .ok_or_else(|| AnalysisError::Malformed("vector result is not a list".into()))?;
            let mut max: Option<f64> = None;
            for s in series {
                let value = sample(&s["value"])?;
                max = Some(max.map_or(value, |m| m.max(value)));
            }
            Ok(max.unwrap_or(0.0))
        }
        other => Err(AnalysisError::Malformed(format!(
            "result type {} (use an instant query that returns a vector or scalar)",
            other.unwrap_or("missing")
        ))),
    }
}

/// Runs an instant query against `base_url` (`<base>/api/v1/query?query=…`).
pub async fn instant_query(base_url: &str, query: &str, timeout: Duration) -> Reading {
    let url = format!(
        "{}/api/v1/query?query={}",
        base_url.trim_end_matches('/'),
        percent_encode(query)
    );
    let uri: hyper::Uri = match url.parse() {
        Ok(uri) => uri,
        Err(e) => return Reading::Inconclusive(format!("bad Prometheus URL {base_url:?}: {e}")),
    };
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(timeout));
    let client: Client<HttpConnector, Empty<Bytes>> =
        Client::builder(TokioExecutor::new()).build(connector);
    let fetch = async {
        let resp = client
            .get(uri)
            .await
            .map_err(|e| format!("querying {base_url}: {e}"))?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| format!("reading the answer of {base_url}: {e}"))?
            .to_bytes();
        // Prometheus answers bad queries with 400/422 and a JSON error body, which
        // parse_answer turns into a clear message.
        if !status.is_success() && body.is_empty() {
            return Err(format!("{base_url} answered HTTP {status}"));
        }
        parse_answer(&body).map_err(|e| e.to_string())
    };
    match tokio::time::timeout(timeout, fetch).await {
        Err(_) => Reading::Inconclusive(format!(
            "{base_url} did not answer within {}s",
            timeout.as_secs()
        )),
        Ok(Err(why)) => Reading::Inconclusive(why),
        Ok(Ok(value)) => Reading::Value(value),
    }
}

/// Percent-encodes a query parameter value (RFC 3986 unreserved characters kept).
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled() {
        assert_eq!(
            render_query(
                r#"rate(x{namespace="{{namespace}}",pod=~"{{cluster}}-{{slot}}-.*",v="{{version}}"}[1m])"#,
                "apps",
                "chat",
                "green",
                "1.1.0"
            ),
            r#"rate(x{namespace="apps",pod=~"chat-green-.*",v="1.1.0"}[1m])"#
        );
    }

    #[test]
    fn vector_answers_give_their_largest_sample_and_empty_is_zero() {
        let body = br#"{"status":"success","data":{"resultType":"vector","result":[
            {"metric":{"pod":"a"},"value":[1700000000.1,"0.25"]},
            {"metric":{"pod":"b"},"value":[1700000000.1,"3.5"]}]}}"#;
        assert_eq!(parse_answer(body), Ok(3.5));
        let empty = br#"{"status":"success","data":{"resultType":"vector","result":[]}}"#;
        assert_eq!(parse_answer(empty), Ok(0.0));
        let scalar =
            br#"{"status":"success","data":{"resultType":"scalar","result":[1700000000,"7"]}}"#;
        assert_eq!(parse_answer(scalar), Ok(7.0));
    }

    #[test]
    fn errors_and_nan_are_named() {
        let refused =
            br#"{"status":"error","errorType":"bad_data","error":"parse error at char 5"}"#;
        assert_eq!(
            parse_answer(refused).unwrap_err().to_string(),
            "Prometheus error (bad_data): parse error at char 5"
        );
        let nan = br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{},"value":[1,"NaN"]}]}}"#;
        assert_eq!(
            parse_answer(nan),
            Err(AnalysisError::NotANumber("NaN".into()))
        );
        let matrix = br#"{"status":"success","data":{"resultType":"matrix","result":[]}}"#;
        assert!(parse_answer(matrix)
            .unwrap_err()
            .to_string()
            .contains("matrix"));
        assert!(matches!(
            parse_answer(b"<html>"),
            Err(AnalysisError::Malformed(_))
        ));
        let no_value =
            br#"{"status":"success","data":{"resultType":"vector","result":[{"metric":{}}]}}"#;
        assert!(matches!(
            parse_answer(no_value),
            Err(AnalysisError::Malformed(_))
        ));
    }

    #[test]
    fn query_parameter_is_percent_encoded() {
        assert_eq!(
            percent_encode(r#"sum(rate(x{a="b"}[1m])) > 0"#),
            "sum%28rate%28x%7Ba%3D%22b%22%7D%5B1m%5D%29%29%20%3E%200"
        );
    }

    #[tokio::test]
    async fn unreachable_prometheus_is_inconclusive() {
        let reading = instant_query("http://127.0.0.1:1", "up", Duration::from_secs(2)).await;
        match reading {
            Reading::Inconclusive(why) => assert!(why.contains("127.0.0.1:1"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
