//! EST policy: authentication (one-time token, or the certificate being renewed) and
//! authorization into a [`Grant`]; then the one issuance pipeline.

use std::collections::BTreeSet;
use std::net::IpAddr;

use der::Decode;
use est::csr_attrs::AttrOrOid;
use est::server::{Backend, Credentials, EnrollRequest, Operation, ServerKeygenResult};
use est::{Error as EstError, Label, Refusal};
use hsm::Signer;

use crate::authority::Authority;
use crate::grant::{valid_subject, Grant};
use crate::serial::Serial;
use crate::store::{Status, TokenRecord};
use crate::Error;

/// Seconds a client is told to wait when the store or key is unavailable.
const RETRY_AFTER_SECS: u32 = 10;

impl Backend for Authority {
    fn knows_label(&self, label: Option<&Label>) -> bool {
        self.profile(label.map(Label::as_str)).is_some()
    }

    fn ca_certificates(&self, _label: Option<&Label>) -> Vec<Vec<u8>> {
        self.ca.ca_certificates(self.now())
    }

    fn csr_attributes(&self, _label: Option<&Label>) -> Vec<AttrOrOid> {
        est::csr_attrs::p256_policy(false)
    }

    fn admit_enrollment_attempt(
        &self,
        address: Option<std::net::SocketAddr>,
    ) -> Result<(), EstError> {
        self.source_admitted(address.map(|a| a.ip()))
            .map_err(|locked| {
                EstError::refused(
                    Refusal::TooManyRequests {
                        retry_after: locked.retry_after,
                    },
                    format!(
                        "too many refused requests without a valid token or certificate from your address; retry in {} s",
                        locked.retry_after
                    ),
                )
            })
    }

    async fn enroll(&self, request: EnrollRequest) -> Result<Vec<u8>, EstError> {
        let issued = async {
            // A full disk or a wrong clock refuses before the token is even looked at: a
            // token checked against a clock 60 years off reads "expired", which sends the
            // engineer after the wrong fault.
            self.ready_to_issue().map_err(to_est)?;
            let grant = match request.operation {
                Operation::SimpleReenroll => match self.authorize_renewal(&request)? {
                    Reenrollment::Issue(grant) => grant,
                    Reenrollment::Repeat(successor) => return Ok(successor),
                },
                Operation::SimpleEnroll | Operation::ServerKeygen => {
                    self.authorize_token(&request)?
                }
            };
            self.issue(&grant, request.csr.public_key())
                .await
                .map_err(to_est)
        }
        .await;
        issued.map_err(|refusal| self.audit_refusal(&request, refusal))
    }

    async fn server_keygen(&self, request: EnrollRequest) -> Result<ServerKeygenResult, EstError> {
        self.server_keygen_issue(&request)
            .await
            .map_err(|refusal| self.audit_refusal(&request, refusal))
    }
}

impl Authority {
    async fn server_keygen_issue(
        &self,
        request: &EnrollRequest,
    ) -> Result<ServerKeygenResult, EstError> {
        let (label, profile) = self
            .profile(request.label.as_ref().map(Label::as_str))
            .ok_or_else(|| EstError::refused(Refusal::NotFound, "unknown label"))?;
        if !profile.server_keygen {
            return Err(EstError::refused(
                Refusal::Forbidden,
                format!("label {label} does not offer serverkeygen; generate the key on the device and use simpleenroll"),
            ));
        }
        self.ready_to_issue().map_err(to_est)?;
        let grant = self.authorize_token(request)?;
        let key = hsm::SoftKey::generate().map_err(|e| to_est(e.into()))?;
        let certificate = self
            .issue(&grant, key.public_key().point())
            .await
            .map_err(to_est)?;
        let pkcs8 = key.to_pkcs8_der().map_err(|e| to_est(e.into()))?;
        Ok(ServerKeygenResult {
            pkcs8_der: pkcs8.to_vec(),
            certificate,
        })
    }
}

impl Authority {
    /// Records a refused enrollment in the audit log (who asked for what, and why not) and
    /// passes the refusal on. Requests the EST layer rejects before they reach policy (bad
    /// encoding, size, media type) are counted in the metrics, not audited: they carry no
    /// identity to record. A request whose credential names nothing this CA made (no token,
    /// an unknown token, a client certificate not ours) is counted toward its source's
    /// lockout and summarized (`lockout`), not audited one by one: otherwise anyone could
    /// fill the disk with audit records. The token appears by its public id only, never
    /// its secret, and text from the CSR is cut short.
    fn audit_refusal(&self, request: &EnrollRequest, refusal: EstError) -> EstError {
        self.metrics.refused(refusal_reason(refusal.refusal()));
        let token_id = request_secret(request)
            .map(|secret| hex::encode(&crate::store::tokens_hash(secret)[..4]));
        let certificate_serial = request
            .client_certificate
            .as_ref()
            .and_then(|c| c.leaf())
            .and_then(|der| x509_cert::Certificate::from_der(der).ok())
            .and_then(|c| Serial::from_bytes(c.tbs_certificate.serial_number.as_bytes()))
            .map(|s| s.to_string());
        let status = est::server::refusal_status(refusal.refusal()).0.as_u16();
        let detail = serde_json::json!({
            "operation": format!("{:?}", request.operation),
            "label": request.label.as_ref().map(Label::as_str),
            "subject": request.csr.common_name().map(crate::lockout::truncated),
            "status": status,
            "reason": crate::lockout::truncated(&refusal.to_string()),
            "token_id": token_id,
            "certificate_serial": certificate_serial,
        });
        if let Some(kind) = self.unknown_credential(request) {
            self.refused_unauthenticated(
                request.client_address.map(|a| a.ip()),
                kind,
                "enrollment.refused",
                detail,
            );
            return refusal;
        }
        if let Err(why) = self.state_volume.probe() {
            // Recording the refusal would be the very write the disk can't take.
            tracing::warn!(?why, %refusal, "enrollment refused; not audited while the state folder is unwritable");
            return refusal;
        }
        if let Err(e) = self.audit("enrollment.refused", detail) {
            tracing::error!(error = %e, "could not record a refused enrollment in the audit log");
        }
        refusal
    }

    /// Why the request's credential names nothing this CA made, if it doesn't: the
    /// certificate being renewed must be one this CA issued (whatever its status now), a
    /// token must exist (used, expired or revoked ones are real). A store that can't
    /// answer counts as "unknown": flooding must not get through on a fault.
    fn unknown_credential(&self, request: &EnrollRequest) -> Option<&'static str> {
        if request.operation == Operation::SimpleReenroll {
            let Some(leaf) = request.client_certificate.as_ref().and_then(|c| c.leaf()) else {
                return Some("est_no_certificate");
            };
            return match self.issued_record(leaf) {
                Ok(Some(_)) => None,
                _ => Some("est_unknown_certificate"),
            };
        }
        let Some(secret) = request_secret(request) else {
            return Some("est_no_token");
        };
        match self.store.tokens.find(secret) {
            Ok(Some(_)) => None,
            _ => Some("est_unknown_token"),
        }
    }

    /// A one-time token authorizes one certificate under its label, for its subject and
    /// names. All checks run before the token is consumed, so a rejected CSR does not burn it.
    fn authorize_token(&self, request: &EnrollRequest) -> Result<Grant, EstError> {
        let unauthorized = |m: String| EstError::refused(Refusal::Unauthorized, m);
        let secret = match &request.credentials {
            Credentials::Basic { password, .. } => password.0.as_str(),
            Credentials::Bearer(token) => token.0.as_str(),
            Credentials::None => {
                return Err(unauthorized(
                    "enrollment needs a one-time token (HTTP Basic password or Bearer)".into(),
                ))
            }
        };
        // The lookup is by the secret's SHA-256, and the stored hash is compared in constant
        // time (`store::tokens`): no timing depends on how much of a guess is right. Only a
        // secret that matches no token counts toward the source's lockout: a used or expired
        // one is real (a device retrying after a lost answer), not a guess.
        let record = self
            .store
            .tokens
            .find(secret)
            .map_err(to_est)?
            .ok_or_else(|| {
                self.token_failed(request.client_address.map(|a| a.ip()));
                unauthorized(
                    "unknown token; check it was copied completely, or ask the PKI operator for a new one"
                        .into(),
                )
            })?;
        let now = self.now().unix_timestamp();
        check_usable(&record, now)?;
        let (label, _) = self
            .profile(request.label.as_ref().map(Label::as_str))
            .ok_or_else(|| EstError::refused(Refusal::NotFound, "unknown label"))?;
        if record.label != label {
            return Err(EstError::refused(
                Refusal::Forbidden,
                format!(
                    "this token is for label {0}, not {label}; enroll at /.well-known/est/{0}/",
                    record.label
                ),
            ));
        }
        let csr = &request.csr;
        let common_name = match (&record.subject, csr.common_name()) {
            (Some(bound), Some(asked)) if bound != asked => {
                return Err(EstError::refused(
                    Refusal::Forbidden,
                    format!(
                        "this token is bound to subject {bound:?}; the CSR asks for {asked:?}: \
                         make the CSR with CN={bound}, or ask the PKI operator for a token for {asked}"
                    ),
                ))
            }
            (Some(bound), _) => bound.clone(),
            (None, Some(asked)) if valid_subject(asked) => asked.to_owned(),
            (None, Some(asked)) => {
                return Err(EstError::refused(
                    Refusal::BadRequest,
                    format!("CSR commonName {asked:?} must be 1-64 letters, digits, '.', '-', '_'"),
                ))
            }
            (None, None) => {
                return Err(EstError::refused(
                    Refusal::BadRequest,
                    "the CSR has no commonName and the token names no subject",
                ))
            }
        };
        // Names come only from the token: none granted, none issued.
        let grant = Grant {
            label: label.to_owned(),
            common_name,
            dns: record.dns.clone(),
            ips: record.ips.clone(),
            owner: format!("token:{}", record.id),
            spiffe_id: None,
            lifetime: None,
            renews: None,
            token: Some(crate::store::tokens_hash(secret)),
        };
        grant.check_request(csr)?;
        // Checked here too, not only where the certificate is recorded, so that a refused
        // second enrollment does not spend the token.
        if self.unique_subject(&grant) {
            let holder = self
                .store
                .certificates
                .subject_holder(&grant.label, &grant.common_name, now)
                .map_err(to_est)?;
            if let Some(holder) = holder {
                // Requests racing with one token: the one that won spent it and now holds the
                // subject. The others' answer is the spent token's 401, as for any retry with
                // it, not the subject's 403.
                if let Some(current) = self.store.tokens.find(secret).map_err(to_est)? {
                    check_usable(&current, now)?;
                }
                return Err(to_est(crate::issuance::subject_held(
                    &grant,
                    &holder.serial.to_string(),
                )));
            }
        }
        Ok(grant)
    }

    /// simplereenroll (RFC 7030 §4.2.2): the TLS client certificate must be one this CA
    /// issued over EST (byte for byte), and the current certificate of a lineage that no
    /// revocation ended (DESIGN §3): not revoked, not superseded, not expired (unless its
    /// profile grants a `renewal_grace`). The CSR keeps its Subject and SANs.
    ///
    /// A superseded certificate gets no new certificate: within `[est]
    /// renewal_retry_window` of its renewal, while the successor is valid, it gets the same
    /// successor again (a device that lost the answer), for the same key only.
    fn authorize_renewal(&self, request: &EnrollRequest) -> Result<Reenrollment, EstError> {
        let forbidden = |m: String| EstError::refused(Refusal::Forbidden, m);
        let leaf = request
            .client_certificate
            .as_ref()
            .and_then(|c| c.leaf())
            .ok_or_else(|| {
                EstError::refused(
                    Refusal::Unauthorized,
                    "simplereenroll needs the certificate being renewed as the TLS client certificate",
                )
            })?;
        let (serial, record) = self.issued_record(leaf).map_err(to_est)?.ok_or_else(|| {
            forbidden("the TLS client certificate was not issued by this CA".into())
        })?;
        // SVIDs (agent node SVIDs, workload SVIDs, PLC identities) come from the agent API
        // and renew there; their profiles are no EST label.
        let svid = record.sans.iter().any(|san| san.starts_with("uri:"))
            || (self.spiffe_profiles.contains_key(&record.label)
                && !self.profiles.contains_key(&record.label));
        if svid {
            return Err(forbidden(format!(
                "certificate {serial} is a SPIFFE SVID ({}) issued through the agent API; SVIDs \
                 are not renewed over EST: the agent renews its node SVID and mints workload \
                 SVIDs over the agent API",
                record.label
            )));
        }
        let Some(profile) = self.profiles.get(&record.label) else {
            return Err(forbidden(format!(
                "certificate {serial} was issued under label {}, which this issuer no longer \
                 serves; enroll the device again with a token for a current label",
                record.label
            )));
        };
        if record.status == Status::Revoked {
            return Err(forbidden(format!(
                "certificate {serial} is revoked and cannot be renewed; enroll the device again with a new token"
            )));
        }
        let lineage = self.store.certificates.lineage(&serial).map_err(to_est)?;
        if let Some(end) = &lineage.ended {
            return Err(forbidden(format!(
                "certificate {} of this certificate's lineage was revoked at {}; no certificate \
                 of the lineage renews any more: enroll the device again with a new token",
                end.revoked,
                proto::rfc3339_unix(end.at)
            )));
        }
        if let Some(label) = &request.label {
            if label.as_str() != record.label {
                return Err(forbidden(format!(
                    "certificate {serial} was issued under label {0}; renew at /.well-known/est/{0}/simplereenroll",
                    record.label
                )));
            }
        }
        let csr = &request.csr;
        if csr.common_name() != Some(record.subject.as_str()) {
            return Err(forbidden(format!(
                "re-enrollment must keep the subject CN={:?}; the CSR asks for {:?}",
                record.subject,
                csr.common_name().unwrap_or("")
            )));
        }
        let asked: BTreeSet<String> = csr
            .requested()
            .names
            .iter()
            .map(crate::grant::describe)
            .collect();
        let held: BTreeSet<String> = record.sans.iter().cloned().collect();
        if !asked.is_empty() && asked != held {
            return Err(forbidden(format!(
                "re-enrollment must keep the subjectAltNames [{}]; the CSR asks for [{}]",
                record.sans.join(", "),
                asked.into_iter().collect::<Vec<_>>().join(", ")
            )));
        }
        let now = self.now().unix_timestamp();
        if record.status == Status::Superseded {
            return self
                .repeated_renewal(serial, lineage.successor, csr)
                .map(Reenrollment::Repeat);
        }
        let grace = i64::try_from(profile.renewal_grace.as_secs()).unwrap_or(i64::MAX);
        if now >= record.not_after.saturating_add(grace) {
            let grace_note = if grace > 0 {
                format!(
                    " (label {} renews up to {} after expiry)",
                    record.label,
                    proto::duration::format(profile.renewal_grace)
                )
            } else {
                String::new()
            };
            return Err(forbidden(format!(
                "certificate {serial} expired at {}{grace_note}; enroll the device again with a new token",
                proto::rfc3339_unix(record.not_after)
            )));
        }
        let mut dns = Vec::new();
        let mut ips = Vec::new();
        for san in &record.sans {
            if let Some(d) = san.strip_prefix("dns:") {
                dns.push(d.to_owned());
            } else if let Some(ip) = san
                .strip_prefix("ip:")
                .and_then(|i| i.parse::<IpAddr>().ok())
            {
                ips.push(ip);
            }
        }
        let grant = Grant {
            label: record.label.clone(),
            common_name: record.subject.clone(),
            dns,
            ips,
            owner: record.owner.clone(),
            spiffe_id: None,
            lifetime: None,
            renews: Some(serial),
            token: None,
        };
        grant.check_request(csr)?;
        Ok(Reenrollment::Issue(grant))
    }

    /// The answer to a superseded certificate asking again: the successor it was renewed
    /// to, if that happened within the retry window, the successor is still valid and the
    /// CSR is for the successor's key. Anything else is refused: a superseded certificate
    /// never gets a new certificate.
    fn repeated_renewal(
        &self,
        serial: Serial,
        successor: Option<Serial>,
        csr: &est::csr::VerifiedCsr,
    ) -> Result<Vec<u8>, EstError> {
        let forbidden = |m: String| EstError::refused(Refusal::Forbidden, m);
        let Some(successor) = successor else {
            // Superseded before lineages were recorded: which certificate renewed it is not
            // known, so there is nothing to repeat.
            return Err(forbidden(format!(
                "certificate {serial} was renewed already; renew with the device's newest \
                 certificate, or enroll the device again with a new token"
            )));
        };
        let record = self
            .store
            .certificates
            .get(&successor)
            .map_err(to_est)?
            .ok_or_else(|| {
                to_est(Error::Store(format!(
                    "successor {successor} of {serial} is not in the inventory"
                )))
            })?;
        let now = self.now().unix_timestamp();
        let window = i64::try_from(self.renewal_retry_window.as_secs()).unwrap_or(i64::MAX);
        if now >= record.issued_at.saturating_add(window) {
            return Err(forbidden(format!(
                "certificate {serial} was renewed at {} by certificate {successor} and renews no \
                 more (a lost answer is repeated for {} after a renewal): renew with certificate \
                 {successor}, or enroll the device again with a new token",
                proto::rfc3339_unix(record.issued_at),
                proto::duration::format(self.renewal_retry_window)
            )));
        }
        let status = record.status_at(now);
        if status != Status::Valid {
            let status = format!("{status:?}").to_lowercase();
            return Err(forbidden(format!(
                "certificate {serial} was renewed by certificate {successor}, which is {status} \
                 now; enroll the device again with a new token"
            )));
        }
        let der = record.der;
        let same_key = x509_cert::Certificate::from_der(&der)
            .ok()
            .and_then(|c| {
                c.tbs_certificate
                    .subject_public_key_info
                    .subject_public_key
                    .as_bytes()
                    .map(|k| k == csr.public_key())
            })
            .unwrap_or(false);
        if !same_key {
            return Err(forbidden(format!(
                "certificate {serial} was renewed at {} by certificate {successor} for another \
                 key; a lost answer is repeated only for the same key: send the CSR of the first \
                 attempt again, or renew with certificate {successor}",
                proto::rfc3339_unix(record.issued_at)
            )));
        }
        tracing::info!(%serial, %successor, "repeated the answer to a renewal");
        Ok(der)
    }
}

/// What a `simplereenroll` may have.
enum Reenrollment {
    /// A new certificate, under this grant.
    Issue(Grant),
    /// The certificate already issued to this renewal, whose answer the device lost.
    Repeat(Vec<u8>),
}

/// The token secret the request carries, if any.
fn request_secret(request: &EnrollRequest) -> Option<&str> {
    match &request.credentials {
        Credentials::Basic { password, .. } => Some(password.0.as_str()),
        Credentials::Bearer(token) => Some(token.0.as_str()),
        Credentials::None => None,
    }
}

fn check_usable(record: &TokenRecord, now: i64) -> Result<(), EstError> {
    let unauthorized = |m: String| EstError::refused(Refusal::Unauthorized, m);
    if record.kind != crate::store::TokenKind::Enrollment {
        return Err(unauthorized(
            "this is a join token for an agent's node attestation, not an enrollment token; \
             ask the PKI operator for an enrollment token"
                .into(),
        ));
    }
    if let Some(at) = record.revoked_at {
        return Err(unauthorized(format!(
            "this token was revoked by the PKI operator at {}; ask them for a new one",
            proto::rfc3339_unix(at)
        )));
    }
    if record.used_at.is_some() {
        return Err(unauthorized(
            "this token was already used; tokens are single use, ask the PKI operator for a new one"
                .into(),
        ));
    }
    if now >= record.expires_at {
        return Err(unauthorized(format!(
            "this token expired at {}; ask the PKI operator for a new one",
            proto::rfc3339_unix(record.expires_at)
        )));
    }
    Ok(())
}

/// The `reason` label of `plant_enrollment_refusals_total`.
fn refusal_reason(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::BadRequest => "bad_request",
        Refusal::Unauthorized => "unauthorized",
        Refusal::Forbidden => "forbidden",
        Refusal::NotFound => "not_found",
        Refusal::Unavailable { retry_after: 1 } => "busy",
        Refusal::Unavailable { .. } => "unavailable",
        _ => "other",
    }
}

/// The one mapping from issuer errors to EST refusals. Store and key faults are 503 with
/// Retry-After (the request may succeed later); internal detail stays in the log.
pub(crate) fn to_est(error: Error) -> EstError {
    match error {
        Error::Est(e) => e,
        Error::Key(hsm::Error::Busy { .. }) => {
            tracing::warn!(%error, "issuance refused: the issuing key's queue is full");
            EstError::refused(
                Refusal::Unavailable { retry_after: 1 },
                "the CA's hardware key is busy signing other requests; retry in a second",
            )
        }
        Error::Store(_) | Error::Key(_) | Error::Io { .. } | Error::SigningKey(_) => {
            tracing::error!(%error, "issuance unavailable");
            EstError::refused(
                Refusal::Unavailable {
                    retry_after: RETRY_AFTER_SECS,
                },
                "the issuer cannot sign or record certificates right now; retry later",
            )
        }
        Error::OutsideCaValidity(message) | Error::StateUnwritable(message) => {
            tracing::error!(%message, "issuance refused");
            EstError::refused(
                Refusal::Unavailable {
                    retry_after: RETRY_AFTER_SECS,
                },
                message,
            )
        }
        other => {
            tracing::error!(error = %other, "issuance failed");
            EstError::refused(Refusal::Internal, "internal error")
        }
    }
}
