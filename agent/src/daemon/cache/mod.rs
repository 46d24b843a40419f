//! The SVID cache and the loop that keeps it fresh: node identity (attest, renew at half
//! life, re-attest after a lapse), entry sync every `sync_interval`, X509-SVID minting in
//! batches with rotation at half life ± 10 % and jittered backoff on failure.
//!
//! State is published as `watch` of `Arc<Snapshot>` (as linkerd publishes its credentials):
//! Workload API streams clone the `Arc` and never hold a lock while they send, and every
//! publication wakes them to push the new state. An SVID is dropped from the snapshot the
//! moment it expires, so nothing expired is ever served, while valid ones keep being served
//! through an issuer outage.
//!
//! Everything served is also saved to `<state_dir>/cache/` as it changes ([`saved`]); at
//! start the agent serves that at once and says so (`agent status`, metrics) until it reaches
//! the issuer, so a restart during an outage does not leave workloads and PLCs with nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proto::TrustDomain;
use tokio::sync::watch;

use crate::daemon::entry::Entry;
use crate::daemon::issuer_client::{IssuerClient, IssuerEndpoint, NodeIdentity};
use crate::daemon::jwt::JwtKeys;
use crate::daemon::metrics::{Outcome, METRICS};
use crate::daemon::node::NodeAttestation;
use crate::daemon::rotation::{
    arrived_expired, clock_ahead_message, is_valid, jitter, lifetime_start, retry_delay,
    rotation_time,
};
use crate::daemon::status::{self, Status};
use crate::daemon::svid::{
    certificate_validity, ensure_certifies, spiffe_id_of, KeyPair, NodeKey, X509Svid,
};
use crate::pem_files::{self, Overwrite};
use crate::Error;

mod saved;

use saved::SavedCache;
pub use saved::{KeyProtector, CACHE_DIR};

/// CSRs per MintX509Svids call.
const MINT_BATCH: usize = 100;

const NODE_CHAIN_FILE: &str = "node-svid.pem";
const NODE_KEY_FILE: &str = "node-key.pem";
/// Instead of `node-key.pem` when the node key is held by the TPM: its key reference.
const NODE_KEY_REF_FILE: &str = "node-key.ref";
/// A TPM-held node key's blob in the state directory: `node-key-<nanoseconds>.tpm`.
pub const NODE_KEY_BLOB_PREFIX: &str = "node-key-";
/// See [`NODE_KEY_BLOB_PREFIX`].
pub const NODE_KEY_BLOB_SUFFIX: &str = ".tpm";
const NODE_BUNDLE_FILE: &str = "node-bundle.pem";
const KEY_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;

/// What the agent holds now; every Workload API answer is computed from one of these.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The trust domain of every identity served.
    pub trust_domain: TrustDomain,
    /// Whether entries were synced at least once (before that nobody is refused: the agent
    /// does not know yet).
    pub synced: bool,
    /// DER root certificates.
    pub bundle: Vec<Vec<u8>>,
    /// DER CRLs.
    pub crl: Vec<Vec<u8>>,
    /// The trust domain's JWKS document.
    pub jwt_bundle: Vec<u8>,
    /// `jwt_bundle`, parsed.
    pub jwt_keys: JwtKeys,
    /// This node's entries.
    pub entries: Vec<Arc<Entry>>,
    /// Valid X509-SVIDs by entry id.
    pub svids: BTreeMap<String, Arc<X509Svid>>,
}

impl Snapshot {
    /// An empty snapshot, before the first sync.
    pub fn empty(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            synced: false,
            bundle: Vec::new(),
            crl: Vec::new(),
            jwt_bundle: Vec::new(),
            jwt_keys: JwtKeys::default(),
            entries: Vec::new(),
            svids: BTreeMap::new(),
        }
    }

    /// The bundle as the Workload API carries it: concatenated DER.
    pub fn bundle_der(&self) -> Vec<u8> {
        self.bundle.concat()
    }
}

/// The node identity plus when it is renewed.
struct Node {
    identity: NodeIdentity,
    rotate_at: SystemTime,
    client: IssuerClient,
}

/// See [`Manager::fingerprint`].
#[derive(Debug, PartialEq, Eq)]
struct Fingerprint {
    synced: bool,
    bundle: Vec<Vec<u8>>,
    crl: Vec<Vec<u8>>,
    jwt_bundle: Vec<u8>,
    entries: Vec<(String, u64)>,
    svids: Vec<(String, SystemTime)>,
    node: Option<SystemTime>,
    from_cache: bool,
}

/// A pass that finds the wall clock earlier than the previous pass by more than this saw
/// the clock step back (passes are at most a sync interval apart, and never go back by
/// themselves).
const CLOCK_STEP_TOLERANCE: Duration = Duration::from_secs(2);

/// Keeps the cache fresh; see the module doc. Its state is in parts by job: the node
/// identity (`NodeKeeper`), when to sync entries and when to mint (a `Schedule` each), and
/// what is published ([`Snapshot`] and the last error).
pub struct Manager {
    trust_domain: TrustDomain,
    state_dir: PathBuf,
    sync_interval: Duration,
    node: NodeKeeper,
    sync_schedule: Schedule,
    mint_schedule: Schedule,
    /// The wall-clock time of the previous pass, to notice the clock stepping back.
    last_pass: SystemTime,
    snapshot: Snapshot,
    last_error: Option<String>,
    state: watch::Sender<Arc<Snapshot>>,
    /// The cache on disk, saved after every change.
    saved: SavedCache,
    /// While what is served came from the saved cache (the issuer not reached since the
    /// start): when that cache was saved.
    from_cache: Option<SystemTime>,
}

/// The node identity's part: how the node attests, the identity it holds, and when to try
/// again after a failure.
struct NodeKeeper {
    endpoint: IssuerEndpoint,
    attestation: Arc<Mutex<Box<dyn NodeAttestation>>>,
    method: &'static str,
    can_reattest: bool,
    /// Renews by attesting again, never over mTLS (TPM nodes).
    renews_by_attesting: bool,
    current: Option<Node>,
    /// Whether this node ever held an identity (this run or a persisted one).
    had_identity: bool,
    schedule: Schedule,
    /// A client authenticated as the node, published for JWT-SVID minting.
    issuer: watch::Sender<Option<IssuerClient>>,
}

impl NodeKeeper {
    /// Drops the node identity: the next pass attests again.
    fn forget(&mut self) {
        self.current = None;
        self.issuer.send_replace(None);
    }
}

/// When a recurring job (attestation or renewal, entry sync, minting) runs next, and how
/// many times in a row it failed (its backoff).
struct Schedule {
    next: SystemTime,
    failures: u32,
}

impl Schedule {
    /// Due at `now`, no failures yet.
    fn at(now: SystemTime) -> Self {
        Self {
            next: now,
            failures: 0,
        }
    }

    /// After a failure at `now`: wait the jittered backoff for the failures so far.
    fn back_off(&mut self, now: SystemTime) {
        self.back_off_at_most(now, Duration::MAX);
    }

    /// As [`Schedule::back_off`], waiting no longer than `longest`.
    fn back_off_at_most(&mut self, now: SystemTime, longest: Duration) {
        self.next = now + retry_delay(self.failures, jitter()).min(longest);
        self.failures = self.failures.saturating_add(1);
    }
}

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Manager")
            .field("method", &self.node.method)
            .field("entries", &self.snapshot.entries.len())
            .finish_non_exhaustive()
    }
}

/// The channels a [`Manager`] publishes on, for the Workload API.
#[derive(Debug, Clone)]
pub struct Published {
    /// The current snapshot.
    pub state: watch::Receiver<Arc<Snapshot>>,
    /// A client authenticated as the node, once there is one (for JWT-SVID minting).
    pub issuer: watch::Receiver<Option<IssuerClient>>,
}

impl Manager {
    /// A manager for a node attesting with `attestation`, keeping its files in `state_dir`.
    pub fn new(
        trust_domain: TrustDomain,
        state_dir: PathBuf,
        sync_interval: Duration,
        endpoint: IssuerEndpoint,
        attestation: Box<dyn NodeAttestation>,
    ) -> (Self, Published) {
        let snapshot = Snapshot::empty(trust_domain.clone());
        let (state, state_rx) = watch::channel(Arc::new(snapshot.clone()));
        let (issuer, issuer_rx) = watch::channel(None);
        let now = SystemTime::now();
        let saved = SavedCache::new(&state_dir);
        let manager = Self {
            trust_domain,
            state_dir,
            sync_interval,
            node: NodeKeeper {
                endpoint,
                method: attestation.method(),
                can_reattest: attestation.can_reattest(),
                renews_by_attesting: attestation.renews_by_attesting(),
                attestation: Arc::new(Mutex::new(attestation)),
                current: None,
                had_identity: false,
                schedule: Schedule::at(now),
                issuer,
            },
            sync_schedule: Schedule::at(now),
            mint_schedule: Schedule::at(now),
            last_pass: now,
            saved,
            from_cache: None,
            snapshot,
            last_error: None,
            state,
        };
        (
            manager,
            Published {
                state: state_rx,
                issuer: issuer_rx,
            },
        )
    }

    /// Keeps the saved cache's private keys under a key `protector` seals (the node's TPM):
    /// a copy of the state directory then serves nothing elsewhere.
    pub fn protect_cache_keys_with(&mut self, protector: Box<dyn KeyProtector>) {
        self.saved.protect_keys_with(protector);
    }

    /// Runs until `shutdown` resolves. Fails only when the node can never get an identity
    /// (its attestation was refused and it had none).
    pub async fn run(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), Error> {
        self.load_persisted_node();
        self.restore_saved_cache(SystemTime::now());
        tokio::pin!(shutdown);
        loop {
            let wake = self.step(SystemTime::now()).await?;
            let delay = wake
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
                .max(Duration::from_millis(50));
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    /// One pass: node identity, sync, minting, expiry; publishes and returns when to wake.
    async fn step(&mut self, now: SystemTime) -> Result<SystemTime, Error> {
        self.notice_clock_step_back(now);
        let before = self.fingerprint();
        let error_before = self.last_error.clone();
        self.ensure_node(now).await?;
        if self.node.current.is_some() && now >= self.sync_schedule.next {
            self.sync(now).await;
        }
        if self.node.current.is_some() && now >= self.mint_schedule.next {
            self.mint(now).await;
        }
        self.drop_expired(SystemTime::now());
        let changed = self.fingerprint() != before;
        if changed {
            self.save();
        }
        if changed || self.last_error != error_before {
            self.publish();
        }
        Ok(self.next_wake(SystemTime::now()))
    }

    /// Retry and sync times are wall-clock instants; after the clock steps back (an NTP
    /// correction of a clock that ran ahead, an operator setting it) they would lie hours
    /// away and the agent would sit idle that long. Bring them to now; backoff counts stay,
    /// so a clock that keeps jumping still can't make the agent loop. Rotation times are
    /// left alone: they follow the certificates, which the same clock judges.
    fn notice_clock_step_back(&mut self, now: SystemTime) {
        let last = std::mem::replace(&mut self.last_pass, now);
        let Ok(back) = last.duration_since(now) else {
            return;
        };
        if back < CLOCK_STEP_TOLERANCE {
            return;
        }
        tracing::warn!(
            seconds = back.as_secs(),
            "the clock stepped back; retrying the issuer now instead of at the old times"
        );
        self.node.schedule.next = self.node.schedule.next.min(now);
        self.sync_schedule.next = self.sync_schedule.next.min(now);
        self.mint_schedule.next = self.mint_schedule.next.min(now);
    }

    fn load_persisted_node(&mut self) {
        let attestation = Arc::clone(&self.node.attestation);
        let reopen = move |key_ref: hsm::KeyRef| {
            attestation
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .reopen_node_key(key_ref)
        };
        match read_persisted_node(&self.state_dir, reopen) {
            Ok(Some(identity)) if is_valid(identity.not_after, SystemTime::now()) => {
                tracing::info!(spiffe_id = %identity.spiffe_id, "node identity loaded from the state directory");
                self.node.had_identity = true;
                if let Err(e) = self.adopt(identity) {
                    tracing::warn!(error = %e, "persisted node identity not usable; attesting again");
                }
            }
            Ok(Some(identity)) => {
                tracing::warn!(spiffe_id = %identity.spiffe_id, "persisted node SVID has expired; attesting again");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, "persisted node identity not readable; attesting again")
            }
        }
    }

    /// Serves the saved cache, if there is one, until the issuer is reached: after a restart
    /// during an issuer outage workloads and the PLC proxy get at once what they had.
    fn restore_saved_cache(&mut self, now: SystemTime) {
        let Some(restored) = self.saved.load(&self.trust_domain, now) else {
            return;
        };
        tracing::info!(
            entries = restored.entries.len(),
            svids = restored.svids.len(),
            saved_at = %proto::rfc3339(restored.saved_at),
            "serving the saved cache until the issuer is reached"
        );
        if !restored.bundle.is_empty() {
            self.snapshot.bundle = restored.bundle;
        }
        self.snapshot.crl = restored.crl;
        self.snapshot.jwt_bundle = restored.jwt_bundle;
        self.snapshot.jwt_keys = restored.jwt_keys;
        self.snapshot.entries = restored.entries;
        self.snapshot.svids = restored.svids;
        // The agent knows its entries: callers no entry matches are refused, not kept
        // waiting for a sync that may be hours away.
        self.snapshot.synced = true;
        self.from_cache = Some(restored.saved_at);
        self.publish();
    }

    /// Writes what changed to the cache on disk. Serving goes on if that fails; only a
    /// restart during an outage would miss it.
    fn save(&mut self) {
        if let Err(e) = self.saved.save(&self.snapshot) {
            tracing::warn!(error = %e, "could not save the cache to the state directory");
        }
    }

    fn persist_node(&self, identity: &NodeIdentity) -> Result<(), Error> {
        std::fs::create_dir_all(&self.state_dir).map_err(Error::io(&self.state_dir))?;
        let write = |name: &str, bytes: &[u8], mode: u32| {
            pem_files::write_atomically(&self.state_dir.join(name), bytes, mode, Overwrite::Allow)
        };
        // Key first: a chain without its key is useless, a key without its chain harmless.
        let other = match &identity.key {
            NodeKey::Software(key) => {
                write(NODE_KEY_FILE, key.pkcs8_pem().as_bytes(), KEY_MODE)?;
                NODE_KEY_REF_FILE
            }
            NodeKey::Held { key_ref, .. } => {
                write(
                    NODE_KEY_REF_FILE,
                    format!("{key_ref}\n").as_bytes(),
                    KEY_MODE,
                )?;
                NODE_KEY_FILE
            }
        };
        remove_if_present(&self.state_dir.join(other))?;
        remove_stale_key_blobs(&self.state_dir, &identity.key);
        write(
            NODE_CHAIN_FILE,
            pem_files::encode_certificates(identity.chain.iter().map(Vec::as_slice))?.as_bytes(),
            PUBLIC_MODE,
        )?;
        write(
            NODE_BUNDLE_FILE,
            pem_files::encode_certificates(identity.bundle.iter().map(Vec::as_slice))?.as_bytes(),
            PUBLIC_MODE,
        )
    }

    /// Makes `identity` the node's: a client presenting it, the renewal time, the bundle.
    fn adopt(&mut self, identity: NodeIdentity) -> Result<(), Error> {
        let client = self.node.endpoint.client(Some(&identity))?;
        // received_at: when it was loaded or arrived; for a persisted SVID "now" would push
        // renewal late, so a reloaded one counts from its notBefore.
        let rotate_at = rotation_time(
            lifetime_start(identity.not_before, identity.received_at),
            identity.not_after,
            jitter(),
        );
        if !identity.bundle.is_empty() && !self.snapshot.synced {
            self.snapshot.bundle = identity.bundle.clone();
        }
        self.node.issuer.send_replace(Some(client.clone()));
        self.node.current = Some(Node {
            identity,
            rotate_at,
            client,
        });
        self.node.had_identity = true;
        Ok(())
    }

    async fn ensure_node(&mut self, now: SystemTime) -> Result<(), Error> {
        let lapsed = self
            .node
            .current
            .as_ref()
            .is_some_and(|n| !is_valid(n.identity.not_after, now));
        if lapsed {
            let dead_on_arrival = self
                .node
                .current
                .as_ref()
                .and_then(|n| arrived_expired(n.identity.not_after, n.identity.received_at));
            self.node.forget();
            match dead_on_arrival {
                // The clock here is wrong, not the SVID: attesting again at once would only
                // fetch another dead one, in a loop. Back off (doubling to 30 s) instead.
                Some(skew) => {
                    let message = clock_ahead_message("node SVID", skew);
                    if self.last_error.as_deref() != Some(message.as_str()) {
                        tracing::error!("{message}");
                    }
                    self.node.schedule.back_off(now);
                    self.last_error = Some(message);
                }
                None => {
                    tracing::warn!(
                        "the node SVID expired (was the issuer unreachable?); attesting again"
                    );
                    // Attestation is a new kind of attempt: its backoff starts from the
                    // beginning, so the node is back soon after the issuer is.
                    self.node.schedule.failures = 0;
                    self.node.schedule.next = now;
                }
            }
        }
        if now < self.node.schedule.next {
            return Ok(());
        }
        match &self.node.current {
            Some(node) if now < node.rotate_at => Ok(()),
            // The current SVID keeps serving until the new attestation succeeds.
            Some(_) if self.node.renews_by_attesting => self.attest(now).await,
            Some(node) => {
                let client = node.client.clone();
                match client.renew().await {
                    Ok(identity) => {
                        tracing::info!(spiffe_id = %identity.spiffe_id, "node SVID renewed");
                        self.take_identity(identity);
                        Ok(())
                    }
                    Err(e) if e.is_unavailable() => {
                        self.node_failed(now, &e);
                        Ok(())
                    }
                    Err(e) => {
                        // Refused (e.g. the node was evicted): only a new attestation helps.
                        self.node_failed(now, &e);
                        if self.node.can_reattest {
                            self.node.forget();
                        }
                        Ok(())
                    }
                }
            }
            None if self.node.had_identity && !self.node.can_reattest => {
                let message = format!(
                    "the node SVID has lapsed and a {} node can't attest again by itself: put a new token from `issuer token create --kind join` in agent.toml and restart the agent",
                    self.node.method
                );
                if self.last_error.as_deref() != Some(message.as_str()) {
                    tracing::error!("{message}");
                }
                self.last_error = Some(message);
                // Nothing to retry; look again in a while in case the state changes.
                self.node.schedule.next = now + self.sync_interval.max(Duration::from_secs(30));
                Ok(())
            }
            None => self.attest(now).await,
        }
    }

    async fn attest(&mut self, now: SystemTime) -> Result<(), Error> {
        let client = self.node.endpoint.client(None)?;
        let attested = client.attest(&self.node.attestation).await;
        if let Err(e) = &attested {
            let refused = matches!(e, Error::Issuer { .. }) && !e.is_unavailable();
            METRICS.attestation(if refused {
                Outcome::Refused
            } else {
                Outcome::Error
            });
        }
        match attested {
            Ok(identity) => {
                METRICS.attestation(Outcome::Ok);
                if self.node.current.is_some() {
                    tracing::info!(spiffe_id = %identity.spiffe_id, method = self.node.method, "node SVID renewed by attesting again");
                } else {
                    tracing::info!(spiffe_id = %identity.spiffe_id, method = self.node.method, "node attested");
                }
                self.take_identity(identity);
                // A new identity may be a new node: sync at once.
                self.sync_schedule.next = now;
                self.mint_schedule.next = now;
                Ok(())
            }
            Err(e) if e.is_unavailable() => {
                self.node_failed(now, &e);
                Ok(())
            }
            Err(e) if !self.node.had_identity => Err(match e {
                Error::Issuer { step, code, message } if !self.node.can_reattest => Error::Issuer {
                    step,
                    code,
                    message: format!(
                        "{message}; a join token works once: create a new one with `issuer token create --kind join` and put it in agent.toml"
                    ),
                },
                other => other,
            }),
            Err(e) => {
                self.node_failed(now, &e);
                Ok(())
            }
        }
    }

    fn take_identity(&mut self, identity: NodeIdentity) {
        if let Err(e) = self.persist_node(&identity) {
            // Serving goes on; only a restart would need to attest again.
            tracing::warn!(error = %e, "could not save the node identity");
        }
        let dead_on_arrival = arrived_expired(identity.not_after, identity.received_at);
        match self.adopt(identity) {
            // Kept as the node's (the issuer, whose clock decides, may still take it) but
            // its failure count stands, so the lapse it causes next pass backs off.
            Ok(()) if dead_on_arrival.is_some() => {}
            Ok(()) => {
                self.node.schedule.failures = 0;
                self.last_error = None;
            }
            Err(e) => self.node_failed(SystemTime::now(), &e),
        }
    }

    fn node_failed(&mut self, now: SystemTime, error: &Error) {
        tracing::warn!(error = %error, attempt = self.node.schedule.failures, "node identity");
        self.node.schedule.back_off(now);
        self.last_error = Some(error.to_string());
    }

    async fn sync(&mut self, now: SystemTime) {
        let Some(node) = &self.node.current else {
            return;
        };
        match node.client.sync().await {
            Ok(response) => {
                self.sync_schedule.failures = 0;
                self.sync_schedule.next = now + self.sync_interval;
                self.apply_sync(response);
            }
            Err(e) => {
                tracing::warn!(error = %e, "entry sync failed; serving what is cached");
                self.sync_schedule.back_off_at_most(now, self.sync_interval);
                let refused = matches!(
                    &e,
                    Error::Issuer {
                        code: tonic::Code::PermissionDenied | tonic::Code::Unauthenticated,
                        ..
                    }
                );
                if refused && self.node.can_reattest {
                    // The issuer no longer takes this node SVID (evicted): attest again.
                    self.node.forget();
                }
                self.last_error = Some(if refused && !self.node.can_reattest {
                    format!(
                        "{e}; if this node was evicted, a {} node needs a new token from `issuer token create --kind join` in agent.toml and a restart (after removing {} in the state directory)",
                        self.node.method, NODE_CHAIN_FILE
                    )
                } else {
                    e.to_string()
                });
            }
        }
    }

    fn apply_sync(&mut self, response: proto::agent::SyncEntriesResponse) {
        let mut entries = Vec::with_capacity(response.entries.len());
        for wire in response.entries {
            match Entry::from_wire(wire) {
                Ok(entry) => entries.push(Arc::new(entry)),
                Err(e) => tracing::warn!(error = %e, "entry skipped"),
            }
        }
        entries.sort_by(|a, b| a.id.cmp(&b.id));
        self.snapshot
            .svids
            .retain(|id, _| entries.iter().any(|e| &e.id == id));
        if !response.x509_bundle.is_empty() {
            self.snapshot.bundle = response.x509_bundle;
        }
        self.snapshot.crl = response.crl;
        if self.snapshot.jwt_bundle != response.jwt_bundle {
            match JwtKeys::from_jwks(&response.jwt_bundle) {
                Ok(keys) => {
                    self.snapshot.jwt_keys = keys;
                    self.snapshot.jwt_bundle = response.jwt_bundle;
                }
                Err(e) => tracing::warn!(error = %e, "JWT bundle from the issuer not usable"),
            }
        }
        if self.snapshot.entries != entries {
            // A new or changed entry is minted for now, not at the next retry.
            self.mint_schedule.next = SystemTime::now();
        }
        self.snapshot.entries = entries;
        self.snapshot.synced = true;
        if self.from_cache.take().is_some() {
            tracing::info!("reached the issuer: serving its entries, no longer the saved cache");
        }
        if self.last_error.is_some() && self.node.schedule.failures == 0 {
            self.last_error = None;
        }
    }

    /// Entries with no SVID, an SVID due for rotation, or one minted for an older revision.
    fn due(&self, now: SystemTime) -> Vec<Arc<Entry>> {
        self.snapshot
            .entries
            .iter()
            .filter(|entry| match self.snapshot.svids.get(&entry.id) {
                None => true,
                Some(svid) => now >= svid.rotate_at || svid.entry_revision != entry.revision,
            })
            .cloned()
            .collect()
    }

    async fn mint(&mut self, now: SystemTime) {
        let due = self.due(now);
        if due.is_empty() {
            self.mint_schedule.next = self.next_rotation().unwrap_or(now + self.sync_interval);
            return;
        }
        let Some(node) = &self.node.current else {
            return;
        };
        let client = node.client.clone();
        let mut failed = None;
        for batch in due.chunks(MINT_BATCH) {
            match mint_batch(&client, batch).await {
                Ok(svids) => {
                    for (entry_id, svid) in svids {
                        tracing::info!(spiffe_id = %svid.spiffe_id, rotate_at = %proto::rfc3339(svid.rotate_at), "X509-SVID minted");
                        let replaced = self.snapshot.svids.insert(entry_id, Arc::new(svid));
                        METRICS.x509_minted(replaced.is_some());
                    }
                }
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        // Entries the issuer did not answer for count as a failure too, so they are retried
        // with backoff rather than in a tight loop.
        let missing = self.due(SystemTime::now()).len();
        match (failed, missing) {
            (None, 0) => {
                self.mint_schedule.failures = 0;
                self.mint_schedule.next = self.next_rotation().unwrap_or(now + self.sync_interval);
            }
            (error, _) => {
                let dead_on_arrival = self
                    .snapshot
                    .svids
                    .values()
                    .filter_map(|svid| arrived_expired(svid.not_after, SystemTime::now()))
                    .max();
                let text = match (error, dead_on_arrival) {
                    (Some(e), _) => e.to_string(),
                    (None, Some(skew)) => clock_ahead_message("X509-SVID", skew),
                    (None, None) => format!("the issuer minted no SVID for {missing} entries"),
                };
                tracing::warn!(error = %text, attempt = self.mint_schedule.failures, "X509-SVID minting failed; retrying with backoff");
                self.mint_schedule.back_off(now);
                self.last_error = Some(text);
            }
        }
    }

    fn next_rotation(&self) -> Option<SystemTime> {
        self.snapshot.svids.values().map(|s| s.rotate_at).min()
    }

    fn drop_expired(&mut self, now: SystemTime) {
        self.snapshot.svids.retain(|_, svid| {
            let keep = is_valid(svid.not_after, now);
            if !keep {
                tracing::warn!(spiffe_id = %svid.spiffe_id, "X509-SVID expired before it could be rotated; no longer served");
            }
            keep
        });
    }

    /// The earliest moment something can be done: only times the next pass would act on
    /// count, so a wait on a retry never turns into a busy loop.
    fn next_wake(&self, now: SystemTime) -> SystemTime {
        let mut wake = now + self.sync_interval;
        let mut consider = |t: SystemTime| wake = wake.min(t);
        match &self.node.current {
            Some(node) => {
                consider(self.sync_schedule.next);
                consider(node.rotate_at.max(self.node.schedule.next));
                consider(node.identity.not_after.max(self.node.schedule.next));
                if !self.snapshot.entries.is_empty() {
                    consider(self.mint_schedule.next);
                }
            }
            None => consider(self.node.schedule.next),
        }
        // Wake when an SVID expires, to stop serving it.
        for svid in self.snapshot.svids.values() {
            if svid.not_after > now {
                consider(svid.not_after);
            }
        }
        wake
    }

    /// What Workload API clients and `agent status` see, in short: it changes when anything
    /// they get changes.
    fn fingerprint(&self) -> Fingerprint {
        Fingerprint {
            synced: self.snapshot.synced,
            bundle: self.snapshot.bundle.clone(),
            crl: self.snapshot.crl.clone(),
            jwt_bundle: self.snapshot.jwt_bundle.clone(),
            entries: self
                .snapshot
                .entries
                .iter()
                .map(|e| (e.id.clone(), e.revision))
                .collect(),
            svids: self
                .snapshot
                .svids
                .iter()
                .map(|(id, s)| (id.clone(), s.not_after))
                .collect(),
            node: self.node.current.as_ref().map(|n| n.identity.not_after),
            from_cache: self.from_cache.is_some(),
        }
    }

    fn publish(&mut self) {
        METRICS.cache(
            self.snapshot.svids.len(),
            self.snapshot.entries.len(),
            self.node.current.as_ref().map(|n| n.identity.not_after),
        );
        METRICS.serving_from_cache(self.from_cache.is_some());
        self.state.send_replace(Arc::new(self.snapshot.clone()));
        let node = self.node.current.as_ref().map(|n| status::NodeStatus {
            spiffe_id: n.identity.spiffe_id.to_string(),
            expires_at: proto::rfc3339(n.identity.not_after),
            renews_at: proto::rfc3339(n.rotate_at),
        });
        let status = Status::new(
            self.trust_domain.to_string(),
            self.node.method,
            node,
            &self.snapshot,
            self.last_error.clone(),
        )
        .from_cache(self.from_cache);
        if let Err(e) = status.write(&self.state_dir) {
            tracing::warn!(error = %e, "could not write status.json");
        }
    }
}

async fn mint_batch(
    client: &IssuerClient,
    batch: &[Arc<Entry>],
) -> Result<Vec<(String, X509Svid)>, Error> {
    let mut keys = BTreeMap::new();
    let mut requests = Vec::with_capacity(batch.len());
    for entry in batch {
        let key = KeyPair::generate()?;
        requests.push((entry.id.clone(), key.csr(Some(&entry.spiffe_id))?));
        keys.insert(entry.id.clone(), (Arc::clone(entry), key));
    }
    let minted = client.mint_x509(requests).await?;
    let mut svids = Vec::with_capacity(minted.len());
    for svid in minted {
        let Some((entry, key)) = keys.remove(&svid.entry_id) else {
            tracing::warn!(entry_id = %svid.entry_id, "the issuer answered for an entry not asked for; ignored");
            continue;
        };
        match check_minted(&entry, &key, svid.chain) {
            Ok(svid) => svids.push((entry.id.clone(), svid.with_key(key))),
            Err(e) => tracing::warn!(error = %e, entry_id = %entry.id, "minted X509-SVID refused"),
        }
    }
    Ok(svids)
}

/// An X509-SVID before its key is attached.
struct Minted(X509Svid);

impl Minted {
    fn with_key(mut self, key: KeyPair) -> X509Svid {
        self.0.key = key.pkcs8_der();
        self.0
    }
}

fn check_minted(entry: &Entry, key: &KeyPair, chain: Vec<Vec<u8>>) -> Result<Minted, Error> {
    let what = format!("X509-SVID for {}", entry.spiffe_id);
    let leaf = chain
        .first()
        .ok_or_else(|| Error::certificate(&what, "empty chain"))?;
    ensure_certifies(&what, leaf, key)?;
    let spiffe_id = spiffe_id_of(&what, leaf)?;
    if spiffe_id != entry.spiffe_id {
        return Err(Error::certificate(
            &what,
            format!("names {spiffe_id} instead"),
        ));
    }
    let (not_before, not_after) = certificate_validity(&what, leaf)?;
    Ok(Minted(X509Svid {
        spiffe_id,
        chain,
        key: zeroize::Zeroizing::new(Vec::new()),
        not_before,
        not_after,
        rotate_at: rotation_time(
            lifetime_start(not_before, SystemTime::now()),
            not_after,
            jitter(),
        ),
        entry_revision: entry.revision,
    }))
}

/// Whether `state_dir` holds a node identity the agent will use at start (readable and not
/// expired), so it need not attest.
pub fn holds_node_identity(state_dir: &Path) -> bool {
    // Only join-token nodes ask, and their keys are files: a key reference does not count.
    let no_held_keys = |_: hsm::KeyRef| Err(Error::Attestation("a TPM-held node key".into()));
    matches!(read_persisted_node(state_dir, no_held_keys), Ok(Some(identity)) if is_valid(identity.not_after, SystemTime::now()))
}

/// The node identity in `state_dir`; a TPM-held key is opened by `reopen` (the node's own
/// TPM, whatever TPM the reference was written for).
fn read_persisted_node(
    state_dir: &Path,
    reopen: impl FnOnce(hsm::KeyRef) -> Result<NodeKey, Error>,
) -> Result<Option<NodeIdentity>, Error> {
    let chain_path = state_dir.join(NODE_CHAIN_FILE);
    let key_path = state_dir.join(NODE_KEY_FILE);
    let key_ref_path = state_dir.join(NODE_KEY_REF_FILE);
    if !chain_path.exists() || !(key_path.exists() || key_ref_path.exists()) {
        return Ok(None);
    }
    let chain = pem_files::read_certificates(&chain_path)?;
    let key = if key_ref_path.exists() {
        // Held by the TPM: it loads only in the TPM that made it.
        reopen(pem_files::read_key_ref(&key_ref_path)?)?
    } else {
        let key_pem = zeroize::Zeroizing::new(
            std::fs::read_to_string(&key_path).map_err(Error::io(&key_path))?,
        );
        NodeKey::Software(KeyPair::from_pkcs8_pem(&key_pem)?)
    };
    let bundle_path = state_dir.join(NODE_BUNDLE_FILE);
    let bundle = if bundle_path.exists() {
        pem_files::read_certificates(&bundle_path)?
    } else {
        Vec::new()
    };
    let leaf = chain
        .first()
        .ok_or_else(|| Error::certificate(chain_path.display().to_string(), "empty"))?;
    let spiffe_id = spiffe_id_of("persisted node SVID", leaf)?;
    let svid = proto::agent::NodeSvid {
        spiffe_id: spiffe_id.to_string(),
        chain,
        bundle,
    };
    let mut identity = NodeIdentity::from_node_svid(svid, key)?;
    identity.received_at = identity.not_before;
    Ok(Some(identity))
}

fn remove_if_present(path: &Path) -> Result<(), Error> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io(path)(e)),
        _ => Ok(()),
    }
}

/// Removes the TPM blobs of node keys no longer in use (every blob but `key`'s): each
/// attestation makes a new one.
fn remove_stale_key_blobs(state_dir: &Path, key: &NodeKey) {
    let current = match key {
        NodeKey::Held {
            key_ref:
                hsm::KeyRef::Tpm(hsm::TpmKeyRef {
                    object: hsm::TpmObject::Blob(path),
                    ..
                }),
            ..
        } => path.file_name().map(std::ffi::OsStr::to_owned),
        _ => None,
    };
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return;
    };
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let text = name.to_string_lossy();
        let blob = text.starts_with(NODE_KEY_BLOB_PREFIX) && text.ends_with(NODE_KEY_BLOB_SUFFIX);
        if blob && Some(&name) != current.as_ref() {
            if let Err(e) = std::fs::remove_file(entry.path()) {
                tracing::warn!(error = %e, file = %entry.path().display(), "could not remove an old node key blob");
            }
        }
    }
}

/// The state directory's node files, for `agent status`.
pub fn node_files(state_dir: &Path) -> [PathBuf; 3] {
    [
        state_dir.join(NODE_CHAIN_FILE),
        state_dir.join(NODE_KEY_FILE),
        state_dir.join(NODE_BUNDLE_FILE),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::node::JoinTokenAttestation;

    fn manager(state_dir: &Path) -> Manager {
        let ca = rcgen::CertificateParams::default()
            .self_signed(&rcgen::KeyPair::generate().expect("key"))
            .expect("ca");
        // Port 1 on loopback: nothing listens, the connection is refused at once.
        let endpoint =
            IssuerEndpoint::new("https://127.0.0.1:1", &[ca.der().to_vec()]).expect("endpoint");
        let (manager, _published) = Manager::new(
            TrustDomain::new("plant.example").expect("td"),
            state_dir.to_owned(),
            Duration::from_secs(5),
            endpoint,
            Box::new(JoinTokenAttestation::new(
                crate::daemon::config::JoinToken::Inline(zeroize::Zeroizing::new("token".into())),
            )),
        );
        manager
    }

    #[tokio::test]
    async fn an_unreachable_issuer_is_retried_with_growing_backoff_not_in_a_loop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut manager = manager(dir.path());
        let now = SystemTime::now();
        let first = manager.step(now).await.expect("unavailable is not fatal");
        assert!(first >= now + Duration::from_millis(400), "{first:?}");
        let later = first + Duration::from_millis(1);
        let second = manager.step(later).await.expect("still not fatal");
        assert!(second >= later + Duration::from_millis(800), "{second:?}");
        assert!(manager
            .last_error
            .as_deref()
            .is_some_and(|e| e.contains("attesting")));
        // Nothing to serve and no node: no status change published beyond the error.
        assert!(manager.node.current.is_none());
    }

    #[tokio::test]
    async fn a_persisted_node_identity_is_loaded_and_an_expired_one_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("ca key");
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).expect("ca");
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.der(), &ca_key).expect("issuer");
        let write_node = |lifetime_ok: bool| {
            let key = KeyPair::generate().expect("key");
            let mut params = rcgen::CertificateParams::default();
            params.subject_alt_names = vec![rcgen::SanType::URI(
                "spiffe://plant.example/agent/join_token/abc"
                    .try_into()
                    .expect("uri"),
            )];
            let now = time::OffsetDateTime::now_utc();
            params.not_before = now - time::Duration::hours(2);
            params.not_after = if lifetime_ok {
                now + time::Duration::hours(1)
            } else {
                now - time::Duration::hours(1)
            };
            let public = rcgen::KeyPair::from_pem(&key.pkcs8_pem()).expect("rcgen key");
            let cert = params.signed_by(&public, &issuer).expect("cert");
            let identity = NodeIdentity::from_node_svid(
                proto::agent::NodeSvid {
                    spiffe_id: "spiffe://plant.example/agent/join_token/abc".into(),
                    chain: vec![cert.der().to_vec()],
                    bundle: vec![ca.der().to_vec()],
                },
                key,
            )
            .expect("identity");
            manager(dir.path())
                .persist_node(&identity)
                .expect("persist");
        };
        write_node(true);
        let mut loaded = manager(dir.path());
        loaded.load_persisted_node();
        let node = loaded.node.current.as_ref().expect("loaded");
        assert_eq!(
            node.identity.spiffe_id.as_str(),
            "spiffe://plant.example/agent/join_token/abc"
        );
        let mode = std::fs::metadata(dir.path().join(NODE_KEY_FILE))
            .expect("key file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        write_node(false);
        let mut expired = manager(dir.path());
        expired.load_persisted_node();
        assert!(expired.node.current.is_none());
    }
}
