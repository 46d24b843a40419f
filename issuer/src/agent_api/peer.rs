//! Who is calling: the node behind a TLS client certificate. Every call but `Attest` needs
//! one, and it must be the node's current node SVID: issued here (byte for byte in the
//! inventory), still valid, the SVID the node record names (a renewed or re-attested node's
//! older SVIDs no longer authenticate it), of a node that is not evicted.

use der::Decode;
use proto::SpiffeId;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

use super::Peer;
use crate::authority::Authority;
use crate::store::{NodeRecord, Status};

/// An authenticated node.
#[derive(Debug, Clone)]
pub struct Caller {
    /// `spiffe://<td>/agent/<method>/<id>`.
    pub spiffe_id: SpiffeId,
    /// Its record.
    pub node: NodeRecord,
}

/// Judges the request's client certificate.
pub fn caller<T>(
    authority: &Authority,
    request: &tonic::Request<T>,
) -> Result<Caller, tonic::Status> {
    let unauthenticated = |why: &str| {
        tonic::Status::unauthenticated(format!(
            "{why}; present the node SVID from Attest as TLS client certificate"
        ))
    };
    let leaf = request
        .extensions()
        .get::<Peer>()
        .and_then(|p| p.certificates.0.first().cloned())
        .ok_or_else(|| unauthenticated("no client certificate"))?;
    let spiffe_id =
        uri_san(&leaf).ok_or_else(|| unauthenticated("the client certificate has no SPIFFE ID"))?;
    if spiffe_id.trust_domain().as_str() != authority.trust_domain
        || !spiffe_id.path().starts_with("/agent/")
    {
        return Err(tonic::Status::permission_denied(format!(
            "{spiffe_id} is not a node of trust domain {}",
            authority.trust_domain
        )));
    }
    let node = authority
        .store
        .nodes
        .get(spiffe_id.as_str())
        .map_err(super::service::to_status)?
        .ok_or_else(|| {
            tonic::Status::permission_denied(format!("{spiffe_id} is not an attested node"))
        })?;
    if node.evicted {
        return Err(tonic::Status::permission_denied(format!(
            "node {spiffe_id} was evicted by an operator{}",
            if node.can_reattest {
                "; attest again"
            } else {
                "; attest with a new join token"
            }
        )));
    }
    let (_, record) = authority
        .issued_record(&leaf)
        .map_err(super::service::to_status)?
        .ok_or_else(|| unauthenticated("the client certificate was not issued by this issuer"))?;
    let now = authority.now().unix_timestamp();
    if record.serial.to_string() != node.svid_serial || record.status_at(now) != Status::Valid {
        return Err(tonic::Status::unauthenticated(format!(
            "the client certificate (serial {}) is not node {spiffe_id}'s current node SVID; \
             use the newest one or attest again",
            record.serial
        )));
    }
    Ok(Caller { spiffe_id, node })
}

/// The one URI SAN of an SVID, parsed.
fn uri_san(certificate: &[u8]) -> Option<SpiffeId> {
    let certificate = x509_cert::Certificate::from_der(certificate).ok()?;
    let extensions = certificate.tbs_certificate.extensions?;
    let san = extensions
        .iter()
        .find(|e| e.extn_id == const_oid::db::rfc5280::ID_CE_SUBJECT_ALT_NAME)?;
    let names = SubjectAltName::from_der(san.extn_value.as_bytes()).ok()?;
    let mut uris = names.0.iter().filter_map(|n| match n {
        GeneralName::UniformResourceIdentifier(u) => Some(u.as_str()),
        _ => None,
    });
    let uri = uris.next()?;
    if uris.next().is_some() {
        return None;
    }
    SpiffeId::new(uri).ok()
}
