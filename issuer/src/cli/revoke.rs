//! `issuer revoke`: a certificate can no longer re-enroll.

use super::ConfigArg;
use crate::revocation::{RevocationReason, RevokeRequest};
use crate::Error;

#[derive(Debug, clap::Args)]
pub(super) struct RevokeArgs {
    #[command(flatten)]
    config: ConfigArg,
    /// The certificate's serial (hex, as `issuer inventory` shows it).
    serial: String,
    /// Why.
    #[arg(long, value_enum, default_value_t = RevocationReason::Unspecified)]
    reason: RevocationReason,
}

pub(super) async fn run(args: RevokeArgs) -> Result<(), Error> {
    let record = args
        .config
        .admin()
        .await?
        .revoke(&RevokeRequest {
            serial: args.serial,
            reason: args.reason,
        })
        .await?;
    say!("revoked {} ({})", record.serial, record.subject);
    Ok(())
}
