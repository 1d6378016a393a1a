//! The AWS SDK configuration shared by the S3 and RDS clients.
//!
//! Credentials come from the SDK's default chain only — environment
//! (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`), web identity (IRSA:
//! `AWS_WEB_IDENTITY_TOKEN_FILE` + `AWS_ROLE_ARN`), shared profile files, ECS and EC2
//! instance metadata — so no secret is ever a command-line flag. The standard endpoint
//! variables (`AWS_ENDPOINT_URL`, `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL_RDS`) apply too.

use aws_config::{BehaviorVersion, SdkConfig};
use aws_smithy_http_client::tls;

/// Loads the shared SDK configuration. `region` overrides the default region chain
/// (`AWS_REGION`, profile); the HTTPS client is rustls with ring, the provider this
/// workspace builds anyway (the SDK's default client would also build aws-lc). The
/// provider is handed to the client explicitly, so no process-wide default is needed.
pub async fn sdk_config(region: Option<&str>) -> SdkConfig {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(
            tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let mut loader = aws_config::defaults(BehaviorVersion::latest()).http_client(http);
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_string()));
    }
    loader.load().await
}

/// An SDK error as one line with its causes (the SDK's own `Display` says only
/// "service error"): each cause's text once, without the SDK's debug dump of the raw
/// response (kilobytes of headers in a DchatBackup's `status.error`), which goes to the
/// debug log instead.
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    tracing::debug!(error = %aws_sdk_s3::error::DisplayErrorContext(e), "AWS request failed");
    let mut line = String::new();
    let mut cause = Some(e);
    while let Some(err) = cause {
        let text = err.to_string();
        if !text.is_empty() && !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        cause = err.source();
    }
    line
}

/// The HTTP status of a failed request, if a response was received (S3 and RDS share
/// the SDK's error type).
pub fn status<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer(&'static str, Option<Box<Layer>>);

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.0)
        }
    }

    impl std::error::Error for Layer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            self.1
                .as_deref()
                .map(|l| l as &(dyn std::error::Error + 'static))
        }
    }

    #[test]
    fn an_error_is_its_causes_once_without_debug_output() {
        let e = Layer(
            "service error",
            Some(Box::new(Layer(
                "NoSuchBucket: The specified bucket does not exist",
                Some(Box::new(Layer("The specified bucket does not exist", None))),
            ))),
        );
        assert_eq!(
            describe(&e),
            "service error: NoSuchBucket: The specified bucket does not exist"
        );
    }
}
