//! `plant.admin.v1` messages to and from the issuer's domain types: the one place that knows
//! both. The server turns requests into domain types and answers into messages; the CLI
//! turns the answers back, so what it prints (and its JSON) is the domain types' own.

use proto::admin as wire;

use crate::authority::{SigningKeyStatus, StatusReport};
use crate::registration::NewEntry;
use crate::revocation::{RevocationReason, RevokeRequest};
use crate::serial::Serial;
use crate::signing_key::Phase;
use crate::store::{
    AuditEvent, AuditRecord, CertificateRecord, EntryRecord, InventoryPage, InventoryQuery,
    NodeRecord, Status, TokenKind, TokenRecord, TokenState, Verification,
};
use crate::tokens::{CreatedToken, TokenRequest};
use crate::Error;

/// An answer field the CLI can't read: the issuer and the command disagree on the protocol.
fn not_understood(what: &str) -> Error {
    Error::Admin(format!(
        "the issuer's admin socket answered {what}, which this command does not understand; \
         is the running issuer the same version as this `issuer`?"
    ))
}

// --- tokens ----------------------------------------------------------------------------------

impl From<TokenKind> for wire::TokenKind {
    fn from(kind: TokenKind) -> Self {
        match kind {
            TokenKind::Enrollment => Self::Enrollment,
            TokenKind::Join => Self::Join,
        }
    }
}

impl From<wire::TokenKind> for TokenKind {
    fn from(kind: wire::TokenKind) -> Self {
        match kind {
            wire::TokenKind::Unspecified | wire::TokenKind::Enrollment => Self::Enrollment,
            wire::TokenKind::Join => Self::Join,
        }
    }
}

impl From<&TokenRequest> for wire::CreateTokensRequest {
    fn from(r: &TokenRequest) -> Self {
        Self {
            kind: wire::TokenKind::from(r.kind).into(),
            label: r.label.clone(),
            subject: r.subject.clone(),
            ttl_seconds: r.ttl_secs,
            dns_names: r.dns.clone(),
            ip_addresses: r.ips.iter().map(ToString::to_string).collect(),
            // Past u32, still past the limit: the issuer refuses it with the limit named.
            count: r.count.map(|c| u32::try_from(c).unwrap_or(u32::MAX)),
        }
    }
}

impl TryFrom<wire::CreateTokensRequest> for TokenRequest {
    type Error = Error;
    fn try_from(r: wire::CreateTokensRequest) -> Result<Self, Error> {
        let ips = r
            .ip_addresses
            .iter()
            .map(|ip| {
                ip.parse()
                    .map_err(|_| Error::Admin(format!("{ip:?} is not an IP address")))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            kind: r.kind().into(),
            label: r.label,
            subject: r.subject,
            ttl_secs: r.ttl_seconds,
            dns: r.dns_names,
            ips,
            count: r.count.map(|c| c as usize),
        })
    }
}

impl From<CreatedToken> for wire::CreatedToken {
    fn from(t: CreatedToken) -> Self {
        Self {
            id: t.id,
            token: t.token,
            kind: wire::TokenKind::from(t.kind).into(),
            label: t.label,
            subject: t.subject,
            expires_at: t.expires_at,
        }
    }
}

impl From<wire::CreatedToken> for CreatedToken {
    fn from(t: wire::CreatedToken) -> Self {
        Self {
            kind: t.kind().into(),
            id: t.id,
            token: t.token,
            label: t.label,
            subject: t.subject,
            expires_at: t.expires_at,
        }
    }
}

/// A stored token and its state as the Tokens service lists it.
pub(crate) fn token(t: TokenRecord, state: TokenState) -> wire::Token {
    wire::Token {
        id: t.id,
        kind: wire::TokenKind::from(t.kind).into(),
        label: t.label,
        subject: t.subject.unwrap_or_default(),
        dns_names: t.dns,
        ip_addresses: t.ips.iter().map(ToString::to_string).collect(),
        created_at: t.created_at,
        expires_at: t.expires_at,
        state: match state {
            TokenState::Unused => wire::TokenState::Unused,
            TokenState::Spent => wire::TokenState::Spent,
            TokenState::Expired => wire::TokenState::Expired,
            TokenState::Revoked => wire::TokenState::Revoked,
        }
        .into(),
        used_at: t.used_at.unwrap_or_default(),
        revoked_at: t.revoked_at.unwrap_or_default(),
    }
}

// --- certificates ----------------------------------------------------------------------------

impl From<Status> for wire::CertificateStatus {
    fn from(status: Status) -> Self {
        match status {
            Status::Valid => Self::Valid,
            Status::Expired => Self::Expired,
            Status::Revoked => Self::Revoked,
            Status::Superseded => Self::Superseded,
        }
    }
}

/// A certificate status from the wire; `None` for UNSPECIFIED (in a query: any status).
fn status(status: wire::CertificateStatus) -> Option<Status> {
    match status {
        wire::CertificateStatus::Unspecified => None,
        wire::CertificateStatus::Valid => Some(Status::Valid),
        wire::CertificateStatus::Expired => Some(Status::Expired),
        wire::CertificateStatus::Revoked => Some(Status::Revoked),
        wire::CertificateStatus::Superseded => Some(Status::Superseded),
    }
}

impl TryFrom<CertificateRecord> for wire::Certificate {
    type Error = Error;
    fn try_from(r: CertificateRecord) -> Result<Self, Error> {
        Ok(Self {
            status: wire::CertificateStatus::from(r.status).into(),
            serial: r.serial.to_string(),
            subject: r.subject,
            sans: r.sans,
            label: r.label,
            owner: r.owner,
            issued_at: r.issued_at,
            not_after: r.not_after,
            renews: r.renews.map(|s| s.to_string()),
            der: r.der,
        })
    }
}

impl TryFrom<wire::Certificate> for CertificateRecord {
    type Error = Error;
    fn try_from(c: wire::Certificate) -> Result<Self, Error> {
        let status = status(c.status()).ok_or_else(|| not_understood("a certificate status"))?;
        let serial =
            |text: &str| Serial::parse(text).ok_or_else(|| not_understood("a certificate serial"));
        Ok(Self {
            serial: serial(&c.serial)?,
            subject: c.subject,
            sans: c.sans,
            label: c.label,
            owner: c.owner,
            issued_at: c.issued_at,
            not_after: c.not_after,
            status,
            renews: c.renews.as_deref().map(serial).transpose()?,
            der: c.der,
        })
    }
}

impl From<&InventoryQuery> for wire::ListCertificatesRequest {
    fn from(q: &InventoryQuery) -> Self {
        Self {
            expiring_within_seconds: q.expiring_within_secs,
            label: q.label.clone(),
            status: q
                .status
                .map_or(wire::CertificateStatus::Unspecified, Into::into)
                .into(),
            owner: q.owner.clone(),
            subject: q.subject.clone(),
            spiffe_prefix: q.spiffe_prefix.clone(),
            after: q.after.clone(),
            limit: q.limit.map(|l| u32::try_from(l).unwrap_or(u32::MAX)),
            skip_total: q.skip_total,
        }
    }
}

impl From<wire::ListCertificatesRequest> for InventoryQuery {
    fn from(r: wire::ListCertificatesRequest) -> Self {
        Self {
            status: status(r.status()),
            expiring_within_secs: r.expiring_within_seconds,
            label: r.label,
            owner: r.owner,
            subject: r.subject,
            spiffe_prefix: r.spiffe_prefix,
            after: r.after,
            limit: r.limit.map(|l| l as usize),
            skip_total: r.skip_total,
        }
    }
}

impl TryFrom<InventoryPage> for wire::ListCertificatesResponse {
    type Error = Error;
    fn try_from(page: InventoryPage) -> Result<Self, Error> {
        Ok(Self {
            certificates: page
                .certificates
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            next: page.next,
            total: page.total.map(|t| t as u64),
        })
    }
}

impl TryFrom<wire::ListCertificatesResponse> for InventoryPage {
    type Error = Error;
    fn try_from(r: wire::ListCertificatesResponse) -> Result<Self, Error> {
        Ok(Self {
            certificates: r
                .certificates
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            next: r.next,
            total: r.total.map(|t| usize::try_from(t).unwrap_or(usize::MAX)),
        })
    }
}

impl From<RevocationReason> for wire::RevocationReason {
    fn from(reason: RevocationReason) -> Self {
        match reason {
            RevocationReason::Unspecified => Self::Unspecified,
            RevocationReason::KeyCompromise => Self::KeyCompromise,
            RevocationReason::AffiliationChanged => Self::AffiliationChanged,
            RevocationReason::Superseded => Self::Superseded,
            RevocationReason::CessationOfOperation => Self::CessationOfOperation,
        }
    }
}

impl From<wire::RevocationReason> for RevocationReason {
    fn from(reason: wire::RevocationReason) -> Self {
        match reason {
            wire::RevocationReason::Unspecified => Self::Unspecified,
            wire::RevocationReason::KeyCompromise => Self::KeyCompromise,
            wire::RevocationReason::AffiliationChanged => Self::AffiliationChanged,
            wire::RevocationReason::Superseded => Self::Superseded,
            wire::RevocationReason::CessationOfOperation => Self::CessationOfOperation,
        }
    }
}

impl From<&RevokeRequest> for wire::RevokeCertificateRequest {
    fn from(r: &RevokeRequest) -> Self {
        Self {
            serial: r.serial.clone(),
            reason: wire::RevocationReason::from(r.reason).into(),
        }
    }
}

impl TryFrom<wire::RevokeCertificateRequest> for RevokeRequest {
    type Error = Error;
    fn try_from(r: wire::RevokeCertificateRequest) -> Result<Self, Error> {
        // An unknown number is a reason this issuer can't put in a CRL: refuse it rather
        // than revoke for "unspecified".
        let reason = wire::RevocationReason::try_from(r.reason)
            .map_err(|_| Error::Admin(format!("{} is not a CRL reason code", r.reason)))?;
        Ok(Self {
            serial: r.serial,
            reason: reason.into(),
        })
    }
}

// --- audit -----------------------------------------------------------------------------------

impl From<AuditRecord> for wire::AuditRecord {
    fn from(r: AuditRecord) -> Self {
        Self {
            seq: r.seq,
            at_ms: r.at_ms,
            kind: r.event.kind,
            detail_json: r.event.detail.to_string(),
            prev: r.prev,
            hash: r.hash,
        }
    }
}

impl TryFrom<wire::AuditRecord> for AuditRecord {
    type Error = Error;
    fn try_from(r: wire::AuditRecord) -> Result<Self, Error> {
        let detail = serde_json::from_str(&r.detail_json)
            .map_err(|_| not_understood("an audit record whose detail is not JSON"))?;
        Ok(Self {
            seq: r.seq,
            at_ms: r.at_ms,
            event: AuditEvent {
                kind: r.kind,
                detail,
            },
            prev: r.prev,
            hash: r.hash,
        })
    }
}

impl From<Verification> for wire::VerifyAuditResponse {
    fn from(v: Verification) -> Self {
        Self {
            records: v.records,
            problem: v.problem,
        }
    }
}

impl From<wire::VerifyAuditResponse> for Verification {
    fn from(v: wire::VerifyAuditResponse) -> Self {
        Self {
            records: v.records,
            problem: v.problem,
        }
    }
}

// --- status ----------------------------------------------------------------------------------

impl From<Phase> for wire::SigningKeyPhase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Next => Self::Next,
            Phase::Signing => Self::Signing,
            Phase::Retired => Self::Retired,
        }
    }
}

impl From<StatusReport> for wire::StatusResponse {
    fn from(s: StatusReport) -> Self {
        Self {
            trust_domain: s.trust_domain,
            root_fingerprint: s.root_fingerprint,
            issuing_key: s.issuing_key,
            root_key: s.root_key,
            issuing_ca_not_after: s.issuing_ca_not_after,
            labels: s.labels,
            certificates: s.certificates as u64,
            crl_url: s.crl_url,
            issuing_key_queue: s
                .issuing_key_queue
                .map(|(waiting, capacity)| wire::KeyQueue {
                    waiting: waiting as u64,
                    capacity: capacity as u64,
                }),
            signing_keys: s
                .signing_keys
                .into_iter()
                .map(|k| wire::SigningKey {
                    phase: wire::SigningKeyPhase::from(k.phase).into(),
                    serial: k.serial,
                    signs_from: k.signs_from,
                    signs_until: k.signs_until,
                    not_after: k.not_after,
                })
                .collect(),
            issuing_key_labels: s.issuing_key_labels,
        }
    }
}

impl TryFrom<wire::StatusResponse> for StatusReport {
    type Error = Error;
    fn try_from(s: wire::StatusResponse) -> Result<Self, Error> {
        let size = |n: u64| usize::try_from(n).unwrap_or(usize::MAX);
        Ok(Self {
            trust_domain: s.trust_domain,
            root_fingerprint: s.root_fingerprint,
            issuing_key: s.issuing_key,
            root_key: s.root_key,
            issuing_ca_not_after: s.issuing_ca_not_after,
            labels: s.labels,
            certificates: size(s.certificates),
            crl_url: s.crl_url,
            issuing_key_queue: s
                .issuing_key_queue
                .map(|q| (size(q.waiting), size(q.capacity))),
            signing_keys: s
                .signing_keys
                .into_iter()
                .map(|k| {
                    let phase = match k.phase() {
                        wire::SigningKeyPhase::Next => Phase::Next,
                        wire::SigningKeyPhase::Signing => Phase::Signing,
                        wire::SigningKeyPhase::Retired => Phase::Retired,
                        wire::SigningKeyPhase::Unspecified => {
                            return Err(not_understood("a signing key phase"))
                        }
                    };
                    Ok(SigningKeyStatus {
                        serial: k.serial,
                        phase,
                        signs_from: k.signs_from,
                        signs_until: k.signs_until,
                        not_after: k.not_after,
                    })
                })
                .collect::<Result<_, _>>()?,
            issuing_key_labels: s.issuing_key_labels,
        })
    }
}

// --- entries and agents ----------------------------------------------------------------------

impl From<wire::CreateEntryRequest> for NewEntry {
    fn from(r: wire::CreateEntryRequest) -> Self {
        Self {
            spiffe_id: r.spiffe_id,
            parent_id: r.parent_id,
            selectors: r.selectors,
            x509_svid_ttl_secs: r.x509_svid_ttl_seconds,
            jwt_svid_ttl_secs: r.jwt_svid_ttl_seconds,
            dns_names: r.dns_names,
            hint: r.hint,
        }
    }
}

impl From<EntryRecord> for wire::Entry {
    fn from(e: EntryRecord) -> Self {
        Self {
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
}

impl From<NodeRecord> for wire::AttestedAgent {
    fn from(n: NodeRecord) -> Self {
        Self {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_crosses_the_wire_and_back_unchanged() {
        let record = CertificateRecord {
            serial: Serial::parse("0a").expect("serial"),
            subject: "plc-7".into(),
            sans: vec!["dns:a".into(), "ip:10.0.0.1".into()],
            label: "plc".into(),
            owner: "token:1234".into(),
            issued_at: 5,
            not_after: 86_400,
            status: Status::Superseded,
            renews: Serial::parse("09"),
            der: vec![0x30, 0x03, 0x02, 0x01, 0x01],
        };
        let message = wire::Certificate::try_from(record.clone()).expect("to the wire");
        assert_eq!(message.der, [0x30, 0x03, 0x02, 0x01, 0x01]);
        assert_eq!(CertificateRecord::try_from(message).expect("back"), record);
    }

    #[test]
    fn an_inventory_query_keeps_every_filter() {
        let query = InventoryQuery {
            expiring_within_secs: Some(60),
            label: Some("a b&c=d".into()),
            status: Some(Status::Revoked),
            owner: Some("token:1".into()),
            subject: Some("%20".into()),
            spiffe_prefix: Some("spiffe://plant.example/x".into()),
            after: Some("cursor".into()),
            limit: Some(1000),
            skip_total: true,
        };
        let back = InventoryQuery::from(wire::ListCertificatesRequest::from(&query));
        assert_eq!(
            serde_json::to_value(back).expect("json"),
            serde_json::to_value(query).expect("json")
        );
    }

    #[test]
    fn an_unknown_revocation_reason_is_refused() {
        let request = wire::RevokeCertificateRequest {
            serial: "0a".into(),
            reason: 2,
        };
        assert!(RevokeRequest::try_from(request).is_err());
    }

    #[test]
    fn a_token_request_with_a_bad_ip_is_refused() {
        let request = wire::CreateTokensRequest {
            ip_addresses: vec!["10.0.0.300".into()],
            ..Default::default()
        };
        assert!(TokenRequest::try_from(request).is_err());
    }
}
