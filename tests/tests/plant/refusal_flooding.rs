//! Attacks of issue 16 against a real `issuer serve` and real agents: flooding the audit
//! log and the disk with refused requests that carry no credential, reading the whole audit
//! log in one request, and posing as the issuer with another plant certificate that carries
//! the issuer's name. Timings are never asserted; bounds only guard against hangs.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use plant_tests::{curl, enroll_with_curl, metric, run, run_ok, Issuer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long a test waits for something that should happen promptly before calling it a hang.
const HANG_GUARD: Duration = Duration::from_secs(60);
/// Refusals each flooding source may have before it is locked out, in the flooding test.
const MAX_FAILURES: usize = 600;
/// Refused attestations sent before the EST flood.
const ATTESTS: usize = 20;
/// EST requests of the flood: more than the lockout lets through.
const EST_REQUESTS: usize = 800;
/// The CSR subject an attacker sends: 30,000 characters.
const LONG_SUBJECT: usize = 30_000;
/// The most the state folder may grow during the flood (it is several megabytes of
/// attacker text if each refusal is stored).
const MAX_GROWTH: u64 = 4 * 1024 * 1024;

fn metrics(issuer: &Issuer) -> Result<String> {
    let url = issuer.crl_url()?.replace("/crl/issuing.crl", "/metrics");
    run_ok(Command::new("curl").args(["-sS", "-f", &url]))
}

/// Bytes in the files under `dir`.
fn folder_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            folder_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}

/// A self-signed client certificate (no plant CA made it) and its PKCS#8 key.
fn stranger_identity() -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec!["stranger.example".to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "stranger");
    let cert = params.self_signed(&key)?;
    Ok((vec![cert.der().to_vec()], key.serialize_der()))
}

/// A CSR whose commonName is `subject` (however long), base64.
fn csr_base64(subject: &str) -> Result<String> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, subject);
    let csr = params.serialize_request(&key)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(csr.der()))
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// An HTTP/1.1 connection to the EST port presenting `identity` as the client certificate.
async fn est_connection(issuer: &Issuer, identity: (Vec<Vec<u8>>, Vec<u8>)) -> Result<Sender> {
    let config = plant_tests::tls_client_config(issuer, Some(identity), b"http/1.1")?;
    let addr = issuer
        .url
        .strip_prefix("https://")
        .context("EST URL is not https")?;
    let tcp = TcpStream::connect(addr).await?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(ServerName::try_from("127.0.0.1")?.to_owned(), tcp)
        .await?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

/// POSTs `body` to `path`; returns the status and Retry-After.
async fn post(sender: &mut Sender, path: &str, body: &str) -> Result<(u16, Option<String>)> {
    sender.ready().await?;
    let request = http::Request::post(path)
        .header(http::header::HOST, "127.0.0.1")
        .header(http::header::CONTENT_TYPE, "application/pkcs10")
        .body(Full::new(Bytes::from(body.to_owned())))?;
    let response = sender.send_request(request).await?;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get(http::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    response.into_body().collect().await?;
    Ok((status, retry_after))
}

/// Attests with a join token over `client`; the gRPC status code of a refusal.
async fn attest(
    client: &mut proto::agent::agent_client::AgentClient<tonic::transport::Channel>,
    token: String,
) -> Result<Option<tonic::Code>> {
    let (evidence, _key) = plant_tests::join_token_evidence(token)?;
    let status = match client.attest(tokio_stream::iter([evidence])).await {
        Ok(response) => response.into_inner().message().await.err(),
        Err(status) => Some(status),
    };
    Ok(status.map(|s| s.code()))
}

fn audit_tail(issuer: &Issuer, count: usize) -> Result<String> {
    run_ok(
        issuer
            .cli()
            .args(["audit", "tail", "-n", &count.to_string()]),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_without_credentials_are_summarized_locked_out_and_cost_no_disk() -> Result<()> {
    let issuer = Issuer::start_with(|toml| {
        let text = std::fs::read_to_string(toml)?
            .replace(
                "max_failures = 10",
                &format!("max_failures = {MAX_FAILURES}"),
            )
            .replace("window = \"1m\"", "window = \"1h\"")
            .replace("summary_interval = \"1m\"", "summary_interval = \"5s\"");
        // An issuer from before summaries has no summary_interval: the test still runs.
        std::fs::write(toml, text)?;
        Ok(())
    })?;
    let state = issuer.dir.path().join("state");
    let before = folder_size(&state)?;

    // The source's first refusal is audited on its own: an EST request with a
    // self-signed client certificate and a CSR whose subject is 30,000 characters.
    let body = csr_base64(&"A".repeat(LONG_SUBJECT))?;
    let identity = stranger_identity()?;
    let mut sender = est_connection(&issuer, identity.clone()).await?;
    let mut statuses = Vec::with_capacity(EST_REQUESTS);
    statuses.push(post(&mut sender, "/.well-known/est/device/simplereenroll", &body).await?);

    // Refused attestations: join tokens that match nothing.
    let mut agent_api = proto::agent::agent_client::AgentClient::new(
        plant_tests::agent_api_channel(&issuer, None).await?,
    );
    for n in 0..ATTESTS {
        let code = attest(
            &mut agent_api,
            format!("guessed-join-token-{n}-{}", "x".repeat(4000)),
        )
        .await?;
        ensure!(code == Some(tonic::Code::PermissionDenied), "{code:?}");
    }

    // The EST flood: more of the same, on keep-alive connections.
    let flood = async {
        for _ in 1..EST_REQUESTS {
            // The server closes a connection whose request it refused unread (a 429): the
            // next request goes on a new one. Status 0: no answer on three connections.
            let mut answer = (0, None);
            for _ in 0..3 {
                match post(&mut sender, "/.well-known/est/device/simplereenroll", &body).await {
                    Ok(got) => {
                        answer = got;
                        break;
                    }
                    Err(_) => sender = est_connection(&issuer, identity.clone()).await?,
                }
            }
            statuses.push(answer);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(Duration::from_secs(600), flood)
        .await
        .context("the flood hung")??;

    // A legitimate device from another address (127.0.0.2) still enrolls.
    let dir = tempfile::tempdir()?;
    let token = issuer.token("device", Some("beside-the-flood"))?;
    let auth = format!("Authorization: Bearer {token}");
    enroll_with_curl(
        &issuer,
        dir.path(),
        "beside-the-flood",
        "device",
        &["--interface", "127.0.0.2", "-H", &auth],
    )
    .context("a device from another address could not enroll during the flood")?;

    // The summary of the flood is written once its interval is over.
    let deadline = Instant::now() + HANG_GUARD;
    let audit = loop {
        let audit = audit_tail(&issuer, 5000)?;
        if audit.contains("refusals.summarized") || Instant::now() > deadline {
            break audit;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let grown = folder_size(&state)?.saturating_sub(before);
    eprintln!("state folder grew by {grown} bytes during the flood");
    ensure!(
        grown < MAX_GROWTH,
        "the state folder grew by {grown} bytes for {} refused requests (bound {MAX_GROWTH})",
        ATTESTS + EST_REQUESTS
    );

    let refusal_records: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("enrollment.refused") || l.contains("agent.attestation_refused"))
        .collect();
    ensure!(
        refusal_records.len() <= 100,
        "{} refusals audited one by one",
        refusal_records.len()
    );
    ensure!(
        audit.lines().all(|l| l.len() < 2000),
        "an audit record keeps the attacker's text whole"
    );
    let first = refusal_records
        .first()
        .context("no refusal audited at all")?;
    ensure!(
        first.contains("enrollment.refused")
            && first.contains("\"source\":\"127.0.0.1\"")
            && first.contains(&format!("… ({LONG_SUBJECT} characters)")),
        "the first refusal, with its source and the subject cut short: {first}"
    );
    let summaries: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("refusals.summarized"))
        .collect();
    ensure!(
        !summaries.is_empty()
            && summaries
                .iter()
                .all(|l| l.contains("\"source\":\"127.0.0.1\"")),
        "no summary of the flood:\n{}",
        audit.lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );

    // Counted in the metrics, by reason; the source locked out once.
    let refused = statuses.iter().filter(|(s, _)| *s == 403).count();
    let metrics = metrics(&issuer)?;
    ensure!(
        metric(
            &metrics,
            "plant_unauthenticated_refusals_total{reason=\"est_unknown_certificate\"}"
        ) == Some(refused as f64),
        "{refused} refused EST requests:\n{metrics}"
    );
    ensure!(
        metric(
            &metrics,
            "plant_unauthenticated_refusals_total{reason=\"attestation_refused\"}"
        ) == Some(ATTESTS as f64),
        "{metrics}"
    );
    ensure!(
        metric(&metrics, "plant_source_lockouts_total") == Some(1.0),
        "{metrics}"
    );

    // Locked out after MAX_FAILURES refusals: 429 with Retry-After, before anything is read.
    ensure!(
        refused + ATTESTS == MAX_FAILURES,
        "{refused} EST refusals after {ATTESTS} attestations: the lockout did not come at \
         {MAX_FAILURES}"
    );
    let after: Vec<&(u16, Option<String>)> = statuses.iter().skip(refused).collect();
    ensure!(
        after.iter().all(|(s, _)| *s == 429 || *s == 0)
            && after
                .iter()
                .any(|(s, retry)| *s == 429 && retry.as_deref().is_some_and(|r| r != "0")),
        "after the lockout: {:?}",
        after.iter().take(5).collect::<Vec<_>>()
    );
    let locked: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("source.locked_out"))
        .collect();
    ensure!(
        locked.len() == 1 && locked[0].contains("\"source\":\"127.0.0.1\""),
        "{locked:?}"
    );
    let code = attest(&mut agent_api, "another-guess".into()).await?;
    ensure!(code == Some(tonic::Code::ResourceExhausted), "{code:?}");

    let verified = run_ok(issuer.cli().args(["audit", "verify"]))?;
    ensure!(verified.contains("audit log intact"), "{verified}");
    Ok(())
}

/// An operator certificate and key, for the HTTPS operator API.
fn operator_identity(issuer: &Issuer, dir: &Path) -> Result<(String, String)> {
    let token = issuer.token("operator", Some("op-1"))?;
    let auth = format!("Authorization: Bearer {token}");
    let (cert, key) = enroll_with_curl(issuer, dir, "op-1", "operator", &["-H", &auth])?;
    Ok((cert.display().to_string(), key.display().to_string()))
}

#[test]
fn the_audit_api_refuses_unbounded_pages_and_pages_back_through_the_whole_log() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = operator_identity(&issuer, dir.path())?;
    plant_tests::tokens(&issuer, "device", 40)?;
    let get = |query: &str| {
        curl(
            &issuer,
            &[
                "--cert",
                &cert,
                "--key",
                &key,
                &format!("{}/api/v1/audit?{query}", issuer.url),
            ],
        )
    };

    let answer = get("count=100000000")?;
    ensure!(
        answer.status == 400 && answer.text().contains("1000") && answer.text().contains("before="),
        "count=100000000: {} {}",
        answer.status,
        answer.text()
    );
    let answer = get("count=1000")?;
    ensure!(answer.status == 200, "{} {}", answer.status, answer.text());

    // Walk the whole log back, 7 records a page.
    let verified = run_ok(issuer.cli().args(["audit", "verify"]))?;
    let total: u64 = verified
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .context(verified.clone())?;
    ensure!(total > 40, "{verified}");
    let mut seen: Vec<u64> = Vec::new();
    let mut before: Option<u64> = None;
    for _ in 0..=total {
        let query = match before {
            Some(seq) => format!("count=7&before={seq}"),
            None => "count=7".to_owned(),
        };
        let answer = get(&query)?;
        ensure!(answer.status == 200, "{query}: {}", answer.text());
        let page: Vec<serde_json::Value> = serde_json::from_slice(&answer.body)?;
        let seqs: Vec<u64> = page.iter().filter_map(|r| r["seq"].as_u64()).collect();
        let Some(&first) = seqs.first() else { break };
        ensure!(
            before.is_none_or(|b| seqs.iter().all(|s| *s < b)),
            "{query} answered records {seqs:?}: before= is not honoured"
        );
        seen.splice(0..0, seqs);
        before = Some(first);
    }
    ensure!(
        seen == (1..=seen.len() as u64).collect::<Vec<_>>() && seen.len() as u64 >= total,
        "paging back did not read the whole log once: {} of {total} records",
        seen.len()
    );

    // The CLI pages for counts above a page.
    let tail = run_ok(issuer.cli().args(["audit", "tail", "-n", "1500"]))?;
    ensure!(tail.lines().count() as u64 >= total, "{tail}");
    Ok(())
}

#[test]
fn tokens_and_entries_cannot_grant_the_issuers_own_names() -> Result<()> {
    let issuer = Issuer::start()?;
    for (flag, name) in [
        ("--dns", "localhost"),
        ("--ip", "127.0.0.1"),
        ("--ip", "::1"),
    ] {
        let out = run(issuer.cli().args([
            "token",
            "create",
            "--label",
            "server",
            "--subject",
            "impostor",
            flag,
            name,
        ]))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        ensure!(
            !out.status.success() && stderr.contains("is the issuer's own"),
            "token create {flag} {name}: {}\n{stderr}",
            out.status
        );
    }
    let out = run(issuer.cli().args([
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://plant.example/issuer",
        "--parent",
        "spiffe://plant.example/agent/join_token/0123",
        "--selector",
        "unix:uid:0",
    ]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("reserved for the issuer"),
        "entry create spiffe://plant.example/issuer: {}\n{stderr}",
        out.status
    );
    let out = run(issuer.cli().args([
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://plant.example/web",
        "--parent",
        "spiffe://plant.example/agent/join_token/0123",
        "--selector",
        "unix:uid:0",
        "--dns",
        "localhost",
    ]))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && stderr.contains("is the issuer's own"),
        "entry create --dns localhost: {}\n{stderr}",
        out.status
    );
    Ok(())
}

/// A TLS-terminating relay in front of the issuer that presents `chain`/`key`: a
/// man in the middle that records what clients send through it.
struct Impostor {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<u8>>>,
}

impl Impostor {
    fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    fn saw(&self, secret: &str) -> bool {
        let seen = self.seen.lock().map(|s| s.clone()).unwrap_or_default();
        seen.windows(secret.len()).any(|w| w == secret.as_bytes())
    }
}

/// A server certificate for the issuer's names (localhost, 127.0.0.1) that is not the
/// issuer's: signed with the issuing key file, as any device certificate granted those names
/// would be. Returns (chain DER, PKCS#8 key DER).
fn plant_certificate_with_the_issuers_names(issuer: &Issuer) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let ca_pem = std::fs::read_to_string(issuer.issuing_pem())?;
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(
        issuer.dir.path().join("ca/issuing.key"),
    )?)?;
    let ca = rcgen::Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse()?));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = params.signed_by(&key, &ca)?;
    let ca_der = plant_tests::pem_blocks(&ca_pem, "CERTIFICATE");
    let mut chain = vec![cert.der().to_vec()];
    chain.extend(ca_der);
    Ok((chain, key.serialize_der()))
}

/// Starts the relay to `upstream` (`https://host:port` of the issuer) speaking `alpn`.
async fn impostor(issuer: &Issuer, upstream: &str, alpn: &[u8]) -> Result<Impostor> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let (chain, key) = plant_certificate_with_the_issuers_names(issuer)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )?;
    server.alpn_protocols = vec![alpn.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
    let connector =
        tokio_rustls::TlsConnector::from(plant_tests::tls_client_config(issuer, None, alpn)?);
    let upstream = upstream
        .strip_prefix("https://")
        .context("upstream is not https")?
        .to_owned();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let recorded = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            let (upstream, recorded) = (upstream.clone(), recorded.clone());
            tokio::spawn(async move {
                let Ok(client) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(tcp) = TcpStream::connect(&upstream).await else {
                    return;
                };
                let Ok(name) = ServerName::try_from("127.0.0.1") else {
                    return;
                };
                let Ok(server) = connector.connect(name, tcp).await else {
                    return;
                };
                let (mut client_read, mut client_write) = tokio::io::split(client);
                let (mut server_read, mut server_write) = tokio::io::split(server);
                let upward = async {
                    let mut buffer = [0u8; 16 * 1024];
                    while let Ok(n) = client_read.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        if let Ok(mut seen) = recorded.lock() {
                            if seen.len() < 4 << 20 {
                                seen.extend_from_slice(&buffer[..n]);
                            }
                        }
                        if server_write.write_all(&buffer[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = server_write.shutdown().await;
                };
                let downward = async {
                    let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                    let _ = client_write.shutdown().await;
                };
                tokio::join!(upward, downward);
            });
        }
    });
    Ok(Impostor { addr, seen })
}

/// Says whether `text` is the clients' refusal of a plant certificate that is not the issuer's.
fn names_the_impostor(text: &str) -> bool {
    text.contains("not the issuer's") && text.contains("spiffe://<trust domain>/issuer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_enroll_refuses_a_plant_certificate_posing_as_the_issuer() -> Result<()> {
    let issuer = Issuer::start()?;
    let relay = impostor(&issuer, &issuer.url, b"http/1.1").await?;
    let token = issuer.token("device", Some("pump-7"))?;
    let out_dir = tempfile::tempdir()?;
    let fingerprint = issuer.fingerprint()?;
    let (server, out) = (relay.url(), out_dir.path().to_path_buf());
    let token_arg = token.clone();
    let enrolled = tokio::task::spawn_blocking(move || {
        run(Command::new(plant_tests::bin("agent")).args([
            "enroll",
            "--server",
            &server,
            "--ca-fingerprint",
            &fingerprint,
            "--label",
            "device",
            "--subject",
            "pump-7",
            "--token",
            &token_arg,
            "--out",
            &out.to_string_lossy(),
        ]))
    });
    let enrolled = tokio::time::timeout(HANG_GUARD, enrolled)
        .await
        .context("agent enroll hung")???;
    let stderr = String::from_utf8_lossy(&enrolled.stderr);
    ensure!(
        !relay.saw(&token),
        "agent enroll sent its token to the impostor (exit {}):\n{stderr}",
        enrolled.status
    );
    ensure!(
        !enrolled.status.success() && names_the_impostor(&stderr),
        "agent enroll: {}\n{stderr}",
        enrolled.status
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_refuses_a_plant_certificate_posing_as_the_issuer() -> Result<()> {
    let issuer = Issuer::start()?;
    let relay = impostor(&issuer, &issuer.agent_api_url()?, b"h2").await?;
    let join = issuer.join_token()?;
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("join.token"), &join)?;
    let socket = dir.path().join("sock/workload.sock");
    std::fs::write(
        dir.path().join("agent.toml"),
        format!(
            "server = \"{server}\"\ntrust_bundle = \"{bundle}\"\ntrust_domain = \"plant.example\"\n\
             state_dir = \"state\"\nsocket = \"{socket}\"\nsync_interval = \"1s\"\n\
             metrics_listen = \"127.0.0.1:0\"\n\n[attestation]\nmethod = \"join_token\"\n\
             join_token_file = \"join.token\"\n",
            server = relay.url(),
            bundle = issuer.root_pem().display(),
            socket = socket.display(),
        ),
    )?;
    let log_path = dir.path().join("agent.log");
    let mut agent = Command::new(plant_tests::bin("agent"))
        .args(["run", "--config"])
        .arg(dir.path().join("agent.toml"))
        .env("RUST_LOG", "info")
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()?;
    let deadline = Instant::now() + HANG_GUARD;
    let outcome = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if relay.saw(&join) {
            break Err(format!(
                "the agent sent its join token to the impostor:\n{log}"
            ));
        }
        if names_the_impostor(&log) {
            break Ok(());
        }
        if Instant::now() > deadline {
            break Err(format!("the agent never named the impostor:\n{log}"));
        }
        if let Ok(Some(status)) = agent.try_wait() {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            if names_the_impostor(&log) {
                break Ok(());
            }
            break Err(format!("agent run exited with {status}:\n{log}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = agent.kill();
    let _ = agent.wait();
    match outcome {
        Ok(()) => {}
        Err(why) => bail!("{why}"),
    }
    ensure!(!relay.saw(&join), "the join token reached the impostor");
    Ok(())
}
