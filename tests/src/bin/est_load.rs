//! `est_load`: a load generator for EST `simpleenroll` (RFC 7030 §4.2.1) against a running
//! issuer, for the DESIGN §8 speed budgets. `scripts/bench est` runs it; it prints a summary
//! for people and one `RESULT key=value …` line for scripts, and never judges the figures.
//!
//! Every request spends one one-time token from `--tokens`, so the run is bounded by the
//! token file as well as by `--requests` and `--seconds`. Each client signs its CSR once,
//! before the clock starts: the CA takes only the public key, so reusing it costs the server
//! exactly what a fresh device costs.
//!
//! Two connection modes:
//! - `new-connection`: TCP + a full TLS handshake per request, session resumption disabled,
//!   like a fleet of devices enrolling once each;
//! - `keep-alive`: one connection per client, reused (HTTP/1.1 persistent connections).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls::client::Resumption;
use rustls::crypto::aws_lc_rs::kx_group;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// The run stops starting requests after this long whatever the flags say.
const LONGEST_RUN: Duration = Duration::from_secs(600);

/// A client that fails to reach the server this many times in a row stops: the server is
/// gone, and spinning would only hide that behind a large failure count.
const CONSECUTIVE_TRANSPORT_FAILURES: u32 = 10;

#[derive(Debug, Parser)]
#[command(
    name = "est_load",
    about = "Load generator for EST simpleenroll: one fresh one-time token per request"
)]
struct Args {
    /// EST server base URL, e.g. https://127.0.0.1:43123 (the issuer writes it to
    /// state/est.url).
    #[arg(long)]
    url: String,
    /// PEM file of the root certificate(s) to trust (the issuer's ca/root.crt).
    #[arg(long)]
    ca: PathBuf,
    /// One-time tokens, one per line (`issuer token create --format plain`).
    #[arg(long)]
    tokens: PathBuf,
    /// Concurrent clients.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// A new TCP + TLS connection per request, or one reused connection per client.
    #[arg(long, value_enum, default_value_t = Mode::KeepAlive)]
    mode: Mode,
    /// Total requests to send (at most the number of tokens; default: all of them).
    #[arg(long)]
    requests: Option<usize>,
    /// Stop starting requests after this many seconds (at most 600).
    #[arg(long)]
    seconds: Option<f64>,
    /// EST label (profile) to enroll under; none: /.well-known/est/simpleenroll.
    #[arg(long)]
    label: Option<String>,
    /// TLS key exchange groups the client offers.
    #[arg(long, value_enum, default_value_t = KeyExchange::Default)]
    key_exchange: KeyExchange,
    /// Tokio worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// Give up on one request (connect, handshake and answer) after this many seconds.
    #[arg(long, default_value_t = 10.0)]
    timeout: f64,
    /// Allow a server that is not on a loopback address.
    #[arg(long)]
    allow_remote: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// TCP connect + full TLS handshake (no resumption) for every request.
    NewConnection,
    /// One persistent connection per client.
    KeepAlive,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Self::NewConnection => "new-connection",
            Self::KeepAlive => "keep-alive",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KeyExchange {
    /// rustls' default list (the server picks among the client's key shares).
    Default,
    /// X25519 only.
    X25519,
    /// secp256r1 (P-256) only.
    P256,
    /// X25519MLKEM768 (hybrid post-quantum) only.
    X25519mlkem768,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.clients > 0, "--clients must be at least 1");
    ensure!(
        args.timeout.is_finite() && args.timeout > 0.0,
        "--timeout must be a positive number of seconds"
    );
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        ensure!(threads > 0, "--threads must be at least 1");
        runtime.worker_threads(threads);
    }
    let runtime = runtime
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let target = Target::new(&args).await?;
    let tokens = read_tokens(&args.tokens)?;
    let limit = match args.requests {
        Some(n) if n > tokens.len() => bail!(
            "--requests {n} needs {n} tokens; {} has only {}",
            args.tokens.display(),
            tokens.len()
        ),
        Some(n) => n,
        None => tokens.len(),
    };
    let run_for = match args.seconds {
        Some(s) if !(s.is_finite() && s > 0.0) => bail!("--seconds must be positive"),
        Some(s) => Duration::from_secs_f64(s).min(LONGEST_RUN),
        None => LONGEST_RUN,
    };

    // Everything that is not the server's work happens before the clock starts. One CSR
    // (and subject) per request: the issuer lets one valid certificate hold a subject.
    let csrs = (0..limit)
        .map(|i| csr(&format!("bench-{}", i + 1)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut first_connections = Vec::with_capacity(args.clients);
    for _ in 0..args.clients {
        first_connections.push(match args.mode {
            Mode::KeepAlive => Some(
                target
                    .connect()
                    .await
                    .map_err(|f| anyhow::anyhow!("cannot reach {}: {}", args.url, f.detail()))?,
            ),
            Mode::NewConnection => None,
        });
    }

    let shared = Arc::new(Shared {
        target,
        tokens,
        csrs,
        limit,
        next: AtomicUsize::new(0),
        mode: args.mode,
        request_timeout: Duration::from_secs_f64(args.timeout),
        deadline: Instant::now() + run_for,
    });
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for sender in first_connections {
        tasks.spawn(client(shared.clone(), sender));
    }
    let mut total = Report::default();
    while let Some(report) = tasks.join_next().await {
        total.merge(report.context("a client task panicked")?);
    }
    let elapsed = started.elapsed();
    print_summary(&args, &shared, &mut total, elapsed);
    Ok(())
}

/// Where requests go, and how to reach it.
#[derive(Debug)]
struct Target {
    address: SocketAddr,
    server_name: ServerName<'static>,
    authority: String,
    path: String,
    tls: Arc<ClientConfig>,
    /// The TLS parameters of the first handshake, for the summary.
    negotiated: OnceLock<String>,
}

impl Target {
    async fn new(args: &Args) -> anyhow::Result<Self> {
        let uri: http::Uri = args
            .url
            .parse()
            .with_context(|| format!("--url {:?} is not a URL", args.url))?;
        ensure!(
            uri.scheme_str() == Some("https"),
            "--url must be an https:// URL (EST runs over TLS)"
        );
        let authority = uri
            .authority()
            .context("--url has no host")?
            .as_str()
            .to_owned();
        let host = uri.host().context("--url has no host")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        let address = match host.parse::<IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, port),
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .with_context(|| format!("resolving {host}"))?
                .next()
                .with_context(|| format!("{host} has no address"))?,
        };
        if !address.ip().is_loopback() && !args.allow_remote {
            bail!(
                "{host} is {}, not a loopback address; a load test belongs on a machine you own \
                 (pass --allow-remote if it is one)",
                address.ip()
            );
        }
        let server_name = ServerName::try_from(host.to_owned())
            .with_context(|| format!("{host:?} is not a valid TLS server name"))?;
        let path = match &args.label {
            Some(label) => format!("/.well-known/est/{label}/simpleenroll"),
            None => "/.well-known/est/simpleenroll".to_owned(),
        };
        Ok(Self {
            address,
            server_name,
            authority,
            path,
            tls: tls_config(&args.ca, args.key_exchange)?,
            negotiated: OnceLock::new(),
        })
    }

    /// TCP connect, full TLS handshake, HTTP/1.1 handshake.
    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, Failure> {
        let tcp = TcpStream::connect(self.address)
            .await
            .map_err(|e| Failure::Connect(e.to_string()))?;
        tcp.set_nodelay(true)
            .map_err(|e| Failure::Connect(e.to_string()))?;
        let tls = TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| Failure::Tls(e.to_string()))?;
        if self.negotiated.get().is_none() {
            let session = tls.get_ref().1;
            let describe = |part: Option<String>| part.unwrap_or_else(|| "?".into());
            let _ = self.negotiated.set(format!(
                "{} {} {}",
                describe(session.protocol_version().map(|v| format!("{v:?}"))),
                describe(
                    session
                        .negotiated_cipher_suite()
                        .map(|s| format!("{:?}", s.suite()))
                ),
                describe(
                    session
                        .negotiated_key_exchange_group()
                        .map(|g| format!("{:?}", g.name()))
                ),
            ));
        }
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| Failure::Http(e.to_string()))?;
        // Ends (and closes the socket) once the sender is dropped.
        tokio::spawn(connection);
        Ok(sender)
    }
}

/// rustls with the aws-lc-rs provider, trusting only `ca`, with session resumption disabled
/// so that every new connection is a full handshake.
fn tls_config(ca: &Path, key_exchange: KeyExchange) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca)
        .with_context(|| format!("reading --ca {}", ca.display()))?
    {
        let certificate =
            certificate.with_context(|| format!("a certificate in {}", ca.display()))?;
        roots
            .add(certificate)
            .with_context(|| format!("a certificate in {}", ca.display()))?;
    }
    ensure!(
        !roots.is_empty(),
        "{} holds no PEM certificate",
        ca.display()
    );
    let mut provider = rustls::crypto::aws_lc_rs::default_provider();
    match key_exchange {
        KeyExchange::Default => {}
        KeyExchange::X25519 => provider.kx_groups = vec![kx_group::X25519],
        KeyExchange::P256 => provider.kx_groups = vec![kx_group::SECP256R1],
        KeyExchange::X25519mlkem768 => provider.kx_groups = vec![kx_group::X25519MLKEM768],
    }
    let mut config = ClientConfig::builder_with_provider(Arc::new(provider))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = Resumption::disabled();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_tokens(path: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading --tokens {}", path.display()))?;
    let tokens: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    ensure!(
        !tokens.is_empty(),
        "{} holds no tokens; create them with `issuer token create --count N --format plain`",
        path.display()
    );
    Ok(tokens)
}

/// The request body: base64 of a DER PKCS#10 CSR for a fresh P-256 key, CN=`common_name`.
fn csr(common_name: &str) -> anyhow::Result<Bytes> {
    use base64::Engine;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .context("generating a P-256 key")?;
    // Built field by field: CertificateParams::default() carries a placeholder CN.
    let mut params = rcgen::CertificateParams::default();
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, common_name);
    params.distinguished_name = subject;
    let request = params.serialize_request(&key).context("signing the CSR")?;
    Ok(Bytes::from(
        base64::engine::general_purpose::STANDARD.encode(request.der()),
    ))
}

/// What all clients share: the target, the token pool and the stopping rules.
#[derive(Debug)]
struct Shared {
    target: Target,
    tokens: Vec<String>,
    /// One per token: request `i` spends token `i` on CSR `i`.
    csrs: Vec<Bytes>,
    limit: usize,
    next: AtomicUsize,
    mode: Mode,
    request_timeout: Duration,
    deadline: Instant,
}

impl Shared {
    /// The next unused token and its CSR, or `None` when the run is over.
    fn take_token(&self) -> Option<(&str, &Bytes)> {
        if Instant::now() >= self.deadline {
            return None;
        }
        let index = self.next.fetch_add(1, Ordering::Relaxed);
        (index < self.limit).then(|| (self.tokens[index].as_str(), &self.csrs[index]))
    }
}

/// Why one request failed.
#[derive(Debug)]
enum Failure {
    Connect(String),
    Tls(String),
    Http(String),
    Timeout,
    /// A complete answer other than 200.
    Status(u16, String),
    /// 200 with a body that is not base64 of DER.
    Body(String),
}

impl Failure {
    /// The bucket it is counted in.
    fn kind(&self) -> String {
        match self {
            Self::Connect(_) => "connect".into(),
            Self::Tls(_) => "tls".into(),
            Self::Http(_) => "http".into(),
            Self::Timeout => "timeout".into(),
            Self::Status(code, _) => format!("status {code}"),
            Self::Body(_) => "bad body".into(),
        }
    }

    fn detail(&self) -> String {
        match self {
            Self::Connect(m) | Self::Tls(m) | Self::Http(m) | Self::Body(m) => m.clone(),
            Self::Status(_, body) => body.clone(),
            Self::Timeout => "no answer in time".into(),
        }
    }

    /// The connection is unusable afterwards.
    fn is_transport(&self) -> bool {
        matches!(
            self,
            Self::Connect(_) | Self::Tls(_) | Self::Http(_) | Self::Timeout
        )
    }
}

/// One client's (or, merged, the run's) counts and latencies.
#[derive(Debug, Default)]
struct Report {
    ok: u64,
    /// Latency of each successful request, microseconds.
    latencies_us: Vec<u32>,
    /// Failure kind → (count, first detail seen).
    failures: BTreeMap<String, (u64, String)>,
    /// Clients that stopped early after repeated transport failures.
    gave_up: usize,
}

impl Report {
    fn failed(&self) -> u64 {
        self.failures.values().map(|(n, _)| n).sum()
    }

    fn merge(&mut self, other: Report) {
        self.ok += other.ok;
        self.latencies_us.extend(other.latencies_us);
        for (kind, (count, detail)) in other.failures {
            self.failures.entry(kind).or_insert((0, detail)).0 += count;
        }
        self.gave_up += other.gave_up;
    }
}

async fn client(shared: Arc<Shared>, mut connection: Option<SendRequest<Full<Bytes>>>) -> Report {
    let mut report = Report::default();
    let mut transport_failures_in_a_row = 0;
    while let Some((token, csr)) = shared.take_token() {
        let started = Instant::now();
        let outcome = tokio::time::timeout(
            shared.request_timeout,
            enroll(&shared, &mut connection, csr, token),
        )
        .await
        .unwrap_or(Err(Failure::Timeout));
        if shared.mode == Mode::NewConnection {
            // Dropping the sender closes the connection.
            connection = None;
        }
        match outcome {
            Ok(()) => {
                let micros = started.elapsed().as_micros();
                report
                    .latencies_us
                    .push(u32::try_from(micros).unwrap_or(u32::MAX));
                report.ok += 1;
                transport_failures_in_a_row = 0;
            }
            Err(failure) => {
                if failure.is_transport() {
                    connection = None;
                    transport_failures_in_a_row += 1;
                }
                report
                    .failures
                    .entry(failure.kind())
                    .or_insert((0, failure.detail()))
                    .0 += 1;
                if transport_failures_in_a_row >= CONSECUTIVE_TRANSPORT_FAILURES {
                    report.gave_up += 1;
                    break;
                }
            }
        }
    }
    report
}

/// One simpleenroll on `connection` (opened first if there is none or it was closed).
async fn enroll(
    shared: &Shared,
    connection: &mut Option<SendRequest<Full<Bytes>>>,
    csr: &Bytes,
    token: &str,
) -> Result<(), Failure> {
    let sender = match connection {
        Some(sender) if !sender.is_closed() => sender,
        _ => connection.insert(shared.target.connect().await?),
    };
    sender
        .ready()
        .await
        .map_err(|e| Failure::Http(e.to_string()))?;
    let request = http::Request::post(shared.target.path.as_str())
        .header(http::header::HOST, shared.target.authority.as_str())
        .header(http::header::CONTENT_TYPE, "application/pkcs10")
        .header("Content-Transfer-Encoding", "base64")
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Full::new(csr.clone()))
        .map_err(|e| Failure::Http(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| Failure::Http(e.to_string()))?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| Failure::Http(e.to_string()))?
        .to_bytes();
    if status != http::StatusCode::OK {
        let text = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        return Err(Failure::Status(status.as_u16(), text));
    }
    // A certs-only ContentInfo is a DER SEQUENCE: a sanity check, not a verification.
    let der = est::body::decode(&body).map_err(|e| Failure::Body(e.to_string()))?;
    if der.first() != Some(&0x30) {
        return Err(Failure::Body(
            "the answer is base64 but not of a DER SEQUENCE".into(),
        ));
    }
    Ok(())
}

/// Nearest-rank percentile of sorted `values`, in milliseconds.
fn percentile_ms(sorted_us: &[u32], percent: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (percent / 100.0 * sorted_us.len() as f64).ceil() as usize;
    f64::from(sorted_us[rank.clamp(1, sorted_us.len()) - 1]) / 1000.0
}

fn print_summary(args: &Args, shared: &Shared, report: &mut Report, elapsed: Duration) {
    report.latencies_us.sort_unstable();
    let latencies = &report.latencies_us;
    let seconds = elapsed.as_secs_f64();
    let failed = report.failed();
    let requests = report.ok + failed;
    let rate = if seconds > 0.0 {
        report.ok as f64 / seconds
    } else {
        0.0
    };
    let (p50, p90, p99, max) = (
        percentile_ms(latencies, 50.0),
        percentile_ms(latencies, 90.0),
        percentile_ms(latencies, 99.0),
        percentile_ms(latencies, 100.0),
    );
    let negotiated = shared
        .target
        .negotiated
        .get()
        .map_or("no TLS handshake completed", String::as_str);

    println!(
        "est_load: {} simpleenroll against {}{} ({} clients, {})",
        args.mode.name(),
        args.url,
        shared.target.path,
        args.clients,
        negotiated
    );
    println!(
        "  {requests} requests in {seconds:.2} s: {} ok, {failed} failed",
        report.ok
    );
    println!("  {rate:.0} certificates/s");
    println!(
        "  latency of successful requests: p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
    );
    for (kind, (count, detail)) in &report.failures {
        println!("  failed ({kind}): {count}, e.g. {}", detail.trim());
    }
    if report.gave_up > 0 {
        println!(
            "  {} client(s) stopped after {CONSECUTIVE_TRANSPORT_FAILURES} transport failures in a row",
            report.gave_up
        );
    }
    if requests < shared.limit as u64 && report.gave_up == 0 {
        println!(
            "  (stopped by the time limit before using all {} tokens)",
            shared.limit
        );
    }
    let key_exchange = shared
        .target
        .negotiated
        .get()
        .and_then(|n| n.rsplit(' ').next())
        .unwrap_or("none");
    println!(
        "RESULT mode={} clients={} requests={requests} ok={} failed={failed} seconds={seconds:.3} \
         certs_per_sec={rate:.0} p50_ms={p50:.2} p90_ms={p90:.2} p99_ms={p99:.2} max_ms={max:.2} \
         kx={key_exchange}",
        args.mode.name(),
        args.clients,
        report.ok,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_the_nearest_rank() {
        let sorted: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&sorted, 50.0), 50.0);
        assert_eq!(percentile_ms(&sorted, 99.0), 99.0);
        assert_eq!(percentile_ms(&sorted, 100.0), 100.0);
        assert_eq!(percentile_ms(&[7000], 99.0), 7.0);
        assert_eq!(percentile_ms(&[], 99.0), 0.0);
    }

    #[test]
    fn csr_is_base64_of_a_der_request_with_the_common_name() {
        use base64::Engine;
        let body = csr("bench-1").expect("csr");
        let der = base64::engine::general_purpose::STANDARD
            .decode(&body)
            .expect("base64");
        let parsed = est::csr::VerifiedCsr::from_der(&der).expect("a CSR with a valid signature");
        assert_eq!(parsed.common_name(), Some("bench-1"));
    }
}
