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
/// "service error").
pub fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    aws_sdk_s3::error::DisplayErrorContext(e).to_string()
}

/// The HTTP status of a failed request, if a response was received (S3 and RDS share
/// the SDK's error type).
pub fn status<E>(
    e: &aws_sdk_s3::error::SdkError<E, aws_sdk_s3::config::http::HttpResponse>,
) -> Option<u16> {
    e.raw_response().map(|r| r.status().as_u16())
}
