//! Hostile clients against a real `issuer serve` (issue 7): slowloris in the TLS handshake and
//! in the headers, thousands of idle connections, oversized headers, token guessing, and
//! pathological TLS client chains. Throughout, a legitimate device's enrollment (curl) must
//! still complete. Timings are never asserted; liveness bounds only guard against hangs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use plant_tests::{curl, enroll_with_token, metric, openssl_csr, Issuer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for something that should happen promptly before calling it a hang.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// An issuer whose handshake, header and body timeouts are 1 s, with `max_connections`.
fn issuer_with_short_timeouts(max_connections: usize) -> Result<Issuer> {
    Issuer::start_with(|toml| {
        let text = std::fs::read_to_string(toml)?
            .replace("handshake_timeout = \"10s\"", "handshake_timeout = \"1s\"")
            .replace("header_timeout = \"10s\"", "header_timeout = \"1s\"")
            .replace("body_timeout = \"10s\"", "body_timeout = \"1s\"")
            .replace(
                "max_connections = 4096",
                &format!("max_connections = {max_connections}"),
            );
        std::fs::write(toml, text)?;
        Ok(())
    })
}

/// Many idle sockets need more descriptors than a default soft limit of 1024.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    limit.current = limit.maximum;
    let _ = setrlimit(Resource::Nofile, limit);
}

async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?)
}

/// Sends `bytes` one at a time, 200 ms apart, until the server closes the connection;
/// returns how long that took. Errors if it is still open after [`HANG_GUARD`].
async fn trickle_until_closed<S>(stream: &mut S, bytes: &[u8]) -> Result<Duration>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let start = Instant::now();
    let mut answer = [0u8; 512];
    for byte in bytes.iter().cycle() {
        if stream.write_all(&[*byte]).await.is_err() || stream.flush().await.is_err() {
            return Ok(start.elapsed());
        }
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut answer)).await {
            Err(_) => {}
            // EOF, a reset, or the server's 408 before it closes: cut either way.
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(start.elapsed()),
            Ok(Ok(n)) => {
                let text = String::from_utf8_lossy(&answer[..n]);
                ensure!(
                    text.starts_with("HTTP/1.1 408"),
                    "a request that never finished its headers was answered: {text}"
                );
                return Ok(start.elapsed());
            }
        }
        if start.elapsed() > HANG_GUARD {
            bail!("a client trickling one byte every 200 ms was not cut off");
        }
    }
    unreachable!("cycle never ends")
}

/// Enrolls one device with curl on a blocking thread, within the hang guard.
async fn enroll_device(issuer: &Arc<Issuer>, name: &'static str) -> Result<()> {
    let issuer = issuer.clone();
    let enrolled = tokio::time::timeout(
        HANG_GUARD,
        tokio::task::spawn_blocking(move || {
            let dir = tempfile::tempdir()?;
            enroll_with_token(&issuer, dir.path(), name, "device").map(|_| ())
        }),
    )
    .await
    .context("a legitimate enrollment hung")??;
    enrolled
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_handshakes_headers_and_bodies_are_cut_while_a_device_enrolls() -> Result<()> {
    let issuer = Arc::new(issuer_with_short_timeouts(4096)?);
    let addr = issuer.est_addr()?;

    // A TLS record header that promises a ClientHello, then its body a byte at a time.
    let slow_handshake = tokio::spawn(async move {
        let mut tcp = TcpStream::connect(addr).await?;
        trickle_until_closed(&mut tcp, &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01]).await
    });
    let config = plant_tests::tls_client_config(&issuer, None, b"http/1.1")?;
    let slow_headers = tokio::spawn(async move {
        let mut tls = tls_connect(addr, config).await?;
        trickle_until_closed(
            &mut tls,
            b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaaaaaa",
        )
        .await
    });

    let config = plant_tests::tls_client_config(&issuer, None, b"http/1.1")?;
    let slow_body = tokio::spawn(async move {
        let mut tls = tls_connect(addr, config).await?;
        tls.write_all(
            b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\n\
              Authorization: Bearer not-a-token\r\nContent-Type: application/pkcs10\r\n\
              Content-Length: 1000\r\n\r\n",
        )
        .await?;
        trickle_until_closed(&mut tls, b"MIIB").await
    });

    enroll_device(&issuer, "beside-slowloris").await?;
    let handshake_cut = slow_handshake.await??;
    let headers_cut = slow_headers.await??;
    let body_cut = slow_body.await??;
    eprintln!(
        "slow handshake cut after {handshake_cut:?}, slow headers after {headers_cut:?}, \
         slow body after {body_cut:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_connections_do_not_keep_a_device_out() -> Result<()> {
    raise_open_file_limit();
    const MAX_CONNECTIONS: usize = 300;
    // Default (10 s) timeouts: the idle connections outlive the test unless shed.
    let issuer = Arc::new(Issuer::start_with(|toml| {
        let text = std::fs::read_to_string(toml)?.replace(
            "max_connections = 4096",
            &format!("max_connections = {MAX_CONNECTIONS}"),
        );
        std::fs::write(toml, text)?;
        Ok(())
    })?);
    let addr = issuer.est_addr()?;

    let config = plant_tests::tls_client_config(&issuer, None, b"http/1.1")?;
    let crowd = async {
        let mut idle = Vec::new();
        for _ in 0..2000 {
            idle.push(TcpStream::connect(addr).await?);
        }
        let mut established = Vec::new();
        for _ in 0..200 {
            established.push(tls_connect(addr, config.clone()).await?);
        }
        anyhow::Ok((idle, established))
    };
    let (idle, established) = tokio::time::timeout(HANG_GUARD, crowd)
        .await
        .context("the issuer stopped accepting connections")??;

    enroll_device(&issuer, "beside-idle-crowd").await?;

    // The issuer holds about max_connections sockets, not one per client that connected.
    let pid = issuer.pid().context("issuer not running")?;
    let deadline = Instant::now() + HANG_GUARD;
    let open = loop {
        let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        if open <= MAX_CONNECTIONS + 100 || Instant::now() > deadline {
            break open;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(
        open <= MAX_CONNECTIONS + 100,
        "the issuer holds {open} descriptors with max_connections = {MAX_CONNECTIONS}"
    );
    let metrics = metrics(&issuer)?;
    let shed = metric(&metrics, "plant_connections_shed_total{listener=\"est\"}").unwrap_or(0.0);
    ensure!(shed >= 1.0, "no connection was shed:\n{metrics}");
    drop((idle, established));
    Ok(())
}

/// Attests with a join token; the gRPC status code of a refusal, `None` on success.
async fn attest(issuer: &Issuer, token: String) -> Result<Option<tonic::Code>> {
    use proto::agent::agent_client::AgentClient;
    let mut client = AgentClient::new(plant_tests::agent_api_channel(issuer, None).await?);
    let (evidence, _key) = plant_tests::join_token_evidence(token)?;
    let status = match client.attest(tokio_stream::iter([evidence])).await {
        Ok(response) => response.into_inner().message().await.err(),
        Err(status) => Some(status),
    };
    Ok(status.map(|s| s.code()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_agent_api_connections_do_not_keep_an_agent_out() -> Result<()> {
    raise_open_file_limit();
    const MAX_CONNECTIONS: usize = 50;
    let issuer = Issuer::start_with(|toml| {
        let text = std::fs::read_to_string(toml)?.replace(
            "max_connections = 4096",
            &format!("max_connections = {MAX_CONNECTIONS}"),
        );
        std::fs::write(toml, text)?;
        Ok(())
    })?;
    let addr = issuer.agent_api_addr()?;
    let config = plant_tests::tls_client_config(&issuer, None, b"h2")?;
    // Silent TCP connections, then TLS connections that never send a frame: more of each
    // than the limit.
    let crowd = async {
        let mut idle = Vec::new();
        for _ in 0..300 {
            idle.push(TcpStream::connect(addr).await?);
        }
        let mut established = Vec::new();
        for _ in 0..100 {
            established.push(tls_connect(addr, config.clone()).await?);
        }
        anyhow::Ok((idle, established))
    };
    let (idle, established) = tokio::time::timeout(HANG_GUARD, crowd)
        .await
        .context("the agent API stopped accepting connections")??;
    let join = issuer.join_token()?;
    let attested = tokio::time::timeout(HANG_GUARD, attest(&issuer, join))
        .await
        .context("a legitimate attestation hung")??;
    ensure!(attested.is_none(), "attestation refused: {attested:?}");
    let metrics = metrics(&issuer)?;
    let shed = metric(
        &metrics,
        "plant_connections_shed_total{listener=\"agent_api\"}",
    )
    .unwrap_or(0.0);
    ensure!(shed >= 1.0, "no connection was shed:\n{metrics}");
    drop((idle, established));
    Ok(())
}

fn metrics(issuer: &Issuer) -> Result<String> {
    let url = issuer.crl_url()?.replace("/crl/issuing.crl", "/metrics");
    plant_tests::run_ok(std::process::Command::new("curl").args(["-sS", "-f", &url]))
}

#[test]
fn oversized_headers_are_answered_431() -> Result<()> {
    let issuer = Issuer::start()?;
    let big = format!("X-Padding: {}", "a".repeat(20_000));
    let answer = curl(&issuer, &["-H", &big, "/.well-known/est/cacerts"])?;
    ensure!(answer.status == 431, "{} {}", answer.status, answer.text());
    // A normal request on a fresh connection still works.
    ensure!(curl(&issuer, &["/.well-known/est/cacerts"])?.status == 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guessed_tokens_lock_the_source_out_with_one_audit_record() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (_, csr) = openssl_csr(dir.path(), "guess", "guess", &[])?;
    let body = format!("@{}", csr.display());
    let enroll = |token: &str| {
        let auth = format!("Authorization: Bearer {token}");
        curl(
            &issuer,
            &[
                "-H",
                "Content-Type: application/pkcs10",
                "-H",
                &auth,
                "--data-binary",
                &body,
                "/.well-known/est/device/simpleenroll",
            ],
        )
    };

    // Failures count per source across EST and Attest: 4 join tokens, then EST guesses.
    for n in 0..4 {
        let code = attest(&issuer, format!("guessed-join-token-{n}")).await?;
        ensure!(code == Some(tonic::Code::PermissionDenied), "{code:?}");
    }
    let mut statuses = Vec::new();
    for n in 0..26 {
        let answer = enroll(&format!("guessed-token-{n}"))?;
        if answer.status == 429 {
            let retry_after: u32 = answer
                .header("Retry-After")
                .context("429 without Retry-After")?
                .parse()?;
            ensure!(retry_after >= 1, "Retry-After {retry_after}");
        }
        statuses.push(answer.status);
    }
    ensure!(
        statuses[..6].iter().all(|s| *s == 401) && statuses[6..].iter().all(|s| *s == 429),
        "the 10th failure locks the source out: {statuses:?}"
    );
    // Locked out means locked out: the right token is not even looked at, and stays unused.
    let real = issuer.token("device", Some("guess"))?;
    ensure!(enroll(&real)?.status == 429);
    let join = issuer.join_token()?;
    let code = attest(&issuer, join).await?;
    ensure!(code == Some(tonic::Code::ResourceExhausted), "{code:?}");

    let audit = plant_tests::run_ok(issuer.cli().args(["audit", "tail", "-n", "100"]))?;
    let guessing: Vec<&str> = audit
        .lines()
        .filter(|l| l.contains("source.locked_out"))
        .collect();
    ensure!(guessing.len() == 1, "one record per lockout:\n{audit}");
    ensure!(
        guessing[0].contains("\"source\":\"127.0.0.1\"") && guessing[0].contains("\"failures\":10"),
        "{}",
        guessing[0]
    );
    // Below the threshold only the source's first refusal of the minute is audited on its
    // own (the rest go into its summary); once locked, none is.
    let refused = audit
        .lines()
        .filter(|l| l.contains("enrollment.refused") || l.contains("agent.attestation_refused"))
        .count();
    ensure!(
        refused == 1,
        "{refused} refusals audited one by one:\n{audit}"
    );
    let verified = plant_tests::run_ok(issuer.cli().args(["audit", "verify"]))?;
    ensure!(verified.contains("audit log intact"), "{verified}");
    let metrics = metrics(&issuer)?;
    ensure!(
        metric(&metrics, "plant_source_lockouts_total") == Some(1.0),
        "{metrics}"
    );
    ensure!(
        metric(&metrics, "plant_token_failures_total") == Some(10.0),
        "{metrics}"
    );
    Ok(())
}

fn ca_params(name: &str) -> Result<rcgen::CertificateParams> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Ok(params)
}

fn new_key() -> Result<rcgen::KeyPair> {
    Ok(rcgen::KeyPair::generate_for(
        &rcgen::PKCS_ECDSA_P256_SHA256,
    )?)
}

/// A leaf under `depth` CAs, each signed by the next (the last self-signed): leaf first,
/// with the leaf's PKCS#8 key.
fn long_chain(depth: usize) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let keys: Vec<rcgen::KeyPair> = (0..depth).map(|_| new_key()).collect::<Result<_>>()?;
    let params: Vec<rcgen::CertificateParams> = (0..depth)
        .map(|i| ca_params(&format!("CA {i}")))
        .collect::<Result<_>>()?;
    let mut chain = Vec::new();
    for i in 0..depth {
        let cert = if i + 1 == depth {
            params[i].self_signed(&keys[i])?
        } else {
            params[i].signed_by(
                &keys[i],
                &rcgen::Issuer::from_params(&params[i + 1], &keys[i + 1]),
            )?
        };
        chain.push(cert.der().to_vec());
    }
    let leaf_key = new_key()?;
    let leaf = rcgen::CertificateParams::new(vec!["device.example".to_owned()])?
        .signed_by(&leaf_key, &rcgen::Issuer::from_params(&params[0], &keys[0]))?;
    chain.insert(0, leaf.der().to_vec());
    Ok((chain, leaf_key.serialize_der()))
}

/// A leaf under CA A, where A is signed by B and B by A, with `[A, B]` presented `rounds` times.
fn cyclic_chain(rounds: usize) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let (key_a, key_b) = (new_key()?, new_key()?);
    let (params_a, params_b) = (ca_params("CA A")?, ca_params("CA B")?);
    let a = params_a.signed_by(&key_a, &rcgen::Issuer::from_params(&params_b, &key_b))?;
    let b = params_b.signed_by(&key_b, &rcgen::Issuer::from_params(&params_a, &key_a))?;
    let leaf_key = new_key()?;
    let leaf = rcgen::CertificateParams::new(vec!["device.example".to_owned()])?
        .signed_by(&leaf_key, &rcgen::Issuer::from_params(&params_a, &key_a))?;
    let mut chain = vec![leaf.der().to_vec()];
    for _ in 0..rounds {
        chain.push(a.der().to_vec());
        chain.push(b.der().to_vec());
    }
    Ok((chain, leaf_key.serialize_der()))
}

/// Whether the server accepts the connection: TLS with `identity`, then a first exchange
/// (an HTTP/1.1 request, or the HTTP/2 preface), and some answer back. In TLS 1.3 the client
/// finishes first, so a refused certificate shows as an alert on that first read.
async fn served(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    first: &'static [u8],
) -> Result<bool> {
    let exchange = async {
        let Ok(mut tls) = tls_connect(addr, config).await else {
            return Ok(false);
        };
        if tls.write_all(first).await.is_err() {
            return Ok(false);
        }
        let mut answer = [0u8; 64];
        Ok(matches!(tls.read(&mut answer).await, Ok(n) if n > 0))
    };
    tokio::time::timeout(HANG_GUARD, exchange)
        .await
        .context("a TLS exchange with a pathological chain hung")?
}

const HTTP1_REQUEST: &[u8] = b"GET /.well-known/est/cacerts HTTP/1.1\r\nHost: x\r\n\r\n";
/// The HTTP/2 client preface and an empty SETTINGS frame (RFC 9113 §3.4).
const HTTP2_PREFACE: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_and_cyclic_client_chains_are_refused_at_the_handshake() -> Result<()> {
    let issuer = Issuer::start()?;
    let (est, agent_api) = (issuer.est_addr()?, issuer.agent_api_addr()?);
    let long = long_chain(99)?;
    let cyclic = cyclic_chain(1)?;
    let long_cycle = cyclic_chain(50)?;

    // The EST listener judges client certificates against the inventory, not at the
    // handshake: a short foreign chain is let in (and is refused per request)...
    let short = long_chain(1)?;
    ensure!(
        served(
            est,
            plant_tests::tls_client_config(&issuer, Some(short), b"http/1.1")?,
            HTTP1_REQUEST
        )
        .await?,
        "a two-certificate chain must reach EST"
    );
    // ...but a hundred certificates, or a cycle repeated, are not.
    for (name, chain) in [
        ("100 certificates", long.clone()),
        ("a long cycle", long_cycle.clone()),
    ] {
        ensure!(
            !served(
                est,
                plant_tests::tls_client_config(&issuer, Some(chain), b"http/1.1")?,
                HTTP1_REQUEST
            )
            .await?,
            "EST accepted a client presenting {name}"
        );
    }

    // The agent API verifies chains against the plant root at the handshake.
    ensure!(
        served(
            agent_api,
            plant_tests::tls_client_config(&issuer, None, b"h2")?,
            HTTP2_PREFACE
        )
        .await?,
        "the agent API must serve a client without a certificate"
    );
    for (name, chain) in [
        ("100 certificates", long),
        ("a cycle", cyclic),
        ("a long cycle", long_cycle),
    ] {
        ensure!(
            !served(
                agent_api,
                plant_tests::tls_client_config(&issuer, Some(chain), b"h2")?,
                HTTP2_PREFACE
            )
            .await?,
            "the agent API accepted a client presenting {name}"
        );
    }
    let log = issuer.log();
    ensure!(
        log.matches("overlong certificate chain").count() >= 4,
        "each overlong chain is named in the log:\n{log}"
    );
    Ok(())
}
