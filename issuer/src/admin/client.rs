//! The `issuer` command line's client for the admin socket: a gRPC channel over the Unix
//! socket, and the calls answered in domain types.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use proto::admin::agents_client::AgentsClient;
use proto::admin::audit_client::AuditClient;
use proto::admin::certificates_client::CertificatesClient;
use proto::admin::entries_client::EntriesClient;
use proto::admin::issuer_client::IssuerClient;
use proto::admin::tokens_client::TokensClient;
use proto::admin::{ReadAuditRequest, StatusRequest, VerifyAuditRequest};
use tonic::transport::Channel;

use crate::authority::StatusReport;
use crate::revocation::RevokeRequest;
use crate::store::{AuditRecord, CertificateRecord, InventoryPage, InventoryQuery, Verification};
use crate::tokens::{CreatedToken, TokenRequest};
use crate::Error;

/// Largest answer the CLI reads: 100,000 new tokens in one answer are ~10 MB, past tonic's
/// 4 MiB default.
const MAX_ANSWER: usize = 256 * 1024 * 1024;

/// A connection to the issuer's admin socket.
#[derive(Debug, Clone)]
pub struct AdminClient {
    channel: Channel,
}

impl AdminClient {
    /// Connects to the socket at `socket` (HTTP/2 prior knowledge on a Unix stream).
    pub async fn connect(socket: &Path) -> Result<Self, Error> {
        let path: PathBuf = socket.to_owned();
        // The URI is required by the API but unused: the connector always dials the socket.
        let channel = tonic::transport::Endpoint::from_static("http://issuer-admin")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let path = path.clone();
                async move {
                    tokio::net::UnixStream::connect(path)
                        .await
                        .map(TokioIo::new)
                }
            }))
            .await
            .map_err(|e| {
                Error::Admin(format!(
                    "cannot reach the issuer's admin socket {}: {}; is `issuer serve` running \
                     with this configuration?",
                    socket.display(),
                    root_cause(&e)
                ))
            })?;
        Ok(Self { channel })
    }

    /// The Tokens service.
    pub fn tokens(&self) -> TokensClient<Channel> {
        TokensClient::new(self.channel.clone()).max_decoding_message_size(MAX_ANSWER)
    }

    /// The Certificates service (inventory, revocation).
    pub fn certificates(&self) -> CertificatesClient<Channel> {
        CertificatesClient::new(self.channel.clone()).max_decoding_message_size(MAX_ANSWER)
    }

    /// The Audit service.
    pub fn audit(&self) -> AuditClient<Channel> {
        AuditClient::new(self.channel.clone()).max_decoding_message_size(MAX_ANSWER)
    }

    /// The Entries service.
    pub fn entries(&self) -> EntriesClient<Channel> {
        EntriesClient::new(self.channel.clone()).max_decoding_message_size(MAX_ANSWER)
    }

    /// The Agents service.
    pub fn agents(&self) -> AgentsClient<Channel> {
        AgentsClient::new(self.channel.clone()).max_decoding_message_size(MAX_ANSWER)
    }

    /// Creates one-time tokens.
    pub async fn create_tokens(&self, request: &TokenRequest) -> Result<Vec<CreatedToken>, Error> {
        let answer = self
            .tokens()
            .create(proto::admin::CreateTokensRequest::from(request))
            .await
            .map_err(from_status)?;
        Ok(answer
            .into_inner()
            .tokens
            .into_iter()
            .map(Into::into)
            .collect())
    }

    /// One inventory page.
    pub async fn inventory(&self, query: &InventoryQuery) -> Result<InventoryPage, Error> {
        self.certificates()
            .list(proto::admin::ListCertificatesRequest::from(query))
            .await
            .map_err(from_status)?
            .into_inner()
            .try_into()
    }

    /// Revokes a certificate; answers its record.
    pub async fn revoke(&self, request: &RevokeRequest) -> Result<CertificateRecord, Error> {
        self.certificates()
            .revoke(proto::admin::RevokeCertificateRequest::from(request))
            .await
            .map_err(from_status)?
            .into_inner()
            .try_into()
    }

    /// The issuer's status.
    pub async fn status(&self) -> Result<StatusReport, Error> {
        IssuerClient::new(self.channel.clone())
            .status(StatusRequest {})
            .await
            .map_err(from_status)?
            .into_inner()
            .try_into()
    }

    /// The newest `count` audit records below `before`, oldest first.
    pub async fn audit_page(
        &self,
        before: Option<u64>,
        count: usize,
    ) -> Result<Vec<AuditRecord>, Error> {
        self.audit()
            .read(ReadAuditRequest {
                count: u32::try_from(count).unwrap_or(u32::MAX),
                before,
            })
            .await
            .map_err(from_status)?
            .into_inner()
            .records
            .into_iter()
            .map(TryInto::try_into)
            .collect()
    }

    /// Checks the audit log's hash chain.
    pub async fn audit_verify(&self) -> Result<Verification, Error> {
        Ok(self
            .audit()
            .verify(VerifyAuditRequest {})
            .await
            .map_err(from_status)?
            .into_inner()
            .into())
    }
}

/// A refusal from the admin socket as the CLI reports it: the issuer's message, whole.
pub fn from_status(status: tonic::Status) -> Error {
    Error::Admin(status.message().to_owned())
}

/// The innermost cause ("No such file or directory"), not tonic's "transport error".
fn root_cause(error: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    cause.to_string()
}
