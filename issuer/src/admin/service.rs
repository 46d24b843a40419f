//! The admin socket's gRPC services: each handler turns the request into domain types
//! ([`super::wire`]), makes the same [`Authority`] call the CLI's command names, and maps a
//! failure with [`super::to_status`].

use std::sync::Arc;

use proto::admin::agents_server::{Agents, AgentsServer};
use proto::admin::audit_server::{Audit, AuditServer};
use proto::admin::certificates_server::{Certificates, CertificatesServer};
use proto::admin::entries_server::{Entries, EntriesServer};
use proto::admin::issuer_server::{Issuer, IssuerServer};
use proto::admin::tokens_server::{Tokens, TokensServer};
use proto::admin::{
    AttestedAgent, BanAgentRequest, BanAgentResponse, Certificate, CreateEntryRequest,
    CreateTokensRequest, CreateTokensResponse, DeleteEntryRequest, DeleteEntryResponse, Entry,
    EvictAgentRequest, EvictAgentResponse, ListAgentsRequest, ListAgentsResponse,
    ListCertificatesRequest, ListCertificatesResponse, ListEntriesRequest, ListEntriesResponse,
    ListTokensRequest, ListTokensResponse, ReadAuditRequest, ReadAuditResponse,
    RevokeCertificateRequest, RevokeTokenRequest, RevokeTokenResponse, StatusRequest,
    StatusResponse, UnbanAgentRequest, UnbanAgentResponse, VerifyAuditRequest, VerifyAuditResponse,
};
use tonic::{Request, Response, Status};

use super::{to_status, wire};
use crate::authority::Authority;
use crate::revocation::RevokeRequest;
use crate::store::{InventoryQuery, TokenState};
use crate::tokens::TokenRequest;
use crate::Error;

/// Every admin service over one authority.
pub(super) fn routes(authority: Arc<Authority>) -> tonic::service::Routes {
    let service = AdminGrpc(authority);
    tonic::service::Routes::new(TokensServer::new(service.clone()))
        .add_service(CertificatesServer::new(service.clone()))
        .add_service(AuditServer::new(service.clone()))
        .add_service(IssuerServer::new(service.clone()))
        .add_service(EntriesServer::new(service.clone()))
        .add_service(AgentsServer::new(service))
}

#[derive(Debug, Clone)]
struct AdminGrpc(Arc<Authority>);

#[tonic::async_trait]
impl Entries for AdminGrpc {
    async fn create(
        &self,
        request: Request<CreateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let entry = self
            .0
            .create_entry(&request.into_inner().into())
            .await
            .map_err(to_status)?;
        Ok(Response::new(entry.into()))
    }

    async fn list(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let parent = request.into_inner().parent_id;
        let parent = (!parent.is_empty()).then_some(parent);
        let entries = self.0.list_entries(parent.as_deref()).map_err(to_status)?;
        Ok(Response::new(ListEntriesResponse {
            entries: entries.into_iter().map(Entry::from).collect(),
        }))
    }

    async fn delete(
        &self,
        request: Request<DeleteEntryRequest>,
    ) -> Result<Response<DeleteEntryResponse>, Status> {
        self.0
            .delete_entry(&request.into_inner().id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(DeleteEntryResponse {}))
    }
}

#[tonic::async_trait]
impl Agents for AdminGrpc {
    async fn list(
        &self,
        _request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self.0.list_agents().map_err(to_status)?;
        Ok(Response::new(ListAgentsResponse {
            agents: agents.into_iter().map(AttestedAgent::from).collect(),
        }))
    }

    async fn evict(
        &self,
        request: Request<EvictAgentRequest>,
    ) -> Result<Response<EvictAgentResponse>, Status> {
        let request = request.into_inner();
        self.0
            .evict_agent(&request.spiffe_id, request.ban)
            .await
            .map_err(to_status)?;
        Ok(Response::new(EvictAgentResponse {}))
    }

    async fn ban(
        &self,
        request: Request<BanAgentRequest>,
    ) -> Result<Response<BanAgentResponse>, Status> {
        self.0
            .ban_agent(&request.into_inner().spiffe_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(BanAgentResponse {}))
    }

    async fn unban(
        &self,
        request: Request<UnbanAgentRequest>,
    ) -> Result<Response<UnbanAgentResponse>, Status> {
        self.0
            .unban_agent(&request.into_inner().spiffe_id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(UnbanAgentResponse {}))
    }
}

#[tonic::async_trait]
impl Tokens for AdminGrpc {
    async fn create(
        &self,
        request: Request<CreateTokensRequest>,
    ) -> Result<Response<CreateTokensResponse>, Status> {
        let request = TokenRequest::try_from(request.into_inner()).map_err(to_status)?;
        let tokens = self.0.tokens.create(&request).await.map_err(to_status)?;
        Ok(Response::new(CreateTokensResponse {
            tokens: tokens.into_iter().map(Into::into).collect(),
        }))
    }

    async fn list(
        &self,
        _request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let tokens = self.0.tokens.list().map_err(to_status)?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens
                .into_iter()
                .map(|(t, state)| wire::token(t, state))
                .collect(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let revoked = self
            .0
            .tokens
            .revoke(&request.into_inner().id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(RevokeTokenResponse {
            revoked: revoked
                .into_iter()
                .map(|t| wire::token(t, TokenState::Revoked))
                .collect(),
        }))
    }
}

#[tonic::async_trait]
impl Certificates for AdminGrpc {
    async fn list(
        &self,
        request: Request<ListCertificatesRequest>,
    ) -> Result<Response<ListCertificatesResponse>, Status> {
        let query = InventoryQuery::from(request.into_inner());
        let page = self.0.inventory(&query).map_err(to_status)?;
        Ok(Response::new(page.try_into().map_err(to_status)?))
    }

    async fn revoke(
        &self,
        request: Request<RevokeCertificateRequest>,
    ) -> Result<Response<Certificate>, Status> {
        let request = RevokeRequest::try_from(request.into_inner()).map_err(to_status)?;
        let record = self
            .0
            .revocation
            .revoke(&request)
            .await
            .map_err(to_status)?;
        // A node that attested with this device certificate goes with it.
        self.0
            .evict_nodes_attested_with(&record)
            .await
            .map_err(|e| {
                to_status(Error::Admin(format!(
                    "certificate {} is revoked, but evicting the nodes that attested with it \
                     failed: {e}; evict them with `issuer agent evict` (`issuer agent list` \
                     shows them)",
                    record.serial
                )))
            })?;
        Ok(Response::new(record.try_into().map_err(to_status)?))
    }
}

#[tonic::async_trait]
impl Audit for AdminGrpc {
    async fn read(
        &self,
        request: Request<ReadAuditRequest>,
    ) -> Result<Response<ReadAuditResponse>, Status> {
        let request = request.into_inner();
        let count = match request.count {
            0 => super::DEFAULT_AUDIT_PAGE,
            n => n as usize,
        };
        let records = super::read_audit(&self.0, request.before, count).map_err(to_status)?;
        Ok(Response::new(ReadAuditResponse {
            records: records.into_iter().map(Into::into).collect(),
        }))
    }

    async fn verify(
        &self,
        _request: Request<VerifyAuditRequest>,
    ) -> Result<Response<VerifyAuditResponse>, Status> {
        let verification = self.0.store.audit.verify().map_err(to_status)?;
        Ok(Response::new(verification.into()))
    }
}

#[tonic::async_trait]
impl Issuer for AdminGrpc {
    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        Ok(Response::new(self.0.status().into()))
    }
}
