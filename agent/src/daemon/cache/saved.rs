//! The cache on disk, `<state_dir>/cache/`: what the agent serves, saved after every change so
//! that an agent restarted while the issuer is unreachable (a power cut in the middle of a
//! network outage) serves at once what it held, instead of nothing until the issuer is back.
//!
//! - `cache/trust.json`: the trust domain, the X.509 and JWT bundles, the CRLs and this node's
//!   registration entries. Rewritten only when one of them changes.
//! - `cache/svids/<entry id>.json`: one X509-SVID each (chain, PKCS#8 key, rotation time,
//!   entry revision). A rotation rewrites one small file, not the whole cache: a gateway with
//!   a thousand SVIDs rotates one every few seconds, and its flash should not be rewritten
//!   megabytes at a time for that.
//!
//! Every file is replaced atomically (temporary file, fsync, rename; one directory fsync per
//! save), owner-only (0600) in the owner-only state directory: the SVID files hold private
//! keys. On a node with a TPM they hold them encrypted (AES-256-GCM, the entry id as
//! associated data) under one key sealed to that TPM (`cache/key.sealed`, a
//! [`KeyProtector`]): a copy of the folder on another machine, or after the TPM was cleared,
//! serves nothing. Loading trusts nothing it reads: every SVID is checked again (its key certifies its
//! leaf, the leaf names its entry's SPIFFE ID, it has not expired) and anything else is
//! dropped with a warning and never served.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use proto::TrustDomain;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::daemon::cache::Snapshot;
use crate::daemon::entry::Entry;
use crate::daemon::jwt::JwtKeys;
use crate::daemon::rotation::is_valid;
use crate::daemon::svid::{
    certificate_validity, ensure_certifies, spiffe_id_of, KeyPair, X509Svid,
};
use crate::pem_files::{self, Overwrite};
use crate::Error;

/// The folder in the state directory.
pub const CACHE_DIR: &str = "cache";
const TRUST_FILE: &str = "trust.json";
const SVIDS_DIR: &str = "svids";
/// Owner-only: SVID files hold private keys, and the rest is nobody else's business.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;
/// Bumped when the layout changes; a cache of another format is ignored (and replaced).
const FORMAT: u32 = 1;
/// The cache key, sealed to the node's TPM.
const SEALED_KEY_FILE: &str = "key.sealed";

/// Seals the cache key to hardware (the node's TPM), so the saved private keys open only on
/// this machine.
pub trait KeyProtector: Send + std::fmt::Debug {
    /// The sealed form of `secret`.
    fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, Error>;
    /// The secret in `sealed`, or why it does not open here.
    fn unseal(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error>;
}

/// The key SVID private keys are encrypted with, while this run holds it.
type CacheKey = Zeroizing<[u8; 32]>;

/// What a loaded cache gives the agent to serve.
#[derive(Debug)]
pub struct Restored {
    /// When the trust file was written.
    pub saved_at: SystemTime,
    /// DER root certificates.
    pub bundle: Vec<Vec<u8>>,
    /// DER CRLs.
    pub crl: Vec<Vec<u8>>,
    /// The JWKS document.
    pub jwt_bundle: Vec<u8>,
    /// `jwt_bundle`, parsed.
    pub jwt_keys: JwtKeys,
    /// The node's entries, sorted by id.
    pub entries: Vec<Arc<Entry>>,
    /// The X509-SVIDs still valid, by entry id.
    pub svids: BTreeMap<String, Arc<X509Svid>>,
}

/// The cache folder and what is in it, so a save writes only what changed.
pub struct SavedCache {
    dir: PathBuf,
    /// A hash of the trust file's content as last written (`None`: not written by this run).
    trust: Option<u64>,
    /// SVID files on disk by entry id, with the notAfter of the SVID each holds (`None`: a
    /// file this run did not write or load, replaced or removed at the next save).
    svids: BTreeMap<String, Option<SystemTime>>,
    /// Seals the cache key; `None` on a node without a TPM (keys are then plain, 0600).
    protector: Option<Box<dyn KeyProtector>>,
    /// The unsealed cache key, once loaded or made.
    key: Option<CacheKey>,
}

impl std::fmt::Debug for SavedCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the cache key.
        f.debug_struct("SavedCache")
            .field("dir", &self.dir)
            .field("svids", &self.svids.len())
            .field("protector", &self.protector)
            .field("key", &self.key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// `trust.json`, as written (borrowing the snapshot) and as read.
#[derive(Serialize)]
struct TrustOut<'a> {
    format: u32,
    trust_domain: &'a str,
    bundle: Vec<String>,
    crl: Vec<String>,
    jwt_bundle: String,
    entries: Vec<EntryOut<'a>>,
}

#[derive(Serialize)]
struct EntryOut<'a> {
    id: &'a str,
    spiffe_id: &'a str,
    selectors: Vec<String>,
    hint: &'a str,
    revision: u64,
}

#[derive(Deserialize)]
struct TrustIn {
    format: u32,
    trust_domain: String,
    bundle: Vec<String>,
    crl: Vec<String>,
    jwt_bundle: String,
    entries: Vec<EntryIn>,
}

#[derive(Deserialize)]
struct EntryIn {
    id: String,
    spiffe_id: String,
    selectors: Vec<String>,
    hint: String,
    revision: u64,
}

/// One `svids/<entry id>.json`.
/// The key is borrowed both ways: written from a zeroized buffer, read from the zeroized
/// file bytes, so no copy of it outlives the call.
#[derive(Serialize, Deserialize)]
struct SvidFile<'a> {
    format: u32,
    entry_id: String,
    entry_revision: u64,
    /// Base64 DER, leaf first.
    chain: Vec<String>,
    /// Base64 PKCS#8 DER (no TPM).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    /// Base64 of nonce (12 bytes) and AES-256-GCM of the PKCS#8 DER under the sealed cache
    /// key, the entry id as associated data (a TPM node).
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    sealed_key: Option<&'a str>,
    /// Unix seconds.
    rotate_at: u64,
}

impl SavedCache {
    /// The cache folder of `state_dir`; nothing is read yet.
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join(CACHE_DIR),
            trust: None,
            svids: BTreeMap::new(),
            protector: None,
            key: None,
        }
    }

    /// Keeps the private keys encrypted under a key `protector` seals (the node's TPM).
    pub fn protect_keys_with(&mut self, protector: Box<dyn KeyProtector>) {
        self.protector = Some(protector);
    }

    /// The cache key from `key.sealed`, if this machine's TPM opens it.
    fn unseal_key(&mut self) {
        let Some(protector) = &self.protector else {
            return;
        };
        let path = self.dir.join(SEALED_KEY_FILE);
        let Ok(sealed) = std::fs::read(&path) else {
            return;
        };
        match protector.unseal(&sealed) {
            Ok(secret) if secret.len() == 32 => {
                let mut key = Zeroizing::new([0u8; 32]);
                key.copy_from_slice(&secret);
                self.key = Some(key);
            }
            Ok(_) => {
                tracing::warn!(path = %path.display(), "the sealed cache key has the wrong length; the saved keys are not used")
            }
            Err(e) => tracing::warn!(
                error = %e,
                "the saved cache's keys are sealed to another TPM (a copied state directory, or this TPM was cleared): no saved SVID is served; they are replaced once the issuer answers"
            ),
        }
    }

    /// The cache key for writing: the one loaded, or a new one sealed now (every SVID file
    /// is then rewritten under it).
    fn key_for_saving(&mut self) -> Result<Option<CacheKey>, Error> {
        let Some(protector) = &self.protector else {
            return Ok(None);
        };
        if let Some(key) = &self.key {
            return Ok(Some(key.clone()));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        aws_lc_rs::rand::fill(key.as_mut())
            .map_err(|_| Error::Attestation("no randomness for the cache key".into()))?;
        let sealed = protector.seal(key.as_ref())?;
        let path = self.dir.join(SEALED_KEY_FILE);
        pem_files::replace_file(&path, &sealed, FILE_MODE, Overwrite::Allow)?;
        pem_files::sync_directory(&self.dir)?;
        for saved in self.svids.values_mut() {
            *saved = None;
        }
        self.key = Some(key.clone());
        Ok(Some(key))
    }

    /// Reads the cache: what it holds for `trust_domain` that may still be served at `now`,
    /// or `None` when there is nothing usable (no cache yet, another trust domain, another
    /// format, an unreadable trust file; each but the first is logged).
    pub fn load(&mut self, trust_domain: &TrustDomain, now: SystemTime) -> Option<Restored> {
        self.unseal_key();
        self.remove_leftover_temporaries();
        // Every SVID file present is the next save's to replace or remove, whatever is in it.
        for name in self.svid_file_names() {
            if let Some(id) = entry_id_of(&name) {
                self.svids.insert(id, None);
            }
        }
        match self.read(trust_domain, now) {
            Ok(restored) => restored,
            Err(e) => {
                tracing::warn!(error = %e, "the saved cache is not usable; starting empty");
                None
            }
        }
    }

    fn read(
        &mut self,
        trust_domain: &TrustDomain,
        now: SystemTime,
    ) -> Result<Option<Restored>, Error> {
        let path = self.dir.join(TRUST_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path)(e)),
        };
        let bad = |message: String| Error::certificate(path.display().to_string(), message);
        let trust: TrustIn = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
        if trust.format != FORMAT {
            return Err(bad(format!(
                "format {} (this agent writes {FORMAT})",
                trust.format
            )));
        }
        if trust.trust_domain != trust_domain.as_str() {
            return Err(bad(format!(
                "saved for trust domain {}, this agent is in {trust_domain}",
                trust.trust_domain
            )));
        }
        // The file's modification time says when: the content has no clock in it, so an
        // unchanged cache compares equal and is not rewritten.
        let saved_at = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .map_err(Error::io(&path))?;
        let ders = |list: Vec<String>, what: &str| {
            list.iter()
                .map(|text| B64.decode(text))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(format!("{what}: {e}")))
        };
        let bundle = ders(trust.bundle, "bundle")?;
        let crl = ders(trust.crl, "crl")?;
        let jwt_bundle = B64
            .decode(&trust.jwt_bundle)
            .map_err(|e| bad(format!("jwt_bundle: {e}")))?;
        let jwt_keys = JwtKeys::from_jwks(&jwt_bundle).map_err(|e| bad(e.to_string()))?;
        let mut entries = Vec::with_capacity(trust.entries.len());
        for entry in trust.entries {
            let wire = proto::agent::RegistrationEntry {
                id: entry.id,
                spiffe_id: entry.spiffe_id,
                selectors: entry.selectors,
                hint: entry.hint,
                revision: entry.revision,
                ..Default::default()
            };
            match Entry::from_wire(wire) {
                Ok(entry) => entries.push(Arc::new(entry)),
                Err(e) => tracing::warn!(error = %e, "saved entry skipped"),
            }
        }
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        self.trust = Some(hash(&bytes));

        let mut svids = BTreeMap::new();
        for entry in &entries {
            if !self.svids.contains_key(&entry.id) {
                continue;
            }
            let path = self.svid_path(&entry.id);
            let keys = KeyMode {
                protected: self.protector.is_some(),
                key: self.key.as_ref(),
            };
            match read_svid(&path, entry, now, &keys) {
                Ok(svid) => {
                    self.svids.insert(entry.id.clone(), Some(svid.not_after));
                    svids.insert(entry.id.clone(), Arc::new(svid));
                }
                Err(e) => tracing::warn!(error = %e, "saved X509-SVID not served"),
            }
        }
        Ok(Some(Restored {
            saved_at,
            bundle,
            crl,
            jwt_bundle,
            jwt_keys,
            entries,
            svids,
        }))
    }

    /// Writes what changed in `snapshot` since the last save and removes the SVID files of
    /// SVIDs no longer held. A file that can't be written is tried again at the next save.
    pub fn save(&mut self, snapshot: &Snapshot) -> Result<(), Error> {
        let svids_dir = self.dir.join(SVIDS_DIR);
        if !svids_dir.is_dir() {
            for dir in [&self.dir, &svids_dir] {
                std::fs::create_dir_all(dir).map_err(Error::io(dir))?;
                set_mode(dir, DIR_MODE)?;
            }
        }
        let mut touched_trust = false;
        let mut touched_svids = false;
        let cache_key = self.key_for_saving()?;

        let trust = trust_json(snapshot)?;
        let trust_hash = hash(&trust);
        if self.trust != Some(trust_hash) {
            let path = self.dir.join(TRUST_FILE);
            pem_files::replace_file(&path, &trust, FILE_MODE, Overwrite::Allow)?;
            self.trust = Some(trust_hash);
            touched_trust = true;
        }

        let mut failed = None;
        for (id, svid) in &snapshot.svids {
            if self.svids.get(id) == Some(&Some(svid.not_after)) {
                continue;
            }
            let written = svid_json(id, svid, cache_key.as_ref()).and_then(|json| {
                pem_files::replace_file(&self.svid_path(id), &json, FILE_MODE, Overwrite::Allow)
            });
            match written {
                Ok(()) => {
                    self.svids.insert(id.clone(), Some(svid.not_after));
                    touched_svids = true;
                }
                Err(e) => failed = Some(e),
            }
        }
        let gone: Vec<String> = self
            .svids
            .keys()
            .filter(|id| !snapshot.svids.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            let path = self.svid_path(&id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    failed = Some(Error::io(&path)(e));
                    continue;
                }
            }
            self.svids.remove(&id);
            touched_svids = true;
        }
        // One directory flush per folder per save, however many files were replaced.
        if touched_svids {
            pem_files::sync_directory(&svids_dir)?;
        }
        if touched_trust {
            pem_files::sync_directory(&self.dir)?;
        }
        failed.map_or(Ok(()), Err)
    }

    /// Temporary files a write left when the power went (`.<name>.<random>.tmp`): nothing
    /// else removes them.
    fn remove_leftover_temporaries(&self) {
        for dir in [self.dir.clone(), self.dir.join(SVIDS_DIR)] {
            let Ok(read) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in read.filter_map(Result::ok) {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') && name.ends_with(".tmp") {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }

    fn svid_path(&self, entry_id: &str) -> PathBuf {
        self.dir
            .join(SVIDS_DIR)
            .join(format!("{}.json", file_stem(entry_id)))
    }

    fn svid_file_names(&self) -> Vec<String> {
        let Ok(read) = std::fs::read_dir(self.dir.join(SVIDS_DIR)) else {
            return Vec::new();
        };
        read.filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()
    }
}

/// A file name for an entry id. The issuer's ids are hex, but the agent does not rely on
/// that: an id that is not plainly safe as a file name is hex-encoded behind `hex.` (a dot
/// no plain stem has, so the two forms never collide).
fn file_stem(entry_id: &str) -> String {
    let plain = !entry_id.is_empty()
        && entry_id.len() <= 100
        && entry_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if plain {
        entry_id.to_owned()
    } else {
        format!("hex.{}", hex::encode(entry_id))
    }
}

/// The entry id a file name stands for (the inverse of [`file_stem`] plus `.json`).
fn entry_id_of(file_name: &str) -> Option<String> {
    let stem = file_name.strip_suffix(".json")?;
    match stem.strip_prefix("hex.") {
        Some(encoded) => String::from_utf8(hex::decode(encoded).ok()?).ok(),
        None if !stem.contains('.') && !stem.is_empty() => Some(stem.to_owned()),
        None => None,
    }
}

/// How SVID keys are stored: plain, or encrypted under the cache key (`key` is `None` when
/// a protected cache's key did not unseal: then no key is readable).
struct KeyMode<'a> {
    protected: bool,
    key: Option<&'a CacheKey>,
}

fn read_svid(
    path: &Path,
    entry: &Entry,
    now: SystemTime,
    keys: &KeyMode<'_>,
) -> Result<X509Svid, Error> {
    let what = path.display().to_string();
    let bad = |message: String| Error::certificate(&what, message);
    let bytes = Zeroizing::new(std::fs::read(path).map_err(Error::io(path))?);
    let file: SvidFile<'_> = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    if file.format != FORMAT || file.entry_id != entry.id {
        return Err(bad(format!(
            "format {} for entry {}, expected format {FORMAT} for {}",
            file.format, file.entry_id, entry.id
        )));
    }
    let chain = file
        .chain
        .iter()
        .map(|text| B64.decode(text))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("chain: {e}")))?;
    let key = match (keys.protected, file.key, file.sealed_key) {
        (false, Some(plain), _) => {
            Zeroizing::new(B64.decode(plain).map_err(|e| bad(format!("key: {e}")))?)
        }
        (true, _, Some(sealed)) => {
            let cache_key = keys
                .key
                .ok_or_else(|| bad("its key is sealed to another TPM".into()))?;
            let sealed = B64
                .decode(sealed)
                .map_err(|e| bad(format!("sealed_key: {e}")))?;
            open_key(cache_key, &entry.id, sealed).map_err(bad)?
        }
        (true, _, None) => {
            return Err(bad(
                "its key is not sealed, and this node keeps keys sealed to its TPM".into(),
            ))
        }
        (false, _, _) => return Err(bad("no plain key (sealed to a TPM?)".into())),
    };
    let pair = KeyPair::from_pkcs8_der(&key)?;
    let leaf = chain.first().ok_or_else(|| bad("empty chain".into()))?;
    ensure_certifies(&what, leaf, &pair)?;
    let spiffe_id = spiffe_id_of(&what, leaf)?;
    if spiffe_id != entry.spiffe_id {
        return Err(bad(format!(
            "names {spiffe_id}, its entry {}",
            entry.spiffe_id
        )));
    }
    let (not_before, not_after) = certificate_validity(&what, leaf)?;
    if !is_valid(not_after, now) {
        return Err(bad(format!(
            "expired at {}; never served",
            proto::rfc3339(not_after)
        )));
    }
    let rotate_at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(file.rotate_at);
    Ok(X509Svid {
        spiffe_id,
        chain,
        key,
        not_before,
        not_after,
        rotate_at,
        entry_revision: file.entry_revision,
    })
}

fn trust_json(snapshot: &Snapshot) -> Result<Vec<u8>, Error> {
    let ders = |list: &[Vec<u8>]| list.iter().map(|der| B64.encode(der)).collect();
    let trust = TrustOut {
        format: FORMAT,
        trust_domain: snapshot.trust_domain.as_str(),
        bundle: ders(&snapshot.bundle),
        crl: ders(&snapshot.crl),
        jwt_bundle: B64.encode(&snapshot.jwt_bundle),
        entries: snapshot
            .entries
            .iter()
            .map(|entry| EntryOut {
                id: &entry.id,
                spiffe_id: entry.spiffe_id.as_str(),
                selectors: entry.selectors.iter().map(ToString::to_string).collect(),
                hint: &entry.hint,
                revision: entry.revision,
            })
            .collect(),
    };
    serde_json::to_vec(&trust).map_err(|e| Error::Io {
        path: PathBuf::from(TRUST_FILE),
        source: std::io::Error::other(e),
    })
}

fn svid_json(
    entry_id: &str,
    svid: &X509Svid,
    cache_key: Option<&CacheKey>,
) -> Result<Zeroizing<Vec<u8>>, Error> {
    let (plain, sealed) = match cache_key {
        None => (Some(Zeroizing::new(B64.encode(svid.key.as_slice()))), None),
        Some(cache_key) => (
            None,
            Some(B64.encode(seal_key(cache_key, entry_id, &svid.key)?)),
        ),
    };
    let file = SvidFile {
        format: FORMAT,
        entry_id: entry_id.to_owned(),
        entry_revision: svid.entry_revision,
        chain: svid.chain.iter().map(|der| B64.encode(der)).collect(),
        key: plain.as_ref().map(|k| k.as_str()),
        sealed_key: sealed.as_deref(),
        rotate_at: svid
            .rotate_at
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    serde_json::to_vec(&file)
        .map(Zeroizing::new)
        .map_err(|e| Error::Io {
            path: PathBuf::from(SVIDS_DIR),
            source: std::io::Error::other(e),
        })
}

/// Change detection only (not a security check): the trust file is rewritten when its content
/// differs from the last write.
fn hash(json: &[u8]) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    json.hash(&mut hasher);
    hasher.finish()
}

/// nonce || AES-256-GCM(cache key, PKCS#8, aad = entry id).
fn seal_key(cache_key: &CacheKey, entry_id: &str, pkcs8: &[u8]) -> Result<Vec<u8>, Error> {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
    let failed = || Error::Attestation("encrypting a saved key failed".into());
    let key =
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, cache_key.as_ref()).map_err(|_| failed())?);
    let mut nonce = [0u8; NONCE_LEN];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| failed())?;
    let mut sealed = Zeroizing::new(pkcs8.to_vec());
    key.seal_in_place_append_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(entry_id.as_bytes()),
        &mut *sealed,
    )
    .map_err(|_| failed())?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&sealed);
    Ok(out)
}

/// The PKCS#8 key in `sealed` (see [`seal_key`]); an error for another cache key or entry.
fn open_key(
    cache_key: &CacheKey,
    entry_id: &str,
    sealed: Vec<u8>,
) -> Result<Zeroizing<Vec<u8>>, String> {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
    if sealed.len() < NONCE_LEN {
        return Err("sealed_key: too short".into());
    }
    let mut sealed = Zeroizing::new(sealed);
    let (nonce, body) = sealed.split_at_mut(NONCE_LEN);
    let nonce =
        Nonce::try_assume_unique_for_key(nonce).map_err(|_| "sealed_key: nonce".to_owned())?;
    let key = LessSafeKey::new(
        UnboundKey::new(&AES_256_GCM, cache_key.as_ref()).map_err(|_| "cache key".to_owned())?,
    );
    let plain = key
        .open_in_place(nonce, Aad::from(entry_id.as_bytes()), body)
        .map_err(|_| "sealed_key does not open with this cache key".to_owned())?;
    Ok(Zeroizing::new(plain.to_vec()))
}

fn set_mode(path: &Path, mode: u32) -> Result<(), Error> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(Error::io(path))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::time::Duration;

    use super::*;

    const TD: &str = "plant.example";

    struct Ca {
        der: Vec<u8>,
        issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    }

    fn ca() -> Ca {
        let key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let der = params.self_signed(&key).expect("ca").der().to_vec();
        let issuer = rcgen::Issuer::from_ca_cert_der(&der.clone().into(), key).expect("issuer");
        Ca { der, issuer }
    }

    fn entry(id: &str, spiffe_id: &str) -> Arc<Entry> {
        Arc::new(
            Entry::from_wire(proto::agent::RegistrationEntry {
                id: id.into(),
                spiffe_id: spiffe_id.into(),
                selectors: vec!["unix:uid:1000".into()],
                revision: 3,
                ..Default::default()
            })
            .expect("entry"),
        )
    }

    /// An SVID for `spiffe_id` valid until `now + valid_for` (expired when negative).
    fn svid(ca: &Ca, spiffe_id: &str, valid_for: i64) -> Arc<X509Svid> {
        let key = KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(spiffe_id.try_into().expect("uri"))];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(2);
        params.not_after = now + time::Duration::seconds(valid_for);
        let public = rcgen::KeyPair::from_pem(&key.pkcs8_pem()).expect("key");
        let leaf = params.signed_by(&public, &ca.issuer).expect("leaf");
        let (not_before, not_after) = certificate_validity("test", leaf.der()).expect("validity");
        Arc::new(X509Svid {
            spiffe_id: proto::SpiffeId::new(spiffe_id).expect("id"),
            chain: vec![leaf.der().to_vec()],
            key: key.pkcs8_der(),
            not_before,
            not_after,
            rotate_at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_900_000_000),
            entry_revision: 3,
        })
    }

    fn snapshot(ca: &Ca) -> Snapshot {
        let mut snapshot = Snapshot::empty(TrustDomain::new(TD).expect("td"));
        snapshot.synced = true;
        snapshot.bundle = vec![ca.der.clone()];
        snapshot.crl = vec![vec![0x30, 0x00]];
        snapshot.entries = vec![
            entry("a1", "spiffe://plant.example/historian"),
            entry("b2", "spiffe://plant.example/scada"),
        ];
        snapshot.svids.insert(
            "a1".into(),
            svid(ca, "spiffe://plant.example/historian", 3600),
        );
        snapshot
            .svids
            .insert("b2".into(), svid(ca, "spiffe://plant.example/scada", 3600));
        snapshot
    }

    fn load(state_dir: &Path) -> (SavedCache, Option<Restored>) {
        let mut saved = SavedCache::new(state_dir);
        let restored = saved.load(&TrustDomain::new(TD).expect("td"), SystemTime::now());
        (saved, restored)
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn a_saved_cache_is_served_again_with_its_keys_and_nothing_else_can_read_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ca();
        let snapshot = snapshot(&ca);
        SavedCache::new(dir.path()).save(&snapshot).expect("save");

        let (_, restored) = load(dir.path());
        let restored = restored.expect("a cache");
        assert_eq!(restored.bundle, snapshot.bundle);
        assert_eq!(restored.crl, snapshot.crl);
        assert_eq!(restored.entries, snapshot.entries);
        assert_eq!(restored.svids.keys().collect::<Vec<_>>(), vec!["a1", "b2"]);
        for (id, svid) in &restored.svids {
            let before = &snapshot.svids[id];
            assert_eq!(svid.chain, before.chain);
            assert_eq!(svid.key.as_slice(), before.key.as_slice());
            assert_eq!(svid.not_after, before.not_after);
            assert_eq!(svid.rotate_at, before.rotate_at);
            assert_eq!(svid.entry_revision, 3);
        }
        let cache = dir.path().join(CACHE_DIR);
        assert_eq!(mode(&cache), 0o700);
        assert_eq!(mode(&cache.join(SVIDS_DIR)), 0o700);
        assert_eq!(mode(&cache.join(TRUST_FILE)), 0o600);
        assert_eq!(mode(&cache.join(SVIDS_DIR).join("a1.json")), 0o600);
    }

    #[test]
    fn only_what_changed_is_rewritten_and_a_dropped_svid_leaves_the_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ca();
        let mut snapshot = snapshot(&ca);
        let mut saved = SavedCache::new(dir.path());
        saved.save(&snapshot).expect("save");
        let svids = dir.path().join(CACHE_DIR).join(SVIDS_DIR);
        // Each write is a rename of a new file: an unchanged inode was not rewritten.
        let inode = |path: PathBuf| std::fs::metadata(path).expect("metadata").ino();
        let trust = inode(dir.path().join(CACHE_DIR).join(TRUST_FILE));
        let a1 = inode(svids.join("a1.json"));
        let b2 = inode(svids.join("b2.json"));

        // b2 rotates, a1 is deleted with its entry.
        snapshot
            .svids
            .insert("b2".into(), svid(&ca, "spiffe://plant.example/scada", 7200));
        snapshot.svids.remove("a1");
        snapshot.entries.remove(0);
        saved.save(&snapshot).expect("save");
        assert!(!svids.join("a1.json").exists());
        assert_ne!(inode(svids.join("b2.json")), b2);
        assert_ne!(inode(dir.path().join(CACHE_DIR).join(TRUST_FILE)), trust);
        let _ = a1;

        // Nothing new: nothing written.
        let b2 = inode(svids.join("b2.json"));
        let trust = inode(dir.path().join(CACHE_DIR).join(TRUST_FILE));
        saved.save(&snapshot).expect("save");
        assert_eq!(inode(svids.join("b2.json")), b2);
        assert_eq!(inode(dir.path().join(CACHE_DIR).join(TRUST_FILE)), trust);

        let (_, restored) = load(dir.path());
        assert_eq!(
            restored.expect("cache").svids.keys().collect::<Vec<_>>(),
            vec!["b2"]
        );
    }

    #[test]
    fn expired_mismatched_and_foreign_svids_are_never_served() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ca();
        let mut snapshot = snapshot(&ca);
        // a1 expires a second from now; b2's file is given another SVID's key.
        snapshot.svids.insert(
            "a1".into(),
            svid(&ca, "spiffe://plant.example/historian", 1),
        );
        SavedCache::new(dir.path()).save(&snapshot).expect("save");
        let b2 = dir.path().join(CACHE_DIR).join(SVIDS_DIR).join("b2.json");
        let other = svid(&ca, "spiffe://plant.example/scada", 3600);
        let mut file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&b2).expect("read")).expect("json");
        file["key"] = B64.encode(other.key.as_slice()).into();
        std::fs::write(&b2, file.to_string()).expect("write");

        let mut saved = SavedCache::new(dir.path());
        let later = SystemTime::now() + Duration::from_secs(2);
        let restored = saved
            .load(&TrustDomain::new(TD).expect("td"), later)
            .expect("the trust file is fine");
        assert!(restored.svids.is_empty(), "{:?}", restored.svids);
        assert_eq!(restored.entries.len(), 2, "entries are still known");
        // The next save removes the files it could not use.
        saved
            .save(&Snapshot {
                svids: BTreeMap::new(),
                ..snapshot.clone()
            })
            .expect("save");
        assert!(!b2.exists());

        // A cache of another trust domain is not used at all.
        let mut foreign = SavedCache::new(dir.path());
        assert!(foreign
            .load(
                &TrustDomain::new("other.example").expect("td"),
                SystemTime::now()
            )
            .is_none());
    }

    /// A stand-in for a TPM: "seals" by XOR with its own pad, so only the same pad opens
    /// it (a real TPM's integrity check refuses another's blob; this one checks a tag).
    #[derive(Debug)]
    struct Pad(u8);

    impl KeyProtector for Pad {
        fn seal(&self, secret: &[u8]) -> Result<Vec<u8>, Error> {
            let mut out = vec![self.0];
            out.extend(secret.iter().map(|b| b ^ self.0));
            Ok(out)
        }
        fn unseal(&self, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, Error> {
            match sealed.split_first() {
                Some((tag, body)) if *tag == self.0 => {
                    Ok(Zeroizing::new(body.iter().map(|b| b ^ self.0).collect()))
                }
                _ => Err(Error::Attestation("another TPM's blob".into())),
            }
        }
    }

    #[test]
    fn sealed_keys_are_served_by_their_own_tpm_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = ca();
        let snapshot = snapshot(&ca);
        let mut saved = SavedCache::new(dir.path());
        saved.protect_keys_with(Box::new(Pad(0x5a)));
        saved.save(&snapshot).expect("save");
        let file =
            std::fs::read_to_string(dir.path().join(CACHE_DIR).join(SVIDS_DIR).join("a1.json"))
                .expect("read");
        assert!(
            file.contains("\"sealed_key\"") && !file.contains("\"key\""),
            "{file}"
        );
        let plain = B64.encode(snapshot.svids["a1"].key.as_slice());
        assert!(
            !file.contains(&plain),
            "the key is in the file in the clear"
        );

        let load_with = |pad: Option<u8>| {
            let mut saved = SavedCache::new(dir.path());
            if let Some(pad) = pad {
                saved.protect_keys_with(Box::new(Pad(pad)));
            }
            saved
                .load(&TrustDomain::new(TD).expect("td"), SystemTime::now())
                .expect("the trust file is fine")
        };
        let mut holder = SavedCache::new(dir.path());
        holder.protect_keys_with(Box::new(Pad(0x5a)));
        let _ = holder.load(&TrustDomain::new(TD).expect("td"), SystemTime::now());
        let shown = format!("{holder:?}");
        assert!(shown.contains("<redacted>"), "{shown}");
        let key_bytes = format!("{:?}", holder.key.as_ref().map(|k| k.to_vec()));
        assert!(
            !shown.contains(&key_bytes[5..key_bytes.len() - 1]),
            "{shown}"
        );

        let own = load_with(Some(0x5a));
        assert_eq!(own.svids.len(), 2);
        assert_eq!(
            own.svids["a1"].key.as_slice(),
            snapshot.svids["a1"].key.as_slice()
        );
        // Another TPM, or an agent without one: entries, but no key and so no SVID.
        assert!(load_with(Some(0x33)).svids.is_empty());
        assert!(load_with(None).svids.is_empty());
    }

    #[test]
    fn any_entry_id_gets_a_file_name_of_its_own() {
        for id in ["0f3a", "a-b_c", "../../etc/passwd", "x.json", "hex.41", ""] {
            let stem = file_stem(id);
            assert!(!stem.contains('/'), "{stem}");
            assert_eq!(entry_id_of(&format!("{stem}.json")).as_deref(), Some(id));
        }
        assert_ne!(file_stem("hex.41"), file_stem("A"));
        assert_eq!(entry_id_of("notes.txt"), None);
    }
}
