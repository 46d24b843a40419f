//! The last gate: every certificate is parsed back and checked against its profile before it
//! leaves (DESIGN §3). A failure here is a bug in the issuer, so the certificate is withheld.

use const_oid::db::rfc5280;
use der::Decode;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages, SubjectAltName};
use x509_cert::Certificate;

use crate::grant::Grant;
use crate::Error;

/// Checks an issued leaf against the grant and the issuing CA's notAfter (unix seconds).
pub fn leaf(der: &[u8], grant: &Grant, ca_not_after: i64) -> Result<(), Error> {
    let fail = |why: String| Err(Error::ProfileCheck(why));
    let cert = Certificate::from_der(der).map_err(|e| Error::ProfileCheck(e.to_string()))?;
    let tbs = &cert.tbs_certificate;
    let not_after = tbs.validity.not_after.to_unix_duration().as_secs() as i64;
    if not_after > ca_not_after {
        return fail(format!(
            "notAfter {not_after} is past the issuing CA's {ca_not_after}"
        ));
    }
    let extensions = tbs.extensions.as_deref().unwrap_or_default();
    let mut saw_bc = false;
    let mut saw_ku = false;
    let mut san_count = 0usize;
    for ext in extensions {
        let value = ext.extn_value.as_bytes();
        match ext.extn_id {
            rfc5280::ID_CE_BASIC_CONSTRAINTS => {
                let bc = BasicConstraints::from_der(value)
                    .map_err(|e| Error::ProfileCheck(e.to_string()))?;
                if bc.ca {
                    return fail("leaf has cA TRUE".into());
                }
                saw_bc = true;
            }
            rfc5280::ID_CE_KEY_USAGE => {
                let ku =
                    KeyUsage::from_der(value).map_err(|e| Error::ProfileCheck(e.to_string()))?;
                if !ext.critical {
                    return fail("keyUsage is not critical".into());
                }
                if ku.0.contains(KeyUsages::KeyCertSign) || ku.0.contains(KeyUsages::CRLSign) {
                    return fail("leaf may sign certificates or CRLs".into());
                }
                saw_ku = true;
            }
            rfc5280::ID_CE_SUBJECT_ALT_NAME => {
                let san = SubjectAltName::from_der(value)
                    .map_err(|e| Error::ProfileCheck(e.to_string()))?;
                san_count = san.0.len();
                let uris: Vec<&str> = san
                    .0
                    .iter()
                    .filter_map(|n| match n {
                        x509_cert::ext::pkix::name::GeneralName::UniformResourceIdentifier(u) => {
                            Some(u.as_str())
                        }
                        _ => None,
                    })
                    .collect();
                // An SVID carries exactly one URI SAN, its SPIFFE ID (DESIGN §5); other
                // certificates carry none.
                let expected: Vec<&str> = grant.spiffe_id.iter().map(|id| id.as_str()).collect();
                if uris != expected {
                    return fail(format!("URI SANs {uris:?}, grant has {expected:?}"));
                }
            }
            _ => {}
        }
    }
    if !saw_bc || !saw_ku {
        return fail("basicConstraints or keyUsage missing".into());
    }
    let granted = grant.spiffe_id.iter().count() + grant.dns.len() + grant.ips.len();
    if san_count != granted {
        return fail(format!("{san_count} subjectAltNames, grant has {granted}"));
    }
    Ok(())
}
