//! The SPIFFE Workload API server (SPIFFE_Workload_API.md; DESIGN §5) on a Unix socket.
//!
//! - Every request must carry `workload.spiffe.io: true`, else InvalidArgument.
//! - The caller is attested from the kernel ([`crate::daemon::peer`]); a caller no entry matches gets
//!   PermissionDenied.
//! - Streams send their first message as soon as there is something to send, the full
//!   current state in every message, and a new message whenever what this caller gets changes
//!   (rotation, entry or bundle change). They read the cache through a `watch` of
//!   `Arc<Snapshot>`, so no lock is held while sending.

use std::collections::HashMap;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use proto::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse, SECURITY_HEADER,
};
use proto::{Selector, SpiffeId};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::{ReceiverStream, UnixListenerStream};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::daemon::cache::{Published, Snapshot};
use crate::daemon::entry::Entry;
use crate::daemon::issuer_client::IssuerClient;
use crate::daemon::jwt::claims_struct;
use crate::daemon::metrics::{self, METRICS};
use crate::daemon::peer::{ExecutableHashes, Peer, PeerStream};
use crate::daemon::rotation::is_valid;
use crate::Error;

/// Cached JWT-SVIDs kept at most; past this, expired ones go, then all.
const JWT_CACHE_ENTRIES: usize = 4096;

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// The Workload API service.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    published: Published,
    hashes: Arc<ExecutableHashes>,
    jwt_cache: Arc<Mutex<HashMap<JwtKey, CachedJwt>>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct JwtKey {
    entry_id: String,
    revision: u64,
    audience: Vec<String>,
}

#[derive(Clone)]
struct CachedJwt {
    token: String,
    refresh_at: SystemTime,
    expires_at: SystemTime,
}

impl std::fmt::Debug for CachedJwt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedJwt")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl WorkloadApi {
    /// The service over what the cache manager publishes.
    pub fn new(published: Published) -> Self {
        Self {
            published,
            hashes: Arc::new(ExecutableHashes::default()),
            jwt_cache: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The tonic service.
    pub fn into_service(self) -> SpiffeWorkloadApiServer<Self> {
        SpiffeWorkloadApiServer::new(self)
    }

    /// The header check and the caller's selectors.
    async fn caller<T>(&self, request: &Request<T>) -> Result<Vec<Selector>, Status> {
        let header = request
            .metadata()
            .get(SECURITY_HEADER)
            .and_then(|v| v.to_str().ok());
        if header != Some("true") {
            return Err(Status::invalid_argument(
                "security header missing from request",
            ));
        }
        let peer = request
            .extensions()
            .get::<Arc<Peer>>()
            .cloned()
            .ok_or_else(|| Status::internal("no peer information on this connection"))?;
        let hashes = Arc::clone(&self.hashes);
        let attested = tokio::task::spawn_blocking(move || {
            let result = peer.selectors(&hashes);
            (peer, result)
        })
        .await
        .map_err(|_| Status::internal("workload attestation failed"))?;
        match attested {
            (_, Ok(selectors)) => Ok(selectors),
            (peer, Err(refusal)) => {
                METRICS.workload_refusal();
                tracing::warn!(pid = ?peer.pid(), uid = peer.uid(), reason = %refusal, "workload attestation refused");
                Err(Status::permission_denied("no identity issued"))
            }
        }
    }

    /// The snapshot after the first sync (callers that come during start-up wait for it).
    /// The caller's selectors and the synced state, for a caller some entry matches;
    /// PermissionDenied otherwise. The streams start with this.
    async fn entitled_caller<T>(
        &self,
        request: &Request<T>,
    ) -> Result<(Vec<Selector>, watch::Receiver<Arc<Snapshot>>), Status> {
        let selectors = self.caller(request).await?;
        let state = self.synced().await?;
        if identities(&state.borrow(), &selectors).is_empty() {
            return Err(refused(&state.borrow(), &selectors));
        }
        Ok((selectors, state))
    }

    async fn synced(&self) -> Result<watch::Receiver<Arc<Snapshot>>, Status> {
        let mut state = self.published.state.clone();
        state
            .wait_for(|s| s.synced)
            .await
            .map_err(|_| Status::unavailable("the agent is shutting down"))?;
        Ok(state)
    }

    /// Spawns a stream that recomputes `build` on every snapshot and sends it when it
    /// changed. `build` answers `Err` to end the stream with that status, `Ok(None)` when
    /// there is nothing to send yet.
    fn stream<T, F>(&self, mut state: watch::Receiver<Arc<Snapshot>>, build: F) -> ResponseStream<T>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(&Snapshot) -> Result<Option<T>, Status> + Send + 'static,
    {
        let (sender, receiver) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut last: Option<T> = None;
            loop {
                let snapshot = Arc::clone(&state.borrow_and_update());
                match build(&snapshot) {
                    Err(status) => {
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                    Ok(Some(message)) if last.as_ref() != Some(&message) => {
                        if sender.send(Ok(message.clone())).await.is_err() {
                            return;
                        }
                        last = Some(message);
                    }
                    Ok(_) => {}
                }
                // Wake for the next publication, or when the earliest SVID expires so an
                // expired one is taken out of what this client holds.
                let expiry = next_expiry(&snapshot);
                tokio::select! {
                    changed = state.changed() => if changed.is_err() { return },
                    () = sender.closed() => return,
                    () = sleep_until(expiry) => {}
                }
            }
        });
        Box::pin(ReceiverStream::new(receiver))
    }

    fn issuer(&self) -> Result<IssuerClient, Status> {
        self.published.issuer.borrow().clone().ok_or_else(|| {
            Status::unavailable("the agent has no node identity yet; try again shortly")
        })
    }

    async fn jwt_svid(&self, entry: &Entry, audience: &[String]) -> Result<String, Status> {
        let mut sorted = audience.to_vec();
        sorted.sort();
        sorted.dedup();
        let key = JwtKey {
            entry_id: entry.id.clone(),
            revision: entry.revision,
            audience: sorted,
        };
        let now = SystemTime::now();
        if let Some(cached) = self.jwt_lock().get(&key) {
            if now < cached.refresh_at && is_valid(cached.expires_at, now) {
                return Ok(cached.token.clone());
            }
        }
        let minted = self.issuer()?.mint_jwt(&entry.id, audience).await.map_err(|status| {
            tracing::warn!(entry_id = %entry.id, code = ?status.code(), message = status.message(), "JWT-SVID minting failed");
            match status.code() {
                tonic::Code::PermissionDenied | tonic::Code::NotFound => {
                    Status::permission_denied("no identity issued")
                }
                tonic::Code::InvalidArgument => Status::invalid_argument(status.message().to_owned()),
                _ => Status::unavailable("the issuer could not mint a JWT-SVID; try again"),
            }
        })?;
        METRICS.jwt_minted();
        let expires_at = SystemTime::UNIX_EPOCH
            + Duration::from_secs(u64::try_from(minted.expires_at).unwrap_or(0));
        if !is_valid(expires_at, now) {
            return Err(Status::unavailable("the issuer minted an expired JWT-SVID"));
        }
        let refresh_at = crate::daemon::rotation::rotation_time(now, expires_at, 0.0);
        let mut cache = self.jwt_lock();
        if cache.len() >= JWT_CACHE_ENTRIES {
            cache.retain(|_, jwt| is_valid(jwt.expires_at, now));
            if cache.len() >= JWT_CACHE_ENTRIES {
                cache.clear();
            }
        }
        cache.insert(
            key,
            CachedJwt {
                token: minted.token.clone(),
                refresh_at,
                expires_at,
            },
        );
        Ok(minted.token)
    }

    fn jwt_lock(&self) -> std::sync::MutexGuard<'_, HashMap<JwtKey, CachedJwt>> {
        self.jwt_cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The entries a workload with `selectors` gets: those it matches that name a user (see
/// [`Entry::names_a_user`]).
fn identities(snapshot: &Snapshot, selectors: &[Selector]) -> Vec<Arc<Entry>> {
    snapshot
        .entries
        .iter()
        .filter(|entry| entry.matches(selectors) && entry.names_a_user())
        .cloned()
        .collect()
}

/// PermissionDenied for a caller [`identities`] gives nothing, logged; when an entry matched
/// it but names no user, both the log and the answer say so.
fn refused(snapshot: &Snapshot, selectors: &[Selector]) -> Status {
    let unserved = snapshot
        .entries
        .iter()
        .find(|entry| entry.matches(selectors) && !entry.names_a_user());
    let Some(entry) = unserved else {
        return denied();
    };
    let why = format!(
        "registration entry {} ({}) matches this process but names no unix:uid, unix:gid, unix:user or unix:group selector, and unix:path or unix:sha256 alone would match any local user who runs that executable; recreate the entry with one of them",
        entry.id, entry.spiffe_id
    );
    tracing::warn!(entry = entry.id, spiffe_id = %entry.spiffe_id, "Workload API caller refused: {why}");
    Status::permission_denied(format!("no identity issued: {why}"))
}

/// Counts a request by method and answer.
fn counted<T>(method: usize, result: Result<T, Status>) -> Result<T, Status> {
    let code = result
        .as_ref()
        .map_or_else(Status::code, |_| tonic::Code::Ok);
    METRICS.request(method, code);
    result
}

fn denied() -> Status {
    Status::permission_denied("no identity issued")
}

fn next_expiry(snapshot: &Snapshot) -> Option<SystemTime> {
    let now = SystemTime::now();
    snapshot
        .svids
        .values()
        .map(|s| s.not_after)
        .filter(|at| *at > now)
        .min()
}

async fn sleep_until(at: Option<SystemTime>) {
    match at {
        Some(at) => {
            let delay = at
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(delay + Duration::from_millis(1)).await;
        }
        None => std::future::pending().await,
    }
}

fn x509_response(
    snapshot: &Snapshot,
    selectors: &[Selector],
) -> Result<Option<X509svidResponse>, Status> {
    let entries = identities(snapshot, selectors);
    if entries.is_empty() {
        return Err(denied());
    }
    let now = SystemTime::now();
    let bundle = snapshot.bundle_der();
    let svids: Vec<X509svid> = entries
        .iter()
        .filter_map(|entry| {
            let svid = snapshot.svids.get(&entry.id)?;
            is_valid(svid.not_after, now).then(|| X509svid {
                spiffe_id: svid.spiffe_id.to_string(),
                x509_svid: svid.chain_der(),
                x509_svid_key: svid.key.to_vec(),
                bundle: bundle.clone(),
                hint: entry.hint.clone(),
            })
        })
        .collect();
    if svids.is_empty() {
        // Matched, but nothing valid minted yet (or the issuer is down and all lapsed).
        return Ok(None);
    }
    Ok(Some(X509svidResponse {
        svids,
        crl: snapshot.crl.clone(),
        federated_bundles: HashMap::new(),
    }))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let result = async move {
            let (selectors, state) = self.entitled_caller(&request).await?;
            Ok(Response::new(self.stream(state, move |snapshot| {
                x509_response(snapshot, &selectors)
            })))
        }
        .await;
        counted(metrics::FETCH_X509_SVID, result)
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let result = async move {
            let (selectors, state) = self.entitled_caller(&request).await?;
            Ok(Response::new(self.stream(state, move |snapshot| {
                if identities(snapshot, &selectors).is_empty() {
                    return Err(denied());
                }
                if snapshot.bundle.is_empty() {
                    return Ok(None);
                }
                Ok(Some(X509BundlesResponse {
                    crl: snapshot.crl.clone(),
                    bundles: HashMap::from([(
                        snapshot.trust_domain.id_string(),
                        snapshot.bundle_der(),
                    )]),
                }))
            })))
        }
        .await;
        counted(metrics::FETCH_X509_BUNDLES, result)
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let result = async move {
            let selectors = self.caller(&request).await?;
            let request = request.into_inner();
            if request.audience.is_empty() || request.audience.iter().any(String::is_empty) {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            let wanted = if request.spiffe_id.is_empty() {
                None
            } else {
                Some(
                    SpiffeId::new(&request.spiffe_id)
                        .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?,
                )
            };
            let state = self.synced().await?;
            let entries: Vec<Arc<Entry>> = identities(&state.borrow(), &selectors)
                .into_iter()
                .filter(|entry| wanted.as_ref().is_none_or(|id| &entry.spiffe_id == id))
                .collect();
            if entries.is_empty() {
                return Err(refused(&state.borrow(), &selectors));
            }
            let mut svids = Vec::with_capacity(entries.len());
            for entry in &entries {
                svids.push(Jwtsvid {
                    spiffe_id: entry.spiffe_id.to_string(),
                    svid: self.jwt_svid(entry, &request.audience).await?,
                    hint: entry.hint.clone(),
                });
            }
            Ok(Response::new(JwtsvidResponse { svids }))
        }
        .await;
        counted(metrics::FETCH_JWT_SVID, result)
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let result = async move {
            let (selectors, state) = self.entitled_caller(&request).await?;
            Ok(Response::new(self.stream(state, move |snapshot| {
                if identities(snapshot, &selectors).is_empty() {
                    return Err(denied());
                }
                if snapshot.jwt_bundle.is_empty() {
                    return Ok(None);
                }
                Ok(Some(JwtBundlesResponse {
                    bundles: HashMap::from([(
                        snapshot.trust_domain.id_string(),
                        snapshot.jwt_bundle.clone(),
                    )]),
                }))
            })))
        }
        .await;
        counted(metrics::FETCH_JWT_BUNDLES, result)
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        let result = async move {
            // Validation hands out nothing secret, so any attested local process may ask (as
            // SPIRE), but it must still be a Workload API call from a process we can see.
            let _selectors = self.caller(&request).await?;
            let request = request.into_inner();
            if request.audience.is_empty() {
                return Err(Status::invalid_argument("audience must be specified"));
            }
            if request.svid.is_empty() {
                return Err(Status::invalid_argument("svid must be specified"));
            }
            let state = self.synced().await?;
            let snapshot = Arc::clone(&state.borrow());
            let (spiffe_id, claims) = snapshot
                .jwt_keys
                .validate(
                    &request.svid,
                    &request.audience,
                    &snapshot.trust_domain,
                    SystemTime::now(),
                )
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
            Ok(Response::new(ValidateJwtsvidResponse {
                spiffe_id: spiffe_id.to_string(),
                claims: Some(claims_struct(claims)),
            }))
        }
        .await;
        counted(metrics::VALIDATE_JWT_SVID, result)
    }
}

/// Binds the Workload API socket: creates its directory, replaces a stale socket file
/// (refusing if another server answers on it, or if the path is not a socket), and opens
/// it to every local user, since who may have what is decided per caller, not by the file.
pub async fn bind(path: &Path) -> Result<UnixListener, Error> {
    let fail = |reason: String| Error::Socket {
        path: path.to_owned(),
        reason,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| fail(format!("creating its directory: {e}")))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if tokio::net::UnixStream::connect(path).await.is_ok() {
                return Err(fail(
                    "another process is serving on it (is an agent already running?)".into(),
                ));
            }
            std::fs::remove_file(path)
                .map_err(|e| fail(format!("removing the stale socket: {e}")))?;
        }
        Ok(_) => {
            return Err(fail(
                "exists and is not a socket; refusing to replace it".into(),
            ))
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| fail(e.to_string()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777))
        .map_err(|e| fail(format!("setting its mode: {e}")))?;
    Ok(listener)
}

/// Serves the Workload API on `listener` until `shutdown`, then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    socket: PathBuf,
    api: WorkloadApi,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let incoming = UnixListenerStream::new(listener).map(|stream| stream.map(PeerStream::accepted));
    let served = tonic::transport::Server::builder()
        .add_service(api.into_service())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    let _ = std::fs::remove_file(&socket);
    served.map_err(|e| Error::Socket {
        path: socket,
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::daemon::cache::Snapshot;
    use crate::daemon::svid::{KeyPair, X509Svid};
    use proto::agent::RegistrationEntry;
    use proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use proto::TrustDomain;
    use tonic::transport::Channel;

    struct Ca {
        key: rcgen::KeyPair,
        cert: rcgen::Certificate,
    }

    fn ca() -> Ca {
        let key = rcgen::KeyPair::generate().expect("ca key");
        let mut params = rcgen::CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).expect("ca");
        Ca { key, cert }
    }

    fn svid(ca: &Ca, id: &str, lifetime: Duration) -> X509Svid {
        let key = KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().expect("uri"))];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + lifetime).into();
        let public = rcgen::KeyPair::from_pem(&key.pkcs8_pem()).expect("rcgen key");
        let issuer = rcgen::Issuer::from_ca_cert_der(ca.cert.der(), &ca.key).expect("issuer");
        let cert = params.signed_by(&public, &issuer).expect("leaf");
        X509Svid {
            spiffe_id: SpiffeId::new(id).expect("id"),
            chain: vec![cert.der().to_vec()],
            key: key.pkcs8_der(),
            not_before: now - Duration::from_secs(60),
            not_after: now + lifetime,
            rotate_at: now + lifetime / 2,
            entry_revision: 1,
        }
    }

    fn entry(id: &str, spiffe_id: &str, selector: &str) -> Arc<Entry> {
        Arc::new(
            Entry::from_wire(RegistrationEntry {
                id: id.into(),
                spiffe_id: spiffe_id.into(),
                selectors: vec![selector.into()],
                revision: 1,
                ..Default::default()
            })
            .expect("entry"),
        )
    }

    fn own_uid() -> u32 {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok())
            .expect("uid")
    }

    async fn client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
        let socket = socket.to_owned();
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(tower::service_fn(move |_: http::Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
            .expect("connect");
        SpiffeWorkloadApiClient::new(channel)
    }

    fn with_header<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request.metadata_mut().insert(
            SECURITY_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
        request
    }

    /// A Workload API on a real socket over a snapshot the test publishes.
    struct Served {
        _dir: tempfile::TempDir,
        socket: PathBuf,
        state: watch::Sender<Arc<Snapshot>>,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        server: tokio::task::JoinHandle<Result<(), Error>>,
    }

    async fn serve_snapshot(snapshot: Snapshot) -> Served {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/workload.sock");
        let (state, state_rx) = watch::channel(Arc::new(snapshot));
        let (_issuer, issuer_rx) = watch::channel(None);
        let api = WorkloadApi::new(Published {
            state: state_rx,
            issuer: issuer_rx,
        });
        let listener = bind(&socket).await.expect("bind");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, socket.clone(), api, async {
            let _ = stopped.await;
        }));
        Served {
            _dir: dir,
            socket,
            state,
            stop: Some(stop),
            server,
        }
    }

    fn snapshot(ca: &Ca, entries: Vec<Arc<Entry>>) -> Snapshot {
        let mut snapshot = Snapshot::empty(TrustDomain::new("plant.example").expect("td"));
        snapshot.synced = true;
        snapshot.bundle = vec![ca.cert.der().to_vec()];
        snapshot.entries = entries;
        snapshot
    }

    #[tokio::test]
    async fn x509_svids_reach_the_matching_caller_and_every_rotation_is_pushed() {
        let ca = ca();
        let id = "spiffe://plant.example/historian";
        let mut state = snapshot(
            &ca,
            vec![entry("e1", id, &format!("unix:uid:{}", own_uid()))],
        );
        let first = Arc::new(svid(&ca, id, Duration::from_secs(3600)));
        state.svids.insert("e1".into(), Arc::clone(&first));
        let mut served = serve_snapshot(state.clone()).await;
        let mut client = client(&served.socket).await;

        let mut stream = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .expect("stream")
            .into_inner();
        let message = stream.message().await.expect("message").expect("first");
        assert_eq!(message.svids.len(), 1);
        let got = &message.svids[0];
        assert_eq!(got.spiffe_id, id);
        assert_eq!(got.x509_svid, first.chain.concat());
        assert_eq!(got.x509_svid_key, first.key.to_vec());
        assert_eq!(got.bundle, ca.cert.der().to_vec());

        // A rotation: the stream carries the new SVID without being asked.
        let second = Arc::new(svid(&ca, id, Duration::from_secs(3600)));
        state.svids.insert("e1".into(), Arc::clone(&second));
        served.state.send_replace(Arc::new(state.clone()));
        let message = stream.message().await.expect("message").expect("rotation");
        assert_eq!(message.svids[0].x509_svid, second.chain.concat());

        // Bundles, keyed by the trust domain's SPIFFE ID.
        let mut bundles = client
            .fetch_x509_bundles(with_header(X509BundlesRequest {}))
            .await
            .expect("bundles")
            .into_inner();
        let message = bundles.message().await.expect("message").expect("first");
        assert_eq!(
            message.bundles.get("spiffe://plant.example"),
            Some(&ca.cert.der().to_vec())
        );

        // Shutdown removes the socket.
        if let Some(stop) = served.stop.take() {
            let _ = stop.send(());
        }
        drop(stream);
        drop(bundles);
        drop(client);
        served.server.await.expect("join").expect("served");
        assert!(!served.socket.exists());
    }

    #[tokio::test]
    async fn an_expired_svid_is_never_served() {
        let ca = ca();
        let id = "spiffe://plant.example/historian";
        let mut state = snapshot(
            &ca,
            vec![entry("e1", id, &format!("unix:uid:{}", own_uid()))],
        );
        let mut expired = svid(&ca, id, Duration::from_secs(3600));
        expired.not_after = SystemTime::now() - Duration::from_secs(1);
        state.svids.insert("e1".into(), Arc::new(expired));
        let served = serve_snapshot(state.clone()).await;
        let mut client = client(&served.socket).await;
        let mut stream = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .expect("stream")
            .into_inner();
        // Nothing valid: nothing is sent until a valid SVID arrives.
        let fresh = Arc::new(svid(&ca, id, Duration::from_secs(3600)));
        state.svids.insert("e1".into(), Arc::clone(&fresh));
        served.state.send_replace(Arc::new(state));
        let message = stream.message().await.expect("message").expect("first");
        assert_eq!(message.svids[0].x509_svid, fresh.chain.concat());
    }

    #[tokio::test]
    async fn a_request_without_the_security_header_is_an_invalid_argument() {
        let ca = ca();
        let state = snapshot(
            &ca,
            vec![entry(
                "e1",
                "spiffe://plant.example/h",
                &format!("unix:uid:{}", own_uid()),
            )],
        );
        let served = serve_snapshot(state).await;
        let mut client = client(&served.socket).await;
        let status = client
            .fetch_x509svid(Request::new(X509svidRequest {}))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        let status = client
            .validate_jwtsvid(Request::new(ValidateJwtsvidRequest {
                audience: "a".into(),
                svid: "x".into(),
            }))
            .await
            .expect_err("refused");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn a_caller_no_entry_matches_is_denied() {
        let ca = ca();
        let other = own_uid().wrapping_add(4242);
        let state = snapshot(
            &ca,
            vec![entry(
                "e1",
                "spiffe://plant.example/h",
                &format!("unix:uid:{other}"),
            )],
        );
        let served = serve_snapshot(state).await;
        let mut client = client(&served.socket).await;
        let status = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .expect_err("denied");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let status = client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["scada".into()],
                spiffe_id: String::new(),
            }))
            .await
            .expect_err("denied");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        let status = client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec![],
                spiffe_id: String::new(),
            }))
            .await
            .expect_err("no audience");
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }

    #[tokio::test]
    async fn an_entry_that_names_no_user_is_not_served_and_the_caller_is_told_why() {
        let ca = ca();
        let exe = std::env::current_exe().expect("exe");
        let state = snapshot(
            &ca,
            vec![entry(
                "path-only",
                "spiffe://plant.example/h",
                &format!("unix:path:{}", exe.display()),
            )],
        );
        let served = serve_snapshot(state).await;
        let mut client = client(&served.socket).await;
        let status = client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .expect_err("denied");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("path-only")
                && status.message().contains("names no unix:uid"),
            "{}",
            status.message()
        );
        let status = client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["scada".into()],
                spiffe_id: String::new(),
            }))
            .await
            .expect_err("denied");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(status.message().contains("names no unix:uid"));
    }

    #[tokio::test]
    async fn a_live_socket_is_not_taken_over_but_a_stale_one_is_replaced() {
        let ca = ca();
        let served = serve_snapshot(snapshot(&ca, vec![])).await;
        let error = bind(&served.socket).await.expect_err("in use");
        assert!(error.to_string().contains("already running"), "{error}");

        let dir = tempfile::tempdir().expect("tempdir");
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        let listener = bind(&stale).await.expect("stale socket replaced");
        let mode = std::fs::metadata(&stale)
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o777);
        drop(listener);

        let file = dir.path().join("file");
        std::fs::write(&file, "not a socket").expect("write");
        assert!(bind(&file).await.is_err());
    }
}
