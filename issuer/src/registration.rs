//! Registration entries and attested agents, as operators manage them (DESIGN §5): the
//! validation every entry passes before it is stored (eviction and bans: [`crate::eviction`]).
//! Served on the admin socket as `plant.admin.v1.Entries` / `Agents` ([`crate::admin`]).

use proto::{Selector, SpiffeId};

use crate::authority::Authority;
use crate::grant::valid_dns;
use crate::store::{EntryRecord, NodeRecord};
use crate::Error;

/// An operator's new entry, as typed (validated by [`Authority::create_entry`]).
#[derive(Debug, Clone, Default)]
pub struct NewEntry {
    /// The workload's SPIFFE ID, in this issuer's trust domain.
    pub spiffe_id: String,
    /// The node that serves it: `spiffe://<td>/agent/…`.
    pub parent_id: String,
    /// At least one selector, e.g. `unix:uid:1000`.
    pub selectors: Vec<String>,
    /// X509-SVID lifetime in seconds; 0: the default.
    pub x509_svid_ttl_secs: u32,
    /// JWT-SVID lifetime in seconds; 0: the default.
    pub jwt_svid_ttl_secs: u32,
    /// DNS names for the X509-SVID.
    pub dns_names: Vec<String>,
    /// Workload API hint.
    pub hint: String,
}

/// Longest hint accepted.
const MAX_HINT: usize = 256;

impl Authority {
    /// The trust domain as a type.
    pub fn trust_domain_id(&self) -> Result<proto::TrustDomain, Error> {
        proto::TrustDomain::new(&self.trust_domain)
            .map_err(|e| Error::Config(format!("trust_domain: {e}")))
    }

    /// Parses `text` as a SPIFFE ID of this trust domain.
    pub(crate) fn own_spiffe_id(&self, what: &str, text: &str) -> Result<SpiffeId, Error> {
        let id = SpiffeId::new(text)
            .map_err(|e| Error::Admin(format!("{what} {text:?} is not a SPIFFE ID: {e}")))?;
        if id.trust_domain().as_str() != self.trust_domain {
            return Err(Error::Admin(format!(
                "{what} {id} is not in this issuer's trust domain {}",
                self.trust_domain
            )));
        }
        Ok(id)
    }

    /// Validates and stores a new entry; audited `entry.created`.
    pub async fn create_entry(&self, new: &NewEntry) -> Result<EntryRecord, Error> {
        let spiffe_id = self.own_spiffe_id("--spiffe-id", new.spiffe_id.trim())?;
        let parent = self.own_spiffe_id("--parent", new.parent_id.trim())?;
        if !parent.path().starts_with("/agent/") {
            return Err(Error::Admin(format!(
                "--parent {parent} is not a node: node SPIFFE IDs are spiffe://{}/agent/<method>/<id> \
                 (see `issuer agent list`)",
                self.trust_domain
            )));
        }
        if spiffe_id.path().is_empty() || spiffe_id.path().starts_with("/agent/") {
            return Err(Error::Admin(format!(
                "--spiffe-id {spiffe_id} must have a path outside /agent/ (those name nodes)"
            )));
        }
        let issuer_path = est::tls::ISSUER_ID_PATH;
        if spiffe_id.path() == issuer_path
            || spiffe_id.path().starts_with(&format!("{issuer_path}/"))
        {
            return Err(Error::Admin(format!(
                "--spiffe-id {spiffe_id}: {issuer_path} is reserved for the issuer itself \
                 (agents and EST clients recognise the issuer by it); choose another path"
            )));
        }
        if new.selectors.is_empty() {
            return Err(Error::Admin(
                "an entry needs at least one --selector, e.g. unix:uid:1000".into(),
            ));
        }
        let mut selectors = new
            .selectors
            .iter()
            .map(|s| {
                Selector::new(s.trim())
                    .map(|s| s.to_string())
                    .map_err(|e| Error::Admin(format!("--selector {s:?}: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        selectors.sort();
        selectors.dedup();
        // Every selector but legacy:device describes a process. Such an entry must say whose:
        // unix:path or unix:sha256 alone match any local user who runs (or, in a user
        // namespace, mounts over) that executable, and the agent serves no such entry.
        let names_a_user = |s: &String| {
            ["unix:uid:", "unix:gid:", "unix:user:", "unix:group:"]
                .iter()
                .any(|prefix| s.starts_with(prefix))
        };
        if selectors.iter().any(|s| !s.starts_with("legacy:device:"))
            && !selectors.iter().any(names_a_user)
        {
            return Err(Error::Admin(format!(
                "the selectors {} name no user: add --selector unix:uid:<uid>, unix:gid:<gid>, \
                 unix:user:<name> or unix:group:<name>, since unix:path and unix:sha256 alone \
                 match any local user who runs that executable (agents serve no entry without one)",
                selectors.join(", ")
            )));
        }
        if let Some(bad) = new.dns_names.iter().find(|d| !valid_dns(d)) {
            return Err(Error::Admin(format!(
                "--dns {bad:?} is not a valid DNS name"
            )));
        }
        self.listener_names.refuse(&new.dns_names, &[])?;
        if new.hint.len() > MAX_HINT || new.hint.chars().any(char::is_control) {
            return Err(Error::Admin(format!(
                "--hint must be at most {MAX_HINT} printable characters"
            )));
        }
        let record = EntryRecord {
            id: hex::encode(rand::random::<[u8; 16]>()),
            spiffe_id: spiffe_id.to_string(),
            parent_id: parent.to_string(),
            selectors,
            x509_svid_ttl_secs: new.x509_svid_ttl_secs,
            jwt_svid_ttl_secs: new.jwt_svid_ttl_secs,
            dns_names: new.dns_names.clone(),
            hint: new.hint.clone(),
            revision: 1,
            created_at: self.now().unix_timestamp(),
        };
        if let Some(existing) = self.store.entries.insert(&record)? {
            return Err(Error::AlreadyExists(format!(
                "entry {existing} has the same SPIFFE ID, parent and selectors"
            )));
        }
        self.audit(
            "entry.created",
            serde_json::json!({
                "id": record.id, "spiffe_id": record.spiffe_id, "parent_id": record.parent_id,
                "selectors": record.selectors, "dns_names": record.dns_names,
            }),
        )?;
        self.store.durability.commit().await?;
        Ok(record)
    }

    /// Entries, all or of one parent.
    pub fn list_entries(&self, parent_id: Option<&str>) -> Result<Vec<EntryRecord>, Error> {
        self.store.entries.list(parent_id)
    }

    /// Deletes an entry; audited `entry.deleted`. SVIDs already minted for it stay valid
    /// until they expire (short-lived by design); the agent stops renewing them.
    pub async fn delete_entry(&self, id: &str) -> Result<EntryRecord, Error> {
        let record = self
            .store
            .entries
            .delete(id.trim())?
            .ok_or_else(|| Error::NotFound(format!("no entry with id {id:?}")))?;
        self.audit(
            "entry.deleted",
            serde_json::json!({
                "id": record.id, "spiffe_id": record.spiffe_id, "parent_id": record.parent_id,
            }),
        )?;
        self.store.durability.commit().await?;
        Ok(record)
    }

    /// Every attested node.
    pub fn list_agents(&self) -> Result<Vec<NodeRecord>, Error> {
        self.store.nodes.list()
    }
}
