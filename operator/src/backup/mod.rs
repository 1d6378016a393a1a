//! Backups: the pure half. When the schedule fires ([`schedule`], on [`cron`]
//! expressions), which backups retention deletes ([`retention`]), and the Jobs that move
//! the bytes ([`job`]). The operator itself makes no AWS call: every S3 and RDS operation
//! runs in a Job with the relay image (`dchat backup …`), under the relays' identity.

pub mod cron;
pub mod health;
pub mod job;
pub mod lifecycle;
pub mod restore;
pub mod retention;
pub mod schedule;
pub mod verify;
