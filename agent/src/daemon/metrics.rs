//! Prometheus metrics (text exposition format 0.0.4) at `GET /metrics` on `metrics_listen`
//! (plain HTTP; absent: no listener): SVID minting and rotation, the cache's gauges, node
//! attestation outcomes, failed issuer calls, and Workload API requests by method and gRPC
//! code. One process-wide set of atomics: counting takes no lock.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
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
/// gRPC status codes 0..=16.
const CODES: usize = 17;
const OUTCOMES: [&str; 3] = ["ok", "refused", "error"];

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

/// The agent's counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    rotations: AtomicU64,
    minted_x509: AtomicU64,
    minted_jwt: AtomicU64,
    svids: AtomicU64,
    entries: AtomicU64,
    node_expiry: AtomicI64,
    attestations: [AtomicU64; OUTCOMES.len()],
    issuer_errors: AtomicU64,
    requests: [[AtomicU64; CODES]; METHODS.len()],
    refusals: AtomicU64,
}

/// The process's metrics.
pub static METRICS: Metrics = Metrics::new();

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// All zero.
    pub const fn new() -> Self {
        Self {
            rotations: AtomicU64::new(0),
            minted_x509: AtomicU64::new(0),
            minted_jwt: AtomicU64::new(0),
            svids: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            node_expiry: AtomicI64::new(0),
            attestations: [const { AtomicU64::new(0) }; OUTCOMES.len()],
            issuer_errors: AtomicU64::new(0),
            requests: [const { [const { AtomicU64::new(0) }; CODES] }; METHODS.len()],
            refusals: AtomicU64::new(0),
        }
    }

    /// One X509-SVID minted; `replaced` when it replaces one the cache held (a rotation).
    pub fn x509_minted(&self, replaced: bool) {
        self.minted_x509.fetch_add(1, Ordering::Relaxed);
        if replaced {
            self.rotations.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One JWT-SVID minted by the issuer (cache hits do not count).
    pub fn jwt_minted(&self) {
        self.minted_jwt.fetch_add(1, Ordering::Relaxed);
    }

    /// The cache's gauges: X509-SVIDs held, entries, the node SVID's notAfter (unix s; 0 none).
    pub fn cache(&self, svids: usize, entries: usize, node_expiry: Option<std::time::SystemTime>) {
        self.svids.store(svids as u64, Ordering::Relaxed);
        self.entries.store(entries as u64, Ordering::Relaxed);
        let expiry = node_expiry
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.node_expiry.store(expiry, Ordering::Relaxed);
    }

    /// One node attestation attempt.
    pub fn attestation(&self, outcome: Outcome) {
        self.attestations[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// One failed call to the issuer.
    pub fn issuer_error(&self) {
        self.issuer_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// One Workload API request answered with `code` (`method` indexes [`METHODS`]).
    pub fn request(&self, method: usize, code: tonic::Code) {
        let code = (code as usize).min(CODES - 1);
        if let Some(row) = self.requests.get(method) {
            row[code].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One caller whose workload attestation was refused.
    pub fn workload_refusal(&self) {
        self.refusals.fetch_add(1, Ordering::Relaxed);
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        out.push_str("# HELP plant_agent_svid_rotations_total X509-SVIDs minted to replace one the agent held.\n# TYPE plant_agent_svid_rotations_total counter\n");
        let _ = writeln!(
            out,
            "plant_agent_svid_rotations_total {}",
            get(&self.rotations)
        );
        out.push_str("# HELP plant_agent_svids_minted_total SVIDs minted by the issuer for this agent, by kind.\n# TYPE plant_agent_svids_minted_total counter\n");
        let _ = writeln!(
            out,
            "plant_agent_svids_minted_total{{kind=\"x509\"}} {}\nplant_agent_svids_minted_total{{kind=\"jwt\"}} {}",
            get(&self.minted_x509),
            get(&self.minted_jwt)
        );
        let gauges = [
            (
                "plant_agent_svids",
                "X509-SVIDs the agent holds.",
                get(&self.svids).to_string(),
            ),
            (
                "plant_agent_entries",
                "Registration entries synced to this node.",
                get(&self.entries).to_string(),
            ),
            (
                "plant_agent_node_svid_expiry_timestamp_seconds",
                "The node SVID's notAfter as a unix time (0: no node SVID).",
                self.node_expiry.load(Ordering::Relaxed).to_string(),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = write!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}\n"
            );
        }
        out.push_str("# HELP plant_agent_node_attestations_total Node attestation attempts by outcome.\n# TYPE plant_agent_node_attestations_total counter\n");
        for (outcome, n) in OUTCOMES.iter().zip(&self.attestations) {
            let _ = writeln!(
                out,
                "plant_agent_node_attestations_total{{outcome=\"{outcome}\"}} {}",
                get(n)
            );
        }
        out.push_str("# HELP plant_agent_issuer_errors_total Failed calls to the issuer.\n# TYPE plant_agent_issuer_errors_total counter\n");
        let _ = writeln!(
            out,
            "plant_agent_issuer_errors_total {}",
            get(&self.issuer_errors)
        );
        out.push_str("# HELP plant_agent_workload_api_requests_total Workload API requests by method and gRPC code.\n# TYPE plant_agent_workload_api_requests_total counter\n");
        for (method, row) in METHODS.iter().zip(&self.requests) {
            for (code, n) in row.iter().enumerate() {
                let n = get(n);
                if n > 0 {
                    let code = match tonic::Code::from(code as i32) {
                        tonic::Code::Ok => "OK".to_owned(),
                        other => format!("{other:?}"),
                    };
                    let _ = writeln!(
                        out,
                        "plant_agent_workload_api_requests_total{{method=\"{method}\",code=\"{code}\"}} {n}"
                    );
                }
            }
        }
        out.push_str("# HELP plant_agent_workload_attestation_refusals_total Workload API callers whose attestation was refused.\n# TYPE plant_agent_workload_attestation_refusals_total counter\n");
        let _ = writeln!(
            out,
            "plant_agent_workload_attestation_refusals_total {}",
            get(&self.refusals)
        );
        crate::daemon::proxy::metrics::render(&mut out);
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

/// One request per connection (`Connection: close`).
/// `place` is the connection's place among those waiting for their request; it is given up
/// once the request is in (answering is quick), and the connection closed if it is shed.
async fn answer(mut stream: TcpStream, place: Pending) -> std::io::Result<()> {
    let mut request = Vec::with_capacity(1024);
    let read = async {
        let mut buf = [0u8; 1024];
        while !request.windows(4).any(|w| w == b"\r\n\r\n") {
            if request.len() > 16 * 1024 {
                return Ok(false);
            }
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            request.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(true)
    };
    let complete = tokio::select! {
        read = tokio::time::timeout(REQUEST_TIMEOUT, read) => matches!(read, Ok(Ok(true))),
        () = place.shed() => false,
    };
    drop(place);
    if !complete {
        return Ok(());
    }
    let line = request.split(|b| *b == b'\n').next().unwrap_or_default();
    let mut parts = std::str::from_utf8(line).unwrap_or("").split_whitespace();
    let (method, target) = (parts.next(), parts.next());
    let path = target.map(|t| t.split('?').next().unwrap_or(t));
    let (status, content_type, body) = match (method, path) {
        (Some("GET"), Some("/metrics")) => (
            "200 OK",
            "text/plain; version=0.0.4; charset=utf-8",
            METRICS.render(),
        ),
        (Some("GET"), _) => ("404 Not Found", "text/plain", "not found\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET /metrics\n".into(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

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
