//! Resource exhaustion without authentication (issue 16), against a real `issuer serve`:
//! `Attest` streams that never send their evidence, EST connections trickling bodies under
//! self-signed client certificates, one HTTP/2 connection with hundreds of half-sent
//! `Attest` messages, and one source taking every slot. Throughout, a real agent attests
//! and a real EST client is answered. Timings are never asserted; liveness bounds only
//! guard against hangs, and the memory bound is on the issuer's resident set.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use plant_tests::{curl, Agent, Issuer};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long a test waits for something that should happen promptly before calling it a hang.
const HANG_GUARD: Duration = Duration::from_secs(30);
/// The `Attest` RPC.
const ATTEST_PATH: &str = "/plant.agent.v1.Agent/Attest";

/// An issuer holding at most `max_connections` connections on each listener. Only keys the
/// issuer has long had are set, so the same test runs against older builds.
fn issuer_with_max_connections(max_connections: usize) -> Result<Issuer> {
    Issuer::start_with(|toml| {
        let text = std::fs::read_to_string(toml)?.replace(
            "max_connections = 4096",
            &format!("max_connections = {max_connections}"),
        );
        std::fs::write(toml, text)?;
        Ok(())
    })
}

/// A TLS connection to `addr` from the local address `source` (any 127.0.0.0/8 address
/// reaches a loopback listener, so one test can play several hosts).
async fn tls_connect_from(
    source: Ipv4Addr,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(IpAddr::V4(source), 0))?;
    let tcp = socket.connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let name = ServerName::try_from("127.0.0.1")?.to_owned();
    Ok(tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?)
}

/// An HTTP/2 connection to the agent API (its driver runs on its own task).
async fn h2_connect(
    source: Ipv4Addr,
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<h2::client::SendRequest<Bytes>> {
    let tls = tls_connect_from(source, addr, config).await?;
    let (send, connection) = h2::client::handshake(tls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send)
}

/// Opens an `Attest` stream and sends nothing on it; returns once the issuer answered with
/// its response headers (the RPC is in progress on the issuer), with the stream's halves.
async fn silent_attest(
    send: &mut h2::client::SendRequest<Bytes>,
) -> Result<(h2::RecvStream, h2::SendStream<Bytes>)> {
    let request = http::Request::post(format!("https://127.0.0.1{ATTEST_PATH}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let ready = send.clone().ready().await?;
    *send = ready;
    let (response, stream) = send.send_request(request, false)?;
    let response = response.await?;
    ensure!(
        response.status() == 200,
        "Attest answered {}",
        response.status()
    );
    Ok((response.into_body(), stream))
}

/// The grpc-status the stream ends with (reads and drops any message first).
async fn grpc_status(mut body: h2::RecvStream) -> Result<Option<String>> {
    while let Some(data) = body.data().await {
        let data = data?;
        let _ = body.flow_control().release_capacity(data.len());
    }
    Ok(body
        .trailers()
        .await?
        .and_then(|t| t.get("grpc-status").cloned())
        .and_then(|v| v.to_str().ok().map(str::to_owned)))
}

/// Attests with a fresh join token over tonic; returns the node SVID chain and its key
/// (PKCS#8), usable as TLS client identity.
async fn attest_node(issuer: &Issuer) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
    use proto::agent::agent_client::AgentClient;
    use proto::agent::attest_response;
    let token = issuer.join_token()?;
    let mut client = AgentClient::new(plant_tests::agent_api_channel(issuer, None).await?);
    let (evidence, key) = plant_tests::join_token_evidence(token)?;
    let mut answers = client
        .attest(tokio_stream::iter([evidence]))
        .await?
        .into_inner();
    match answers.message().await?.and_then(|m| m.step) {
        Some(attest_response::Step::NodeSvid(svid)) => Ok((svid.chain, key.serialize_der())),
        other => bail!("attestation answered {other:?}"),
    }
}

/// Starts a real agent with a join token and waits (bounded) until it has attested.
async fn agent_attests(issuer: &Arc<Issuer>) -> Result<(Agent, String)> {
    let issuer = issuer.clone();
    tokio::time::timeout(
        HANG_GUARD * 2,
        tokio::task::spawn_blocking(move || {
            let token = issuer.join_token()?;
            let mut agent = Agent::start_with_join_token(&issuer, &token)?;
            let node = agent.node_id()?;
            anyhow::Ok((agent, node))
        }),
    )
    .await
    .context("a real agent's attestation hung")??
}

/// The issuer's resident set (bytes), from /proc.
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("no VmRSS")?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()?;
    Ok(kib * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_attest_streams_do_not_keep_an_agent_out() -> Result<()> {
    const MAX_CONNECTIONS: usize = 8;
    let issuer = Arc::new(issuer_with_max_connections(MAX_CONNECTIONS)?);
    let addr = issuer.agent_api_addr()?;
    let config = plant_tests::tls_client_config(&issuer, None, b"h2")?;
    // Every slot: a connection with an Attest stream that never sends its evidence.
    let crowd = async {
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            let mut send = h2_connect(Ipv4Addr::LOCALHOST, addr, config.clone()).await?;
            let stream = silent_attest(&mut send).await?;
            silent.push((send, stream));
        }
        anyhow::Ok(silent)
    };
    let silent = tokio::time::timeout(HANG_GUARD, crowd)
        .await
        .context("opening the silent Attest streams hung")??;
    let (_agent, node) = agent_attests(&issuer).await?;
    eprintln!("attested as {node} beside {} silent streams", silent.len());
    drop(silent);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attest_stream_without_evidence_is_ended_by_its_deadline() -> Result<()> {
    let issuer = Issuer::start()?;
    let addr = issuer.agent_api_addr()?;
    let config = plant_tests::tls_client_config(&issuer, None, b"h2")?;
    let mut send = h2_connect(Ipv4Addr::LOCALHOST, addr, config).await?;
    let (body, _stream) = silent_attest(&mut send).await?;
    // The default first-message deadline is 10 s.
    let status = tokio::time::timeout(HANG_GUARD, grpc_status(body))
        .await
        .context("an Attest stream without evidence stayed open")??;
    // DEADLINE_EXCEEDED.
    ensure!(status.as_deref() == Some("4"), "grpc-status {status:?}");
    Ok(())
}

/// Sends POST simpleenroll requests whose 20-byte body arrives a byte every 250 ms, one
/// after another on one keep-alive connection, until the connection closes.
async fn trickle_requests<S>(mut tls: S) -> Result<usize>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut answered = 0;
    loop {
        let head = b"POST /.well-known/est/simpleenroll HTTP/1.1\r\nHost: x\r\n\
                     Content-Type: application/pkcs10\r\nContent-Length: 20\r\n\r\n";
        if tls.write_all(head).await.is_err() {
            return Ok(answered);
        }
        for _ in 0..20 {
            if tls.write_all(b"A").await.is_err() || tls.flush().await.is_err() {
                return Ok(answered);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Read the whole answer (headers and Content-Length body) before the next request.
        let mut answer = Vec::new();
        let mut buffer = [0u8; 4096];
        loop {
            let n = match tls.read(&mut buffer).await {
                Ok(0) | Err(_) => return Ok(answered),
                Ok(n) => n,
            };
            answer.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&answer);
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text[..end]
                    .lines()
                    .find_map(|l| {
                        let (name, value) = l.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if answer.len() >= end + 4 + length {
                    break;
                }
            }
        }
        answered += 1;
    }
}

/// A self-signed client certificate (chain, PKCS#8 key): something this CA never issued.
fn self_signed_identity() -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert =
        rcgen::CertificateParams::new(vec!["intruder.example".to_owned()])?.self_signed(&key)?;
    Ok((vec![cert.der().to_vec()], key.serialize_der()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn est_connections_trickling_bodies_do_not_keep_cacerts_unanswered() -> Result<()> {
    const MAX_CONNECTIONS: usize = 8;
    let issuer = Arc::new(issuer_with_max_connections(MAX_CONNECTIONS)?);
    let addr = issuer.est_addr()?;
    let config =
        plant_tests::tls_client_config(&issuer, Some(self_signed_identity()?), b"http/1.1")?;
    let mut trickling = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        let tls = tokio::time::timeout(
            HANG_GUARD,
            tls_connect_from(Ipv4Addr::LOCALHOST, addr, config.clone()),
        )
        .await
        .context("connecting hung")??;
        trickling.push(tokio::spawn(trickle_requests(tls)));
    }
    // Every slot holds a connection that is always in the middle of a request.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let answer = {
        let issuer = issuer.clone();
        tokio::task::spawn_blocking(move || curl(&issuer, &["/.well-known/est/cacerts"])).await?
    }
    .context("cacerts beside connections trickling bodies")?;
    ensure!(answer.status == 200, "cacerts answered {}", answer.status);
    for task in trickling {
        task.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_sent_attest_messages_do_not_exhaust_memory() -> Result<()> {
    /// What the issuer's resident set may grow by under the attack.
    const RSS_BOUND: u64 = 128 * 1024 * 1024;
    /// Streams the attacker tries to open on its one connection.
    const STREAMS: usize = 300;
    /// The length prefix each message promises (just under tonic's default 4 MiB limit),
    /// and how much of it is sent.
    const PROMISED: u32 = 4 * 1024 * 1024 - 64;
    const SENT: usize = 2 * 1024 * 1024;
    let issuer = Arc::new(Issuer::start()?);
    let pid = issuer.pid().context("issuer not running")?;
    // Warm up every path the check uses, then take the baseline.
    attest_node(&issuer).await?;
    ensure!(curl(&issuer, &["/.well-known/est/cacerts"])?.status == 200);
    let baseline = rss(pid)?;

    let addr = issuer.agent_api_addr()?;
    let config = plant_tests::tls_client_config(&issuer, None, b"h2")?;
    let mut send = h2_connect(Ipv4Addr::LOCALHOST, addr, config).await?;
    let mut held = Vec::new();
    let mut peak = baseline;
    let mut opened = 0;
    let chunk = Bytes::from(vec![0x42u8; 16 * 1024]);
    for _ in 0..STREAMS {
        // At the issuer's stream cap, opening waits for a stream to end.
        let Ok(ready) = tokio::time::timeout(Duration::from_secs(5), send.clone().ready()).await
        else {
            eprintln!("stream {opened}: the connection's streams are capped");
            break;
        };
        send = ready?;
        let request = http::Request::post(format!("https://127.0.0.1{ATTEST_PATH}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())?;
        let (response, mut stream) = send.send_request(request, false)?;
        opened += 1;
        let mut prefix = vec![0u8];
        prefix.extend_from_slice(&PROMISED.to_be_bytes());
        stream.send_data(Bytes::from(prefix), false)?;
        // Send as much of the message as the issuer takes; stop at once when it refuses
        // the stream or stops granting window.
        let mut sent = 0;
        while sent < SENT {
            stream.reserve_capacity(chunk.len());
            let granted = tokio::time::timeout(
                Duration::from_secs(1),
                std::future::poll_fn(|cx| stream.poll_capacity(cx)),
            )
            .await;
            let Ok(Some(Ok(granted))) = granted else {
                break;
            };
            let n = granted.min(chunk.len());
            if stream.send_data(chunk.slice(..n), false).is_err() {
                break;
            }
            sent += n;
        }
        held.push((response, stream));
        peak = peak.max(rss(pid)?);
        ensure!(
            peak <= baseline + RSS_BOUND,
            "after {opened} half-sent Attest messages the issuer's RSS grew from {} MiB to {} MiB \
             (bound: +{} MiB)",
            baseline >> 20,
            peak >> 20,
            RSS_BOUND >> 20
        );
    }
    // With the attack connection still open, a real agent attests and an EST client is
    // answered.
    attest_node(&issuer)
        .await
        .context("attesting during the attack")?;
    let cacerts = {
        let issuer = issuer.clone();
        tokio::task::spawn_blocking(move || curl(&issuer, &["/.well-known/est/cacerts"])).await??
    };
    ensure!(cacerts.status == 200, "cacerts answered {}", cacerts.status);
    peak = peak.max(rss(pid)?);
    ensure!(
        peak <= baseline + RSS_BOUND,
        "the issuer's RSS grew from {} MiB to {} MiB (bound: +{} MiB)",
        baseline >> 20,
        peak >> 20,
        RSS_BOUND >> 20
    );
    eprintln!(
        "{opened} streams opened; RSS {} MiB before, peak {} MiB",
        baseline >> 20,
        peak >> 20
    );
    drop(held);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_cannot_take_every_slot() -> Result<()> {
    /// Above the agent API's default per-source cap (64): without the cap, one source
    /// fills the table with work that is never shed.
    const MAX_CONNECTIONS: usize = 80;
    const ATTEMPTS: usize = MAX_CONNECTIONS;
    let issuer = Arc::new(issuer_with_max_connections(MAX_CONNECTIONS)?);
    let addr = issuer.agent_api_addr()?;
    // An attested node: its requests are authenticated work, never shed while in progress.
    let identity = attest_node(&issuer).await?;
    let config = plant_tests::tls_client_config(&issuer, Some(identity), b"h2")?;
    let hog = Ipv4Addr::new(127, 0, 0, 2);
    let crowd = async {
        let mut held = Vec::new();
        let mut refused = 0;
        for _ in 0..ATTEMPTS {
            let opened = async {
                let mut send = h2_connect(hog, addr, config.clone()).await?;
                let stream = silent_attest(&mut send).await?;
                anyhow::Ok((send, stream))
            };
            match opened.await {
                Ok(stream) => held.push(stream),
                Err(_) => refused += 1,
            }
        }
        anyhow::Ok((held, refused))
    };
    let (held, refused) = tokio::time::timeout(HANG_GUARD, crowd)
        .await
        .context("opening connections from one source hung")??;
    eprintln!(
        "one source: {} connections held, {refused} refused",
        held.len()
    );
    ensure!(
        refused > 0 && held.len() < ATTEMPTS,
        "one source held all {} of its connections busy (max_connections = {MAX_CONNECTIONS})",
        held.len()
    );
    // Another host still gets in.
    let (_agent, node) = agent_attests(&issuer).await?;
    eprintln!("attested as {node}");
    drop(held);
    Ok(())
}
