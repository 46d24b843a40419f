//! The admin API: `plant.admin.v1` gRPC on the owner-only Unix socket in the state folder,
//! the one protocol there (tokens, certificates, audit log, status, registration entries,
//! agents). The read-only part (inventory, status, audit log) is also served as JSON over
//! HTTPS to operators with client certificates ([`crate::operator_api`]).
//!
//! - [`service`]: the handlers, thin over the [`Authority`] calls.
//! - [`wire`]: the proto messages to and from the domain types, in one place.
//! - [`client`]: the `issuer` command line's client for the socket.

pub mod client;
mod service;
pub mod wire;

use std::sync::Arc;

use tonic::{Code, Status};

use crate::authority::Authority;
use crate::store::AuditRecord;
use crate::Error;

pub use client::AdminClient;

/// The admin gRPC services, for `axum::serve` on the admin socket.
pub fn router(authority: Arc<Authority>) -> axum::Router {
    service::routes(authority).into_axum_router()
}

/// Most audit records one read answers; more is refused, not cut short, so a script never
/// mistakes a partial answer for the whole log.
pub const MAX_AUDIT_PAGE: usize = 1000;

/// Records per audit page when the request names no count.
pub const DEFAULT_AUDIT_PAGE: usize = 20;

/// The newest `count` audit records numbered below `before`, oldest first: the one check of
/// the page size for the admin socket and the operator API alike.
pub(crate) fn read_audit(
    authority: &Authority,
    before: Option<u64>,
    count: usize,
) -> Result<Vec<AuditRecord>, Error> {
    if count == 0 || count > MAX_AUDIT_PAGE {
        return Err(Error::Admin(format!(
            "count={count}: ask for 1 to {MAX_AUDIT_PAGE} records a page; for more, page back \
             with before=<seq of the oldest record you got>"
        )));
    }
    authority.store.audit.page(before, count)
}

/// An issuer error as the admin socket answers it: the code from [`Error::grpc_code`] and,
/// as the socket is the owner's, the whole message, which the CLI prints as it is.
pub(crate) fn to_status(error: Error) -> Status {
    let code = error.grpc_code();
    if code == Code::Internal {
        tracing::error!(%error, "admin request failed");
    }
    Status::new(code, error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The codes stand for the HTTP statuses the JSON admin routes answered (400, 503, 404),
    /// and the message travels whole for the CLI to print.
    #[test]
    fn errors_map_to_the_codes_of_their_old_http_statuses_with_the_whole_message() {
        for (error, code) in [
            (
                Error::Admin("count must be between 1 and 100000".into()),
                Code::InvalidArgument,
            ),
            (
                Error::StateUnwritable("the disk is full".into()),
                Code::Unavailable,
            ),
            (Error::Store("stuck".into()), Code::Unavailable),
            (
                Error::NotFound("no entry with id \"x\"".into()),
                Code::NotFound,
            ),
            (Error::Certificate("broken".into()), Code::Internal),
        ] {
            let message = error.to_string();
            let status = to_status(error);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }
}
