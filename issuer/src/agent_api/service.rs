//! The `plant.agent.v1.Agent` service: attestation, node SVID renewal, entry sync and SVID
//! minting, each through the one issuance pipeline ([`Authority::issue`]).

use std::sync::Arc;
use std::time::Duration;

use est::csr::VerifiedCsr;
use proto::agent::agent_server::Agent;
use proto::agent::{
    attest_request, attest_response, evidence, AttestRequest, AttestResponse, Evidence,
    MintJwtSvidRequest, MintJwtSvidResponse, MintX509SvidsRequest, MintX509SvidsResponse, NodeSvid,
    RegistrationEntry, RenewNodeSvidRequest, ReportProxyEventsRequest, ReportProxyEventsResponse,
    SyncEntriesRequest, SyncEntriesResponse, X509Svid,
};
use proto::SpiffeId;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::jwt::JwtKey;
use super::peer::{caller, Caller};
use super::proxy_events;
use crate::attestation::{AttestedNode, NodeAttestor, Refusal, Step, CHALLENGE_LIFETIME};
use crate::authority::Authority;
use crate::grant::Grant;
use crate::serial::Serial;
use crate::store::{EntryRecord, NodeRecord, Recorded, Status as CertStatus};
use crate::Error;

/// Most X509-SVIDs one MintX509Svids call may ask for.
pub const MAX_BATCH: usize = 1000;
/// Longest CSR accepted.
const MAX_CSR_BYTES: usize = 16 * 1024;

/// The agent API's state.
#[derive(Debug, Clone)]
pub struct AgentService {
    authority: Arc<Authority>,
    attestors: Arc<Vec<Box<dyn NodeAttestor>>>,
    jwt: JwtKey,
    x509_svid_ttl: Duration,
    jwt_svid_ttl: Duration,
    /// `Attest` deadlines: for the evidence, and for the whole attestation.
    attest_deadlines: (Duration, Duration),
}

impl AgentService {
    /// The service over `authority` with these attestors and JWT key.
    pub fn new(
        authority: Arc<Authority>,
        attestors: Vec<Box<dyn NodeAttestor>>,
        jwt: JwtKey,
        config: &crate::config::AgentApiConfig,
    ) -> Self {
        Self {
            authority,
            attestors: Arc::new(attestors),
            jwt,
            x509_svid_ttl: config.x509_svid_ttl,
            jwt_svid_ttl: config.jwt_svid_ttl,
            attest_deadlines: (config.first_message_timeout, config.attestation_timeout),
        }
    }

    /// Runs one attestation over the stream: evidence, maybe a challenge and its answer,
    /// then the node SVID.
    async fn attest_stream(
        &self,
        mut requests: super::inbound::Inbound,
        responses: &tokio::sync::mpsc::Sender<Result<AttestResponse, Status>>,
        source: Option<std::net::IpAddr>,
    ) -> Result<NodeSvid, Status> {
        let first = requests
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream ended before any evidence"))?;
        let Some(attest_request::Step::Evidence(evidence)) = first.step else {
            return Err(Status::invalid_argument(
                "an attestation opens with Evidence",
            ));
        };
        let method = method_of(&evidence)?;
        // A source locked out for refused attempts is refused before its evidence is read.
        if let Err(locked) = self.authority.source_admitted(source) {
            self.authority.metrics.attestation(method, "locked_out");
            return Err(Status::resource_exhausted(format!(
                "too many refused attestations or enrollments from your address; retry in {} s",
                locked.retry_after
            )));
        }
        let csr = parse_csr(&evidence.csr)?;
        let attestor = self
            .attestors
            .iter()
            .find(|a| a.method() == method)
            .ok_or_else(|| {
                Status::failed_precondition(format!(
                    "node attestation method {method} is not enabled on this issuer"
                ))
            })?;
        let attested = match attestor.begin(&evidence) {
            Ok(Step::Attested(node)) => node,
            Ok(Step::Challenge { challenge, pending }) => {
                responses
                    .send(Ok(AttestResponse {
                        step: Some(attest_response::Step::Challenge(challenge)),
                    }))
                    .await
                    .map_err(|_| Status::cancelled("the agent went away"))?;
                let answer = tokio::time::timeout(CHALLENGE_LIFETIME, requests.message())
                    .await
                    .map_err(|_| {
                        self.refused(
                            method,
                            source,
                            &Refusal::new(
                                "challenge_expired",
                                format!(
                                    "no answer to the challenge within {} s",
                                    CHALLENGE_LIFETIME.as_secs()
                                ),
                            ),
                        )
                    })??
                    .ok_or_else(|| {
                        Status::invalid_argument("the stream ended before the answer")
                    })?;
                let Some(attest_request::Step::ChallengeResponse(answer)) = answer.step else {
                    return Err(Status::invalid_argument(
                        "after a Challenge the agent sends a ChallengeResponse",
                    ));
                };
                pending
                    .verify(&answer)
                    .map_err(|refusal| self.refused(method, source, &refusal))?
            }
            Err(refusal) => return Err(self.refused(method, source, &refusal)),
        };
        let previous = self
            .admit(&attested)
            .map_err(to_status)?
            .map_err(|refusal| self.refused(method, source, &refusal))?;
        let svid = self
            .issue_node_svid(&attested, previous, &csr, &evidence)
            .await
            .map_err(to_status)?;
        self.authority.metrics.attestation(method, "attested");
        Ok(svid)
    }

    /// Counts and audits a refusal; the agent gets PermissionDenied with its message. A
    /// refusal of evidence naming nothing this CA made (an unknown join token, a foreign
    /// certificate, an untrusted TPM) counts toward the source's lockout and goes into the
    /// source's audit summary (`lockout`), not a record each; one naming a real token or
    /// certificate of ours (used, expired, revoked) is audited on its own. Neither waits for
    /// a flush: a refused attempt must not cost the disk a sync.
    fn refused(
        &self,
        method: &'static str,
        source: Option<std::net::IpAddr>,
        refusal: &Refusal,
    ) -> Status {
        tracing::info!(method, reason = refusal.reason, "node attestation refused");
        if refusal.reason == "join_token_unknown" {
            self.authority.token_failed(source);
        }
        self.authority.metrics.attestation(method, refusal.reason);
        let detail = serde_json::json!({
            "method": method,
            "reason": refusal.reason,
            "message": crate::lockout::truncated(&refusal.message),
        });
        if names_our_credential(refusal.reason) {
            self.authority
                .audit_unless_unwritable("agent.attestation_refused", detail);
        } else {
            self.authority.refused_unauthenticated(
                source,
                "attestation_refused",
                "agent.attestation_refused",
                detail,
            );
        }
        Status::permission_denied(refusal.message.clone())
    }

    /// The node SPIFFE ID of an attested node.
    fn node_spiffe_id(&self, node: &AttestedNode) -> Result<SpiffeId, Error> {
        self.authority
            .trust_domain_id()?
            .id(&format!("/agent/{}/{}", node.method, node.id))
            .map_err(|e| {
                Error::Attestation(Refusal::new(
                    "bad_node_id",
                    format!("the node id {:?} can't form a SPIFFE ID: {e}", node.id),
                ))
            })
    }

    /// Whether a node that proved itself may have its node SVID: not banned (by node id, or
    /// by what it attested with), and, if the node is known, proving the credential lineage
    /// the node is bound to. Returns the node as known now; the outer error is the issuer's,
    /// the inner one a refusal to audit.
    fn admit(&self, node: &AttestedNode) -> Result<Result<Option<NodeRecord>, Refusal>, Error> {
        let spiffe_id = match self.node_spiffe_id(node) {
            Ok(id) => id,
            Err(Error::Attestation(refusal)) => return Ok(Err(refusal)),
            Err(e) => return Err(e),
        };
        let nodes = &self.authority.store.nodes;
        let previous = nodes.get(spiffe_id.as_str())?;
        if previous.as_ref().is_some_and(|p| !p.can_reattest) {
            // Join-token ids are the token's: a second attestation under one would mean a
            // token was used twice.
            return Ok(Err(Refusal::new(
                "already_attested",
                format!("node {spiffe_id} is attested already and can't attest again"),
            )));
        }
        let banned = match previous.as_ref().filter(|p| p.banned) {
            Some(p) => Some(p.spiffe_id.clone()),
            None => nodes.banned_credential(&node.attested_with)?,
        };
        if let Some(banned) = banned {
            return Ok(Err(Refusal::new(
                "node_banned",
                format!(
                    "node {spiffe_id} is refused: the PKI operator banned {banned}, which \
                     attested with this {}; ask them to unban it if that was a mistake",
                    credential_noun(node.method)
                ),
            )));
        }
        if let Some(bound) = previous.as_ref().filter(|p| !p.admits(&node.attested_with)) {
            return Ok(Err(Refusal::new(
                "node_conflict",
                format!(
                    "node {spiffe_id} is bound to the {} it was first attested with ({}); \
                     this one ({}) is of another enrollment and can't take the node over. If \
                     the device was re-commissioned, the PKI operator evicts the old node \
                     first: `issuer agent evict {spiffe_id}`",
                    credential_noun(node.method),
                    bound
                        .attested_with
                        .as_ref()
                        .map_or("unknown", |w| w.lineage.as_str()),
                    node.attested_with.lineage,
                ),
            )));
        }
        Ok(Ok(previous))
    }

    async fn issue_node_svid(
        &self,
        node: &AttestedNode,
        previous: Option<NodeRecord>,
        csr: &VerifiedCsr,
        evidence: &Evidence,
    ) -> Result<NodeSvid, Error> {
        let authority = &self.authority;
        let spiffe_id = self.node_spiffe_id(node)?;
        let (der, record) = self
            .issue(
                crate::profile::NODE_SVID,
                &spiffe_id,
                csr,
                vec![],
                None,
                format!("node:{spiffe_id}"),
                previous.as_ref().map(|p| p.svid_serial.as_str()),
            )
            .await?;
        let recorded = authority.store.nodes.record_attestation(
            previous.as_ref(),
            &NodeRecord {
                spiffe_id: spiffe_id.to_string(),
                method: node.method.to_owned(),
                attested_at: authority.now().unix_timestamp(),
                svid_serial: record.0.to_string(),
                svid_not_after: record.1,
                evicted: false,
                can_reattest: node.can_reattest,
                attested_with: Some(node.attested_with.clone()),
                released: false,
                banned: false,
            },
        )?;
        // The SVID just signed is never handed out in these cases, and it authenticates
        // nothing: only the SVID a node record names does.
        match recorded {
            Recorded::Done => {}
            Recorded::Banned(banned) => {
                return Err(Error::Attestation(Refusal::new(
                    "node_banned",
                    format!("node {spiffe_id} is refused: the PKI operator banned {banned}"),
                )))
            }
            Recorded::Changed => {
                return Err(Error::Store(format!(
                    "node {spiffe_id} changed while it attested (another attestation, an \
                     eviction or a ban); attest again"
                )))
            }
        }
        let mut detail = serde_json::json!({
            "spiffe_id": spiffe_id.as_str(), "method": node.method,
            "svid_serial": record.0.to_string(), "reattested": previous.is_some(),
            "lineage": node.attested_with.lineage,
            "certificate_serial": node.attested_with.certificate_serial,
        });
        if let Some(evidence::Method::JoinToken(_)) = &evidence.method {
            detail["token_id"] = node.id.clone().into();
        }
        authority.audit("agent.attested", detail)?;
        authority.store.durability.commit().await?;
        tracing::info!(spiffe_id = %spiffe_id, method = node.method, "node attested");
        Ok(self.node_svid(&spiffe_id, der))
    }

    fn node_svid(&self, spiffe_id: &SpiffeId, der: Vec<u8>) -> NodeSvid {
        NodeSvid {
            spiffe_id: spiffe_id.to_string(),
            chain: self.chain(der),
            bundle: vec![self.authority.ca.root_der().to_vec()],
        }
    }

    /// Leaf first, then the CAs up to (not including) the root.
    fn chain(&self, leaf: Vec<u8>) -> Vec<Vec<u8>> {
        let above = self.authority.ca.chain_above(&leaf, self.authority.now());
        std::iter::once(leaf).chain(above).collect()
    }

    /// One SVID through the pipeline; returns the DER and (serial, notAfter). `renews` is
    /// marked superseded if it is still valid (never un-revoking an evicted node's SVID).
    #[allow(clippy::too_many_arguments)]
    async fn issue(
        &self,
        label: &str,
        spiffe_id: &SpiffeId,
        csr: &VerifiedCsr,
        dns: Vec<String>,
        lifetime: Option<Duration>,
        owner: String,
        renews: Option<&str>,
    ) -> Result<(Vec<u8>, (Serial, i64)), Error> {
        let authority = &self.authority;
        let renews = match renews.and_then(Serial::parse) {
            Some(serial) => authority
                .store
                .certificates
                .get(&serial)?
                .filter(|r| r.status == CertStatus::Valid)
                .map(|_| serial),
            None => None,
        };
        let grant = Grant {
            label: label.to_owned(),
            common_name: common_name(spiffe_id),
            dns,
            ips: vec![],
            spiffe_id: Some(spiffe_id.clone()),
            lifetime,
            owner,
            renews,
            token: None,
        };
        // Only the key is taken from the CSR; whatever else it asks for is not granted, and
        // a CSR asking for a CA certificate is refused outright.
        if csr.requested().ca || csr.requested().cert_sign {
            return Err(Error::Est(est::Error::refused(
                est::Refusal::BadRequest,
                "the CSR asks for a CA certificate; SVIDs are end-entity certificates",
            )));
        }
        let der = authority.issue(&grant, csr.public_key()).await?;
        let (serial, not_after) = serial_and_not_after(&der)?;
        Ok((der, (serial, not_after)))
    }

    /// Refuses a node whose device certificate (the one it attested with) is revoked: even
    /// if its eviction failed, its node SVID is not renewed.
    fn credential_not_revoked(&self, caller: &Caller) -> Result<(), Error> {
        let Some(serial) = caller
            .node
            .attested_with
            .as_ref()
            .and_then(|w| w.certificate_serial.as_deref())
            .and_then(Serial::parse)
        else {
            return Ok(());
        };
        let revoked = self
            .authority
            .store
            .certificates
            .get(&serial)?
            .is_some_and(|r| r.status == CertStatus::Revoked);
        if revoked {
            return Err(Error::Denied(format!(
                "the device certificate {serial} node {} attested with is revoked; its node \
                 SVID is not renewed",
                caller.spiffe_id
            )));
        }
        Ok(())
    }

    fn own_entry(&self, caller: &Caller, id: &str) -> Result<EntryRecord, Status> {
        let entry = self
            .authority
            .store
            .entries
            .get(id)
            .map_err(to_status)?
            .filter(|e| e.parent_id == caller.spiffe_id.as_str());
        // The same answer for "absent" and "another node's": a node learns nothing of
        // entries that are not its own.
        entry.ok_or_else(|| {
            Status::permission_denied(format!(
                "entry {id:?} is not an entry of node {}",
                caller.spiffe_id
            ))
        })
    }
}

#[tonic::async_trait]
impl Agent for AgentService {
    type AttestStream = ReceiverStream<Result<AttestResponse, Status>>;

    async fn attest(
        &self,
        request: Request<Streaming<AttestRequest>>,
    ) -> Result<Response<Self::AttestStream>, Status> {
        let (sender, receiver) = tokio::sync::mpsc::channel(2);
        let this = self.clone();
        let source = request
            .extensions()
            .get::<super::Peer>()
            .map(|p| p.address.ip());
        let (first_message, whole) = self.attest_deadlines;
        let requests = super::inbound::Inbound::new(request.into_inner(), first_message, whole);
        tokio::spawn(async move {
            // A refusal writes no record of its own that must be on disk first (see
            // `refused`): no flush per refused attempt.
            let outcome = this.attest_stream(requests, &sender, source).await;
            let message = outcome.map(|svid| AttestResponse {
                step: Some(attest_response::Step::NodeSvid(svid)),
            });
            let _ = sender.send(message).await;
        });
        Ok(Response::new(ReceiverStream::new(receiver)))
    }

    async fn renew_node_svid(
        &self,
        request: Request<RenewNodeSvidRequest>,
    ) -> Result<Response<NodeSvid>, Status> {
        let caller = caller(&self.authority, &request)?;
        self.credential_not_revoked(&caller).map_err(to_status)?;
        let method = caller.node.method.as_str();
        if self
            .attestors
            .iter()
            .any(|a| a.method() == method && a.renews_by_attesting())
        {
            return Err(Status::failed_precondition(format!(
                "{method} nodes renew their node SVID by attesting again, not over mTLS (a \
                 copy of the node's files must not outlive its SVID): attest with the {method} \
                 method; [attestation.{method}] renew_by_attesting = false allows mTLS renewal"
            )));
        }
        let csr = parse_csr(&request.get_ref().csr)?;
        let (der, (serial, not_after)) = self
            .issue(
                crate::profile::NODE_SVID,
                &caller.spiffe_id,
                &csr,
                vec![],
                None,
                format!("node:{}", caller.spiffe_id),
                Some(&caller.node.svid_serial),
            )
            .await
            .map_err(to_status)?;
        self.authority
            .store
            .nodes
            .update(caller.spiffe_id.as_str(), |n| {
                n.svid_serial = serial.to_string();
                n.svid_not_after = not_after;
            })
            .map_err(to_status)?;
        self.authority
            .store
            .durability
            .commit()
            .await
            .map_err(to_status)?;
        Ok(Response::new(self.node_svid(&caller.spiffe_id, der)))
    }

    async fn sync_entries(
        &self,
        request: Request<SyncEntriesRequest>,
    ) -> Result<Response<SyncEntriesResponse>, Status> {
        let caller = caller(&self.authority, &request)?;
        let entries = self
            .authority
            .list_entries(Some(caller.spiffe_id.as_str()))
            .map_err(to_status)?;
        Ok(Response::new(SyncEntriesResponse {
            entries: entries.into_iter().map(wire_entry).collect(),
            x509_bundle: vec![self.authority.ca.root_der().to_vec()],
            jwt_bundle: self.jwt.jwks(),
            crl: self
                .authority
                .revocation
                .crl()
                .current()
                .map(|c| vec![c.to_vec()])
                .unwrap_or_default(),
        }))
    }

    async fn mint_x509_svids(
        &self,
        request: Request<MintX509SvidsRequest>,
    ) -> Result<Response<MintX509SvidsResponse>, Status> {
        let caller = caller(&self.authority, &request)?;
        let requests = &request.get_ref().requests;
        if requests.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} SVIDs asked for in one call; at most {MAX_BATCH}, split the batch",
                requests.len()
            )));
        }
        // Every entry is checked before anything is signed: one foreign entry refuses the
        // whole batch, naming it.
        let mut work = Vec::with_capacity(requests.len());
        for item in requests {
            let entry = self.own_entry(&caller, &item.entry_id)?;
            let csr = parse_csr(&item.csr).map_err(|s| {
                Status::invalid_argument(format!("entry {}: {}", entry.id, s.message()))
            })?;
            let spiffe_id = SpiffeId::new(&entry.spiffe_id).map_err(|e| {
                Status::internal(format!("entry {}: stored SPIFFE ID: {e}", entry.id))
            })?;
            let owner = svid_owner(&entry, &caller.spiffe_id);
            work.push((entry, csr, spiffe_id, owner));
        }
        // Signed concurrently: each issuance waits for its durable commit, and concurrent
        // ones share a flush (group commit), so a batch costs a few fsyncs, not one each.
        let mut tasks = tokio::task::JoinSet::new();
        for (index, (entry, csr, spiffe_id, owner)) in work.into_iter().enumerate() {
            let this = self.clone();
            tasks.spawn(async move {
                let lifetime = match entry.x509_svid_ttl_secs {
                    0 => this.x509_svid_ttl,
                    secs => Duration::from_secs(secs.into()),
                };
                let issued = this
                    .issue(
                        crate::profile::SVID,
                        &spiffe_id,
                        &csr,
                        entry.dns_names.clone(),
                        Some(lifetime),
                        owner,
                        None,
                    )
                    .await;
                issued.map(|(der, _)| {
                    (
                        index,
                        X509Svid {
                            entry_id: entry.id,
                            spiffe_id: spiffe_id.to_string(),
                            chain: this.chain(der),
                        },
                    )
                })
            });
        }
        let mut svids: Vec<Option<X509Svid>> = vec![None; tasks.len()];
        while let Some(joined) = tasks.join_next().await {
            let (index, svid) = joined
                .map_err(|e| Status::internal(format!("minting task failed: {e}")))?
                .map_err(to_status)?;
            svids[index] = Some(svid);
        }
        let svids = svids.into_iter().flatten().collect();
        Ok(Response::new(MintX509SvidsResponse { svids }))
    }

    async fn mint_jwt_svid(
        &self,
        request: Request<MintJwtSvidRequest>,
    ) -> Result<Response<MintJwtSvidResponse>, Status> {
        let caller = caller(&self.authority, &request)?;
        let body = request.get_ref();
        let entry = self.own_entry(&caller, &body.entry_id)?;
        if body.audience.is_empty() || body.audience.iter().any(|a| a.trim().is_empty()) {
            return Err(Status::invalid_argument(
                "a JWT-SVID needs at least one non-empty audience",
            ));
        }
        let ttl = match entry.jwt_svid_ttl_secs {
            0 => self.jwt_svid_ttl,
            secs => Duration::from_secs(secs.into()),
        };
        let now = self.authority.now().unix_timestamp();
        let expires_at = now + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        let token = self
            .jwt
            .mint(&entry.spiffe_id, &body.audience, now, expires_at)
            .map_err(to_status)?;
        Ok(Response::new(MintJwtSvidResponse {
            spiffe_id: entry.spiffe_id,
            token,
            expires_at,
        }))
    }

    async fn report_proxy_events(
        &self,
        request: Request<ReportProxyEventsRequest>,
    ) -> Result<Response<ReportProxyEventsResponse>, Status> {
        let caller = caller(&self.authority, &request)?;
        let events = &request.get_ref().events;
        if events.len() > proxy_events::MAX_EVENTS {
            return Err(Status::invalid_argument(format!(
                "{} proxy events in one call; at most {}, split the batch",
                events.len(),
                proxy_events::MAX_EVENTS
            )));
        }
        // Every event is checked before any is recorded: a bad one refuses the whole call,
        // naming it, so the agent never has to work out which of a batch went in.
        let mut records = Vec::with_capacity(events.len());
        for (index, event) in events.iter().enumerate() {
            let record = proxy_events::audit_record(event)
                .map_err(|why| Status::invalid_argument(format!("proxy event {index}: {why}")))?;
            records.push(record);
        }
        for (kind, mut detail) in records {
            detail["node"] = caller.spiffe_id.as_str().into();
            self.authority.audit(kind, detail).map_err(to_status)?;
        }
        // On disk before the agent forgets them.
        self.authority
            .store
            .durability
            .commit()
            .await
            .map_err(to_status)?;
        Ok(Response::new(ReportProxyEventsResponse {}))
    }
}

/// What a node of `method` proves itself with, in refusals.
fn credential_noun(method: &str) -> &'static str {
    match method {
        "x509pop" => "device certificate",
        "tpm" => "TPM",
        _ => "join token",
    }
}

/// Whether a refusal with this reason names a token or certificate this CA made (a node
/// retrying with a used token, a revoked device certificate): not a stranger's attempt.
fn names_our_credential(reason: &str) -> bool {
    matches!(
        reason,
        "join_token_used"
            | "join_token_expired"
            | "join_token_revoked"
            | "token_kind"
            | "certificate_expired"
            | "certificate_revoked"
            | "certificate_superseded"
            | "certificate_profile"
            | "node_conflict"
            | "node_banned"
    )
}

fn method_of(evidence: &Evidence) -> Result<&'static str, Status> {
    match &evidence.method {
        Some(evidence::Method::JoinToken(_)) => Ok(crate::attestation::join_token::METHOD),
        Some(evidence::Method::X509pop(_)) => Ok(crate::attestation::x509pop::METHOD),
        Some(evidence::Method::Tpm(_)) => Ok("tpm"),
        None => Err(Status::invalid_argument(
            "the evidence names no attestation method",
        )),
    }
}

fn parse_csr(der: &[u8]) -> Result<VerifiedCsr, Status> {
    if der.is_empty() {
        return Err(Status::invalid_argument("the CSR is missing"));
    }
    if der.len() > MAX_CSR_BYTES {
        return Err(Status::invalid_argument("the CSR is too large"));
    }
    VerifiedCsr::from_der(der).map_err(|e| Status::invalid_argument(format!("the CSR: {e}")))
}

/// A commonName for an SVID (at most 64 characters, RFC 5280 ub-common-name): the SPIFFE
/// ID's path, shortened from the left; the URI SAN carries the full identity.
fn common_name(spiffe_id: &SpiffeId) -> String {
    let path = spiffe_id.path().trim_start_matches('/');
    let start = path.len().saturating_sub(64);
    // The path is ASCII (SPIFFE-ID.md §2.2), so any byte index is a char boundary.
    path.get(start..).unwrap_or("svid").to_owned()
}

fn serial_and_not_after(der: &[u8]) -> Result<(Serial, i64), Error> {
    use der::Decode;
    let certificate =
        x509_cert::Certificate::from_der(der).map_err(|e| Error::Certificate(e.to_string()))?;
    let tbs = &certificate.tbs_certificate;
    let serial = Serial::from_bytes(tbs.serial_number.as_bytes())
        .ok_or_else(|| Error::Certificate("issued serial does not parse".into()))?;
    Ok((
        serial,
        tbs.validity.not_after.to_unix_duration().as_secs() as i64,
    ))
}

/// The inventory owner of a workload SVID: `legacy:<device>@<gateway node>` for a legacy
/// device's identity, so `issuer inventory` tells which PLC a certificate is for and which
/// gateway holds it; `entry:<id>` otherwise.
fn svid_owner(entry: &EntryRecord, node: &SpiffeId) -> String {
    let device = entry.selectors.iter().find_map(|text| {
        proto::Selector::new(text)
            .ok()
            .and_then(|s| s.legacy_device_name().map(str::to_owned))
    });
    match device {
        Some(name) => format!("legacy:{name}@{node}"),
        None => format!("entry:{}", entry.id),
    }
}

fn wire_entry(e: EntryRecord) -> RegistrationEntry {
    RegistrationEntry {
        id: e.id,
        spiffe_id: e.spiffe_id,
        parent_id: e.parent_id,
        selectors: e.selectors,
        x509_svid_ttl_seconds: e.x509_svid_ttl_secs,
        jwt_svid_ttl_seconds: e.jwt_svid_ttl_secs,
        dns_names: e.dns_names,
        hint: e.hint,
        revision: e.revision,
    }
}

/// An issuer error as the agent API answers it: the code from [`Error::grpc_code`]; causes
/// that are the issuer's own are logged here and reported without internals.
pub(super) fn to_status(error: Error) -> Status {
    let code = error.grpc_code();
    match error {
        Error::Attestation(refusal) => Status::permission_denied(refusal.message),
        Error::Key(e) if e.is_transient() => Status::unavailable(format!("{e}; retry shortly")),
        error if code == tonic::Code::Internal => {
            tracing::error!(%error, "agent API request failed");
            Status::internal("the issuer failed; see its log")
        }
        error if code == tonic::Code::Unavailable && !matches!(error, Error::Est(_)) => {
            tracing::error!(%error, "agent API request failed");
            Status::unavailable(error.to_string())
        }
        error => Status::new(code, error.to_string()),
    }
}
