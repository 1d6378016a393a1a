//! The requests that only touch storage: joining and leaving a channel (persistent
//! membership) and publishing and reading signed profiles.

use tracing::warn;

use super::connection::{Conn, End};
use super::session::Session;
use crate::protocol::frame::{valid_channel, MAX_PROFILE_BYTES};
use crate::protocol::{
    profile_message, verify_signature, Base64Bytes, ErrorCode, KeyHex, ProfileDoc, ServerFrame,
    SigHex,
};

/// The stored form of a profile: the signed document exactly as published.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredProfile {
    data: Base64Bytes,
    sig: SigHex,
}

impl Session {
    pub(super) async fn membership(
        &mut self,
        c: &mut Conn,
        channel: String,
        join: bool,
    ) -> Result<(), End> {
        if !valid_channel(&channel) {
            return c
                .error(
                    ErrorCode::InvalidEnvelope,
                    "channel must match [A-Za-z0-9._-]{1,64}",
                    Some(channel),
                )
                .await;
        }
        c.flush_pending().await?;
        let r = if join {
            c.shared
                .timed(
                    "join_channel",
                    c.shared.store.join_channel(&channel, &self.key.0),
                )
                .await
        } else {
            c.shared
                .timed(
                    "leave_channel",
                    c.shared.store.leave_channel(&channel, &self.key.0),
                )
                .await
        };
        // After the store write (and whatever its outcome): a list read before it must
        // not be served from the cache afterwards.
        c.shared.channels.invalidate(&channel);
        match r {
            Ok(()) if join => c.send_frame(ServerFrame::Joined { channel }).await,
            Ok(()) => c.send_frame(ServerFrame::Left { channel }).await,
            Err(e) => {
                warn!(error = %e, "channel membership update failed");
                c.error(
                    ErrorCode::StorageUnavailable,
                    "storage unavailable",
                    Some(channel),
                )
                .await
            }
        }
    }
    pub(super) async fn publish_profile(
        &mut self,
        c: &mut Conn,
        data: Base64Bytes,
        sig: SigHex,
    ) -> Result<(), End> {
        let r = Some("profile_publish".to_string());
        if data.0.len() > MAX_PROFILE_BYTES {
            return c
                .error(
                    ErrorCode::InvalidProfile,
                    format!("profile document larger than {MAX_PROFILE_BYTES} bytes"),
                    r,
                )
                .await;
        }
        if !verify_signature(&self.key, &profile_message(&data.0), &sig) {
            return c
                .error(
                    ErrorCode::InvalidProfile,
                    "profile signature does not verify for the session key",
                    r,
                )
                .await;
        }
        let doc = match ProfileDoc::parse(&data.0) {
            Ok(d) => d,
            Err(e) => {
                return c
                    .error(
                        ErrorCode::InvalidProfile,
                        format!("profile document: {e}"),
                        r,
                    )
                    .await
            }
        };
        let name_len = doc.name.chars().count();
        if doc.key != self.key || name_len == 0 || name_len > 64 {
            return c
                .error(
                    ErrorCode::InvalidProfile,
                    "profile key must be the session key and name 1..=64 characters",
                    r,
                )
                .await;
        }
        let blob = match serde_json::to_vec(&StoredProfile { data, sig }) {
            Ok(b) => b,
            Err(e) => return c.error(ErrorCode::Internal, e.to_string(), r).await,
        };
        c.flush_pending().await?;
        match c
            .shared
            .timed(
                "put_profile",
                c.shared
                    .store
                    .put_profile(&self.key.0, blob, doc.updated_ms),
            )
            .await
        {
            Ok(updated) => c.send_frame(ServerFrame::ProfileStored { updated }).await,
            Err(e) => {
                warn!(error = %e, "storing profile failed");
                c.error(ErrorCode::StorageUnavailable, "storage unavailable", r)
                    .await
            }
        }
    }
    pub(super) async fn get_profile(&mut self, c: &mut Conn, key: KeyHex) -> Result<(), End> {
        let r = Some(key.to_hex());
        c.flush_pending().await?;
        match c
            .shared
            .timed("get_profile", c.shared.store.get_profile(&key.0))
            .await
        {
            Ok(Some(blob)) => match serde_json::from_slice::<StoredProfile>(&blob) {
                Ok(p) => {
                    c.send_frame(ServerFrame::Profile {
                        key,
                        data: p.data,
                        sig: p.sig,
                    })
                    .await
                }
                Err(e) => c.error(ErrorCode::Internal, e.to_string(), r).await,
            },
            Ok(None) => {
                c.error(ErrorCode::NotFound, "no profile for this key", r)
                    .await
            }
            Err(e) => {
                warn!(error = %e, "reading profile failed");
                c.error(ErrorCode::StorageUnavailable, "storage unavailable", r)
                    .await
            }
        }
    }
}
