//! Prometheus metrics (text exposition format 0.0.4, encoded by `prometheus-client`) at
//! `GET /metrics` on `metrics_listen` (plain HTTP through hyper; absent: no listener): SVID
//! minting and rotation, the cache's gauges, node attestation outcomes, failed issuer calls,
//! Workload API requests by method and gRPC code, and each PLC proxy's counters
//! ([`crate::daemon::proxy::metrics`]). One process-wide registry of atomics: counting takes no lock.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{LazyLock, Mutex};
use std::time::Duration;

use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::{TcpListener, TcpStream};

use crate::daemon::connections::{Pending, PendingConnections};
use crate::Error;

/// The file in the state directory that holds `http://<bound address>/metrics`.
pub const URL_FILE: &str = "metrics.url";

/// Index of FetchX509SVID in [`METHODS`].
pub const FETCH_X509_SVID: usize = 0;
/// Index of FetchX509Bundles in [`METHODS`].
pub const FETCH_X509_BUNDLES: usize = 1;
/// Index of FetchJWTSVID in [`METHODS`].
pub const FETCH_JWT_SVID: usize = 2;
/// Index of FetchJWTBundles in [`METHODS`].
pub const FETCH_JWT_BUNDLES: usize = 3;
/// Index of ValidateJWTSVID in [`METHODS`].
pub const VALIDATE_JWT_SVID: usize = 4;

/// The Workload API methods, in the order of the indices above.
pub const METHODS: [&str; 5] = [
    "FetchX509SVID",
    "FetchX509Bundles",
    "FetchJWTSVID",
    "FetchJWTBundles",
    "ValidateJWTSVID",
];

/// A node attestation's outcome.
#[derive(Debug, Clone, Copy)]
pub enum Outcome {
    /// A node SVID was issued.
    Ok,
    /// The issuer refused the evidence.
    Refused,
    /// The issuer could not be reached or the attempt failed on our side.
    Error,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Ok, Outcome::Refused, Outcome::Error];

    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    code: String,
}

/// The agent's counters and gauges, and the registry that encodes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rotations: Counter,
    minted: Family<KindLabel, Counter>,
    svids: Gauge,
    entries: Gauge,
    node_expiry: Gauge,
    from_cache: Gauge,
    attestations: Family<OutcomeLabel, Counter>,
    issuer_errors: Counter,
    requests: Family<RequestLabels, Counter>,
    refusals: Counter,
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero, the proxies' families included.
    pub fn new() -> Self {
        let mut metrics = Self {
            registry: Registry::default(),
            rotations: Counter::default(),
            minted: Family::default(),
            svids: Gauge::default(),
            entries: Gauge::default(),
            node_expiry: Gauge::default(),
            from_cache: Gauge::default(),
            attestations: Family::default(),
            issuer_errors: Counter::default(),
            requests: Family::default(),
            refusals: Counter::default(),
        };
        // Every series a dashboard plots exists from the start, at zero.
        for kind in ["x509", "jwt"] {
            let _ = metrics.minted.get_or_create_owned(&KindLabel { kind });
        }
        for outcome in Outcome::ALL {
            let _ = metrics.attestations.get_or_create_owned(&OutcomeLabel {
                outcome: outcome.label(),
            });
        }
        // Names without `_total`: prometheus-client adds it to counters, and a period to help.
        let registry = &mut metrics.registry;
        registry.register(
            "plant_agent_svid_rotations",
            "X509-SVIDs minted to replace one the agent held",
            metrics.rotations.clone(),
        );
        registry.register(
            "plant_agent_svids_minted",
            "SVIDs minted by the issuer for this agent, by kind",
            metrics.minted.clone(),
        );
        registry.register(
            "plant_agent_svids",
            "X509-SVIDs the agent holds",
            metrics.svids.clone(),
        );
        registry.register(
            "plant_agent_entries",
            "Registration entries synced to this node",
            metrics.entries.clone(),
        );
        registry.register(
            "plant_agent_node_svid_expiry_timestamp_seconds",
            "The node SVID's notAfter as a unix time (0: no node SVID)",
            metrics.node_expiry.clone(),
        );
        registry.register(
            "plant_agent_serving_from_cache",
            "1 while the agent serves what it saved before a restart, not having reached the issuer since",
            metrics.from_cache.clone(),
        );
        registry.register(
            "plant_agent_node_attestations",
            "Node attestation attempts by outcome",
            metrics.attestations.clone(),
        );
        registry.register(
            "plant_agent_issuer_errors",
            "Failed calls to the issuer",
            metrics.issuer_errors.clone(),
        );
        registry.register(
            "plant_agent_workload_api_requests",
            "Workload API requests by method and gRPC code",
            metrics.requests.clone(),
        );
        registry.register(
            "plant_agent_workload_attestation_refusals",
            "Workload API callers whose attestation was refused",
            metrics.refusals.clone(),
        );
        crate::daemon::proxy::metrics::register(registry);
        metrics
    }

    /// One X509-SVID minted; `replaced` when it replaces one the cache held (a rotation).
    pub fn x509_minted(&self, replaced: bool) {
        self.minted.get_or_create(&KindLabel { kind: "x509" }).inc();
        if replaced {
            self.rotations.inc();
        }
    }

    /// One JWT-SVID minted by the issuer (cache hits do not count).
    pub fn jwt_minted(&self) {
        self.minted.get_or_create(&KindLabel { kind: "jwt" }).inc();
    }

    /// The cache's gauges: X509-SVIDs held, entries, the node SVID's notAfter (unix s; 0 none).
    pub fn cache(&self, svids: usize, entries: usize, node_expiry: Option<std::time::SystemTime>) {
        self.svids.set(i64::try_from(svids).unwrap_or(i64::MAX));
        self.entries.set(i64::try_from(entries).unwrap_or(i64::MAX));
        let expiry = node_expiry
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.node_expiry.set(expiry);
    }

    /// Whether what is served came from the saved cache (the issuer not reached since start).
    pub fn serving_from_cache(&self, yes: bool) {
        self.from_cache.set(i64::from(yes));
    }

    /// One node attestation attempt.
    pub fn attestation(&self, outcome: Outcome) {
        self.attestations
            .get_or_create(&OutcomeLabel {
                outcome: outcome.label(),
            })
            .inc();
    }

    /// One failed call to the issuer.
    pub fn issuer_error(&self) {
        self.issuer_errors.inc();
    }

    /// One Workload API request answered with `code` (`method` indexes [`METHODS`]).
    pub fn request(&self, method: usize, code: tonic::Code) {
        let Some(method) = METHODS.get(method) else {
            return;
        };
        let code = match code {
            tonic::Code::Ok => "OK".to_owned(),
            other => format!("{other:?}"),
        };
        self.requests
            .get_or_create(&RequestLabels { method, code })
            .inc();
    }

    /// One caller whose workload attestation was refused.
    pub fn workload_refusal(&self) {
        self.refusals.inc();
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// Binds `address` and writes `http://<bound>/metrics` to `<state_dir>/metrics.url`.
pub async fn bind(address: SocketAddr, state_dir: &Path) -> Result<TcpListener, Error> {
    let fail = |reason: String| Error::Socket {
        path: address.to_string().into(),
        reason,
    };
    let listener = TcpListener::bind(address)
        .await
        .map_err(|e| fail(format!("binding metrics_listen: {e}")))?;
    let bound = listener.local_addr().map_err(|e| fail(e.to_string()))?;
    let file = state_dir.join(URL_FILE);
    std::fs::write(&file, format!("http://{bound}/metrics\n")).map_err(Error::io(&file))?;
    tracing::info!(address = %bound, "metrics at /metrics");
    Ok(listener)
}

/// Connections the metrics listener holds at most: a scraper needs one at a time.
pub const MAX_CONNECTIONS: usize = 32;
/// How long a client may take to send its request; it is closed after.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may live in all (request, rendering, the answer's writing).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);

/// Answers `GET /metrics` (404 elsewhere) until `shutdown`. At most [`MAX_CONNECTIONS`]
/// connections are held: at the limit the one that has waited longest for its request is
/// shed ([`crate::daemon::connections`]), so idle connections, however many, neither exhaust the
/// agent's descriptors nor keep a scraper out.
pub async fn serve(listener: TcpListener, shutdown: impl std::future::Future<Output = ()>) {
    tokio::pin!(shutdown);
    let waiting = PendingConnections::new(MAX_CONNECTIONS, MAX_CONNECTIONS);
    loop {
        tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let (place, _) = waiting.admit(from.ip());
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(CONNECTION_TIMEOUT, answer(stream, place)).await;
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// One request per connection (hyper, without keep-alive). `place` is the connection's place
/// among those waiting for their request; it is given up once the request's head is in
/// (answering is quick), and the connection closed if it is shed before.
async fn answer(stream: TcpStream, place: Pending) {
    let (arrived, request_in) = tokio::sync::oneshot::channel::<()>();
    let arrived = Mutex::new(Some(arrived));
    let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
        if let Some(arrived) = arrived.lock().ok().and_then(|mut a| a.take()) {
            let _ = arrived.send(());
        }
        std::future::ready(Ok::<_, Infallible>(respond(&request)))
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(REQUEST_TIMEOUT)
        .keep_alive(false)
        .title_case_headers(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        _ = &mut connection => return,
        () = place.shed() => return,
        _ = request_in => {}
    }
    drop(place);
    let _ = connection.await;
}

/// `GET /metrics`: the exposition; any other path 404, any other method 405.
fn respond<B>(request: &Request<B>) -> Response<String> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            METRICS.render(),
        ),
        (&Method::GET, _) => (StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "only GET /metrics\n".into(),
        ),
    };
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_exposition_names_every_metric_and_counts() {
        let metrics = Metrics::new();
        metrics.x509_minted(false);
        metrics.x509_minted(true);
        metrics.jwt_minted();
        metrics.request(0, tonic::Code::PermissionDenied);
        metrics.attestation(Outcome::Refused);
        metrics.cache(
            1,
            2,
            Some(std::time::UNIX_EPOCH + Duration::from_secs(1_800_000_000)),
        );
        let text = metrics.render();
        for line in [
            "plant_agent_svid_rotations_total 1",
            "plant_agent_svids_minted_total{kind=\"x509\"} 2",
            "plant_agent_svids_minted_total{kind=\"jwt\"} 1",
            "plant_agent_svids 1",
            "plant_agent_entries 2",
            "plant_agent_node_svid_expiry_timestamp_seconds 1800000000",
            "plant_agent_node_attestations_total{outcome=\"refused\"} 1",
            "plant_agent_issuer_errors_total 0",
            "plant_agent_workload_api_requests_total{method=\"FetchX509SVID\",code=\"PermissionDenied\"} 1",
            "plant_agent_workload_attestation_refusals_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
    }

    async fn get(address: &str, path: &str) -> String {
        let mut stream = TcpStream::connect(address).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    }

    #[tokio::test]
    async fn get_metrics_is_the_exposition_and_other_paths_are_not_found() {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = bind("127.0.0.1:0".parse().expect("address"), dir.path())
            .await
            .expect("bind");
        let url = std::fs::read_to_string(dir.path().join(URL_FILE)).expect("metrics.url");
        let address = url
            .trim()
            .strip_prefix("http://")
            .and_then(|u| u.strip_suffix("/metrics"))
            .expect("url")
            .to_owned();
        let server = tokio::spawn(serve(listener, std::future::pending()));
        let answer = get(&address, "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(
            answer.contains("Content-Type: text/plain; version=0.0.4"),
            "{answer}"
        );
        assert!(answer.contains("# TYPE plant_agent_svid_rotations_total counter"));
        let answer = get(&address, "/").await;
        assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
        // Connections that never send a request: the oldest are shed, a scrape is answered.
        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS * 3 {
            idle.push(TcpStream::connect(&address).await.expect("connect"));
        }
        let answer = get(&address, "/metrics").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        // The oldest two thirds were shed for the younger ones.
        for (n, stream) in idle.iter_mut().take(MAX_CONNECTIONS * 2).enumerate() {
            let mut byte = [0u8; 1];
            let read = tokio::time::timeout(Duration::from_secs(2), stream.read(&mut byte)).await;
            assert!(matches!(read, Ok(Ok(0))), "idle connection {n}: {read:?}");
        }
        server.abort();
    }
}
