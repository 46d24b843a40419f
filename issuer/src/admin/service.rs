//! `plant.admin.v1` Entries, Agents and Tokens: gRPC on the admin socket, beside the JSON
//! routes (HTTP/2 prior knowledge selects gRPC, HTTP/1 the JSON API), and the CLI's client for
//! them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use hyper_util::rt::TokioIo;
use proto::admin::agents_client::AgentsClient;
use proto::admin::agents_server::{Agents, AgentsServer};
use proto::admin::entries_client::EntriesClient;
use proto::admin::entries_server::{Entries, EntriesServer};
use proto::admin::tokens_client::TokensClient;
use proto::admin::tokens_server::{Tokens, TokensServer};
use proto::admin::{
    AttestedAgent, BanAgentRequest, BanAgentResponse, CreateEntryRequest, DeleteEntryRequest,
    DeleteEntryResponse, Entry, EvictAgentRequest, EvictAgentResponse, ListAgentsRequest,
    ListAgentsResponse, ListEntriesRequest, ListEntriesResponse, ListTokensRequest,
    ListTokensResponse, RevokeTokenRequest, RevokeTokenResponse, Token, UnbanAgentRequest,
    UnbanAgentResponse,
};
use tonic::{Request, Response, Status};

use crate::agent_api::to_status;
use crate::authority::Authority;
use crate::registration::NewEntry;
use crate::store::{EntryRecord, NodeRecord, TokenKind, TokenRecord, TokenState};
use crate::Error;

/// The admin gRPC services as an axum router to merge with the JSON routes.
pub fn router(authority: Arc<Authority>) -> axum::Router {
    tonic::service::Routes::new(EntriesServer::new(AdminGrpc(authority.clone())))
        .add_service(AgentsServer::new(AdminGrpc(authority.clone())))
        .add_service(TokensServer::new(AdminGrpc(authority)))
        .into_axum_router()
}

#[derive(Debug, Clone)]
struct AdminGrpc(Arc<Authority>);

#[tonic::async_trait]
impl Entries for AdminGrpc {
    async fn create(
        &self,
        request: Request<CreateEntryRequest>,
    ) -> Result<Response<Entry>, Status> {
        let r = request.into_inner();
        let entry = self
            .0
            .create_entry(&NewEntry {
                spiffe_id: r.spiffe_id,
                parent_id: r.parent_id,
                selectors: r.selectors,
                x509_svid_ttl_secs: r.x509_svid_ttl_seconds,
                jwt_svid_ttl_secs: r.jwt_svid_ttl_seconds,
                dns_names: r.dns_names,
                hint: r.hint,
            })
            .await
            .map_err(to_status)?;
        Ok(Response::new(wire_entry(entry)))
    }

    async fn list(
        &self,
        request: Request<ListEntriesRequest>,
    ) -> Result<Response<ListEntriesResponse>, Status> {
        let parent = request.into_inner().parent_id;
        let parent = (!parent.is_empty()).then_some(parent);
        let entries = self.0.list_entries(parent.as_deref()).map_err(to_status)?;
        Ok(Response::new(ListEntriesResponse {
            entries: entries.into_iter().map(wire_entry).collect(),
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
            agents: agents.into_iter().map(wire_agent).collect(),
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
    async fn list(
        &self,
        _request: Request<ListTokensRequest>,
    ) -> Result<Response<ListTokensResponse>, Status> {
        let tokens = self.0.list_tokens().map_err(to_status)?;
        Ok(Response::new(ListTokensResponse {
            tokens: tokens
                .into_iter()
                .map(|(t, state)| wire_token(t, state))
                .collect(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let revoked = self
            .0
            .revoke_token(&request.into_inner().id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(RevokeTokenResponse {
            revoked: revoked
                .into_iter()
                .map(|t| wire_token(t, TokenState::Revoked))
                .collect(),
        }))
    }
}

fn wire_token(t: TokenRecord, state: TokenState) -> Token {
    use proto::admin::TokenState as Wire;
    Token {
        id: t.id,
        kind: match t.kind {
            TokenKind::Enrollment => "enrollment",
            TokenKind::Join => "join",
        }
        .to_owned(),
        label: t.label,
        subject: t.subject.unwrap_or_default(),
        dns_names: t.dns,
        ip_addresses: t.ips.iter().map(ToString::to_string).collect(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        state: match state {
            TokenState::Unused => Wire::Unused,
            TokenState::Spent => Wire::Spent,
            TokenState::Expired => Wire::Expired,
            TokenState::Revoked => Wire::Revoked,
        }
        .into(),
        used_at: t.used_at.unwrap_or_default(),
        revoked_at: t.revoked_at.unwrap_or_default(),
    }
}

fn wire_entry(e: EntryRecord) -> Entry {
    Entry {
        id: e.id,
        spiffe_id: e.spiffe_id,
        parent_id: e.parent_id,
        selectors: e.selectors,
        x509_svid_ttl_seconds: e.x509_svid_ttl_secs,
        jwt_svid_ttl_seconds: e.jwt_svid_ttl_secs,
        dns_names: e.dns_names,
        hint: e.hint,
        revision: e.revision,
        created_at: e.created_at,
    }
}

fn wire_agent(n: NodeRecord) -> AttestedAgent {
    AttestedAgent {
        spiffe_id: n.spiffe_id,
        method: n.method,
        attested_at: n.attested_at,
        node_svid_expires_at: n.svid_not_after,
        node_svid_serial: n.svid_serial,
        evicted: n.evicted,
        banned: n.banned,
        lineage: n
            .attested_with
            .as_ref()
            .map(|w| w.lineage.clone())
            .unwrap_or_default(),
        certificate_serial: n
            .attested_with
            .and_then(|w| w.certificate_serial)
            .unwrap_or_default(),
    }
}

/// A gRPC channel over the admin socket (HTTP/2 prior knowledge on a Unix stream).
pub async fn channel(socket: &Path) -> Result<tonic::transport::Channel, Error> {
    let path: PathBuf = socket.to_owned();
    let unreachable = |e: &dyn std::fmt::Display| {
        Error::Admin(format!(
            "cannot reach the issuer's admin socket {}: {e}; is `issuer serve` running with this configuration?",
            socket.display()
        ))
    };
    // The URI is required by the API but unused: the connector always dials the socket.
    tonic::transport::Endpoint::from_static("http://issuer-admin")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(TokioIo::new)
            }
        }))
        .await
        .map_err(|e| unreachable(&e))
}

/// The Entries client over the admin socket.
pub async fn entries(socket: &Path) -> Result<EntriesClient<tonic::transport::Channel>, Error> {
    Ok(EntriesClient::new(channel(socket).await?))
}

/// The Agents client over the admin socket.
pub async fn agents(socket: &Path) -> Result<AgentsClient<tonic::transport::Channel>, Error> {
    Ok(AgentsClient::new(channel(socket).await?))
}

/// The Tokens client over the admin socket.
pub async fn tokens(socket: &Path) -> Result<TokensClient<tonic::transport::Channel>, Error> {
    Ok(TokensClient::new(channel(socket).await?))
}

/// A gRPC error from the admin socket as the CLI reports it.
pub fn from_status(status: Status) -> Error {
    Error::Admin(status.message().to_owned())
}
