//! `proxy_bench`: the PLC proxy's DESIGN §8 budget ("Modbus request/response through mTLS on
//! loopback adds < 100 µs p50, < 500 µs p99 over direct TCP"). `scripts/bench proxy` runs it
//! with release binaries; it prints a table for people and one `RESULT …` line per setup for
//! scripts, and never judges the figures beyond printing meets/misses.
//!
//! Setups, measured side by side in one run against one PLC:
//! - direct: the client connects to the PLC;
//! - proxies: client → outbound proxy (agent A, identity hmi-1) → mTLS → inbound proxy
//!   (gateway agent B, identity press-7, Modbus policy read-write for hmi-1) → PLC;
//! - stunnel: client → stunnel client mode (client certificate, verifyChain) → mTLS →
//!   stunnel server mode (requires and verifies the client certificate) → PLC, with P-256
//!   certificates from the same issuer (EST enrollment), the proxies' key type;
//! - inbound: one hop of ours, client → stunnel client mode (with an X509-SVID that agent
//!   A's Workload API serves this process) → mTLS → inbound proxy (agent B) → PLC.
//!
//! The PLC is a minimal Modbus/TCP server in this process (FC 3 reads, FC 16 writes), on its
//! own thread, so that it adds next to nothing: a Python PLC would dominate the figures.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};

const PLC_ID: &str = "spiffe://plant.example/plc/press-7";
const HMI_ID: &str = "spiffe://plant.example/scada/hmi-1";
/// The workload identity of setup "inbound" (its stunnel client), let in by the inbound proxy.
const BENCH_ID: &str = "spiffe://plant.example/scada/bench";
/// The largest FC 3 read and FC 16 write (Modbus Application Protocol v1.1b3 §6.3, §6.12):
/// the read's answer and the write's request are 259-byte frames, a PDU of 252 bytes.
const MAX_READ: u16 = 125;
const MAX_WRITE: u16 = 123;
/// The PLC's holding registers.
const REGISTERS: usize = 10_000;

#[derive(Debug, Parser)]
#[command(
    name = "proxy_bench",
    about = "Modbus/TCP latency and throughput: direct, through the PLC proxies, through stunnel (DESIGN §8)"
)]
struct Args {
    /// Sequential FC 3 reads (10 registers) on one connection, per setup.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Unmeasured reads before them (connection set up, caches warm).
    #[arg(long, default_value_t = 500)]
    warmup: usize,
    /// Connections of the throughput run.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests each connection keeps in flight (sent together, then their answers read).
    #[arg(long, default_value_t = 16)]
    pipeline: usize,
    /// Seconds of the throughput run, per setup.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Which setups to measure, comma separated: direct, proxies, stunnel, inbound.
    #[arg(
        long,
        default_value = "direct,proxies,stunnel,inbound",
        value_delimiter = ','
    )]
    setups: Vec<String>,
    /// The stunnel program (Debian: stunnel4).
    #[arg(long, default_value = "stunnel4")]
    stunnel: PathBuf,
}

fn main() -> Result<()> {
    let args = Args::parse();
    for setup in &args.setups {
        ensure!(
            matches!(setup.as_str(), "direct" | "proxies" | "stunnel" | "inbound"),
            "unknown setup {setup:?} (direct, proxies, stunnel, inbound)"
        );
    }
    ensure!(args.requests > 0, "--requests must be at least 1");
    ensure!(
        args.connections > 0 && args.pipeline > 0,
        "--connections and --pipeline must be at least 1"
    );
    ensure!(args.seconds > 0.0, "--seconds must be above 0");
    let plc = plc::start()?;
    println!("PLC (in process, FC 3 and FC 16) at {plc}");

    // Each setup's address; what it needs (issuer, agents, stunnel) lives until the end.
    // (key as in --setups and RESULT lines, name in the table, address the client uses,
    // the processes doing the wrapping, whose CPU time is measured)
    let mut setups: Vec<(&str, &str, SocketAddr, Vec<u32>)> = Vec::new();
    let mut keep = Vec::<Box<dyn std::any::Any>>::new();
    let needs_issuer = args.setups.iter().any(|s| s != "direct");
    let issuer = if needs_issuer {
        let issuer = plant_tests::Issuer::start().context("starting the issuer")?;
        println!("issuer at {}", issuer.url);
        Some(issuer)
    } else {
        None
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Both agents, once started (setups "proxies" and "inbound" share them).
    let mut agents: Option<proxies::Proxies> = None;
    for setup in &args.setups {
        if matches!(setup.as_str(), "proxies" | "inbound") && agents.is_none() {
            let issuer = issuer.as_ref().context("no issuer")?;
            agents = Some(proxies::start(issuer, plc)?);
        }
        match setup.as_str() {
            "direct" => setups.push(("direct", "direct TCP", plc, Vec::new())),
            "proxies" => {
                let agents = agents.as_ref().context("no agents")?;
                let address = agents.outbound;
                runtime.block_on(wait_until_answering(address, "the proxies"))?;
                println!("proxies: outbound {address} → inbound → PLC");
                setups.push((
                    "proxies",
                    "our proxies (A out → B in)",
                    address,
                    agents.pids(),
                ));
            }
            "inbound" => {
                let issuer = issuer.as_ref().context("no issuer")?;
                let agents = agents.as_ref().context("no agents")?;
                let svid = runtime.block_on(proxies::workload_svid(&agents.client.socket))?;
                let (address, tunnel) =
                    stunnel::start_client(issuer, &args.stunnel, &svid, agents.inbound)?;
                runtime.block_on(wait_until_answering(address, "stunnel → inbound proxy"))?;
                println!("inbound: stunnel client {address} → inbound → PLC");
                let pids = [agents.gateway.pid(), Some(tunnel.1.pid())];
                let pids = pids.into_iter().flatten().collect();
                setups.push(("inbound", "stunnel → our inbound (B)", address, pids));
                keep.push(Box::new(tunnel));
            }
            "stunnel" => {
                let issuer = issuer.as_ref().context("no issuer")?;
                let (address, tunnels) = stunnel::start(issuer, &args.stunnel, plc)?;
                runtime.block_on(wait_until_answering(address, "stunnel"))?;
                println!("stunnel: client {address} → server → PLC");
                let pids = vec![tunnels.1.pid(), tunnels.2.pid()];
                setups.push(("stunnel", "stunnel (client → server)", address, pids));
                keep.push(Box::new(tunnels));
            }
            _ => {}
        }
    }

    let mut results = Vec::new();
    for (key, name, address, _) in &setups {
        let latency = runtime
            .block_on(measure_latency(*address, args.warmup, args.requests))
            .with_context(|| format!("latency through {name}"))?;
        println!(
            "{name}: p50 {:.1} µs, p99 {:.1} µs",
            latency.p50_us, latency.p99_us
        );
        results.push((*key, *name, latency));
    }
    let mut rates = Vec::new();
    let clock_ticks = clock_ticks_per_second();
    for (_, name, address, pids) in &setups {
        let cpu_before = cpu_seconds(pids, clock_ticks);
        let rate = runtime
            .block_on(measure_throughput(
                *address,
                args.connections,
                args.pipeline,
                Duration::from_secs_f64(args.seconds),
            ))
            .with_context(|| format!("throughput through {name}"))?;
        let rate = rate.with_cpu(pids, cpu_before.zip(cpu_seconds(pids, clock_ticks)));
        println!(
            "{name}: {:.0} requests/s, {:.1} MB/s",
            rate.requests_per_sec, rate.megabytes_per_sec
        );
        rates.push(rate);
    }
    report(&args, &results, &rates);
    drop(keep);
    drop(agents);
    drop(issuer);
    Ok(())
}

// --- the PLC ---------------------------------------------------------------------------------

mod plc {
    use super::*;

    /// Starts the PLC on its own thread; returns its address.
    pub fn start() -> Result<SocketAddr> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        std::thread::Builder::new()
            .name("plc".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(error) => {
                        eprintln!("PLC: no runtime: {error}");
                        return;
                    }
                };
                runtime.block_on(async move {
                    let listener = match TcpListener::from_std(listener) {
                        Ok(listener) => listener,
                        Err(error) => {
                            eprintln!("PLC: {error}");
                            return;
                        }
                    };
                    while let Ok((stream, _)) = listener.accept().await {
                        tokio::spawn(async move {
                            // A session ends when the peer closes; errors end it too.
                            let _ = serve(stream).await;
                        });
                    }
                });
            })?;
        Ok(address)
    }

    /// One session: answers every frame, flushing when no further request is buffered, so
    /// pipelined requests get their answers in one write and a lone request at once.
    async fn serve(stream: TcpStream) -> Result<()> {
        stream.set_nodelay(true)?;
        let (read, mut write) = stream.into_split();
        let mut read = BufReader::with_capacity(64 * 1024, read);
        let mut registers = vec![0u16; REGISTERS];
        for (i, r) in registers.iter_mut().enumerate() {
            *r = i as u16;
        }
        let mut out = Vec::with_capacity(64 * 1024);
        let mut header = [0u8; 7];
        let mut pdu = [0u8; 254];
        loop {
            if read.buffer().is_empty() && !out.is_empty() {
                write.write_all(&out).await?;
                out.clear();
            }
            if read.fill_buf().await?.is_empty() {
                return Ok(());
            }
            read.read_exact(&mut header).await?;
            let length = usize::from(u16::from_be_bytes([header[4], header[5]]));
            ensure!(
                header[2..4] == [0, 0] && (2..=254).contains(&length),
                "bad MBAP header"
            );
            let pdu = &mut pdu[..length - 1];
            read.read_exact(pdu).await?;
            answer(&header, pdu, &mut registers, &mut out);
        }
    }

    /// Appends the answer to one request to `out`.
    pub fn answer(header: &[u8; 7], pdu: &[u8], registers: &mut [u16], out: &mut Vec<u8>) {
        let start = out.len();
        out.extend_from_slice(&header[..4]);
        out.extend_from_slice(&[0, 0, header[6]]);
        let function = pdu.first().copied().unwrap_or(0);
        let field = |at: usize| {
            pdu.get(at..at + 2)
                .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        };
        let exception = match (function, field(1), field(3)) {
            (3, Some(address), Some(count)) => {
                if (1..=usize::from(MAX_READ)).contains(&count) && address + count <= REGISTERS {
                    out.extend_from_slice(&[3, (count * 2) as u8]);
                    for value in &registers[address..address + count] {
                        out.extend_from_slice(&value.to_be_bytes());
                    }
                    None
                } else {
                    Some(2)
                }
            }
            (16, Some(address), Some(count)) => {
                let values = pdu.get(6..);
                match values {
                    Some(values)
                        if (1..=usize::from(MAX_WRITE)).contains(&count)
                            && address + count <= REGISTERS
                            && values.len() == count * 2 =>
                    {
                        for (register, pair) in registers[address..address + count]
                            .iter_mut()
                            .zip(values.chunks_exact(2))
                        {
                            *register = u16::from_be_bytes([pair[0], pair[1]]);
                        }
                        out.push(16);
                        out.extend_from_slice(&pdu[1..5]);
                        None
                    }
                    _ => Some(3),
                }
            }
            _ => Some(1),
        };
        if let Some(code) = exception {
            out.extend_from_slice(&[function | 0x80, code]);
        }
        let length = (out.len() - start - 6) as u16;
        out[start + 4..start + 6].copy_from_slice(&length.to_be_bytes());
    }
}

// --- the client ------------------------------------------------------------------------------

/// An FC 3 read request frame.
fn read_request(transaction: u16, address: u16, count: u16) -> Vec<u8> {
    let mut frame = Vec::with_capacity(12);
    frame.extend_from_slice(&transaction.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 6, 1, 3]);
    frame.extend_from_slice(&address.to_be_bytes());
    frame.extend_from_slice(&count.to_be_bytes());
    frame
}

/// An FC 16 write request frame of `count` registers.
fn write_request(transaction: u16, address: u16, count: u16) -> Vec<u8> {
    let bytes = count * 2;
    let mut frame = Vec::with_capacity(13 + usize::from(bytes));
    frame.extend_from_slice(&transaction.to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&(7 + bytes).to_be_bytes());
    frame.extend_from_slice(&[1, 16]);
    frame.extend_from_slice(&address.to_be_bytes());
    frame.extend_from_slice(&count.to_be_bytes());
    frame.push(bytes as u8);
    for i in 0..count {
        frame.extend_from_slice(&i.wrapping_mul(7).to_be_bytes());
    }
    frame
}

/// Reads one answer frame; checks its transaction id and that it is no exception. Returns its
/// size in bytes.
async fn read_answer(
    stream: &mut (impl AsyncReadExt + Unpin),
    transaction: u16,
    function: u8,
    buffer: &mut [u8; 260],
) -> Result<usize> {
    stream
        .read_exact(&mut buffer[..7])
        .await
        .context("the connection closed before the answer")?;
    let length = usize::from(u16::from_be_bytes([buffer[4], buffer[5]]));
    ensure!((2..=254).contains(&length), "bad answer length {length}");
    stream.read_exact(&mut buffer[7..6 + length]).await?;
    let got = u16::from_be_bytes([buffer[0], buffer[1]]);
    ensure!(
        got == transaction,
        "answer to transaction {got}, expected {transaction}"
    );
    ensure!(
        buffer[7] == function,
        "answer function {:#04x} (exception code {}), expected {function}",
        buffer[7],
        buffer[8]
    );
    Ok(6 + length)
}

async fn connect(address: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(address)
        .await
        .with_context(|| format!("connecting to {address}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Retries one read through `address` until it is answered (the proxies fetch their
/// certificates after start, stunnel binds after it is spawned), at most 60 s.
async fn wait_until_answering(address: SocketAddr, what: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut buffer = [0u8; 260];
    loop {
        let attempt = async {
            let mut stream = connect(address).await?;
            stream.write_all(&read_request(1, 0, 1)).await?;
            tokio::time::timeout(
                Duration::from_secs(5),
                read_answer(&mut stream, 1, 3, &mut buffer),
            )
            .await
            .context("no answer within 5 s")??;
            anyhow::Ok(())
        };
        match attempt.await {
            Ok(()) => return Ok(()),
            Err(error) if Instant::now() > deadline => {
                bail!("{what} did not answer a Modbus read within 60 s: {error:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Latency {
    requests: usize,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
}

/// Sequential FC 3 reads of 10 registers on one connection: each request sent when the
/// previous answer is in.
async fn measure_latency(address: SocketAddr, warmup: usize, requests: usize) -> Result<Latency> {
    let mut stream = connect(address).await?;
    let mut buffer = [0u8; 260];
    let mut samples = Vec::with_capacity(requests);
    for i in 0..warmup + requests {
        let transaction = i as u16;
        let frame = read_request(transaction, (i % 100) as u16, 10);
        let started = Instant::now();
        stream.write_all(&frame).await?;
        read_answer(&mut stream, transaction, 3, &mut buffer).await?;
        if i >= warmup {
            samples.push(started.elapsed().as_nanos() as u64);
        }
    }
    samples.sort_unstable();
    Ok(Latency {
        requests,
        p50_us: percentile_us(&samples, 50.0),
        p99_us: percentile_us(&samples, 99.0),
        max_us: samples.last().map_or(0.0, |ns| *ns as f64 / 1000.0),
    })
}

/// The nearest-rank percentile of sorted nanoseconds, in µs.
fn percentile_us(sorted_ns: &[u64], percent: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let rank = (percent / 100.0 * sorted_ns.len() as f64).ceil() as usize;
    sorted_ns[rank.clamp(1, sorted_ns.len()) - 1] as f64 / 1000.0
}

#[derive(Debug, Clone, Copy)]
struct Throughput {
    requests: u64,
    seconds: f64,
    requests_per_sec: f64,
    megabytes_per_sec: f64,
    /// CPU seconds the wrapping processes used per wall second, and per request in µs.
    cpu: Option<(f64, f64)>,
}

impl Throughput {
    /// With the CPU time `pids` used over the run, from (before, after) in seconds.
    fn with_cpu(self, pids: &[u32], cpu: Option<(f64, f64)>) -> Self {
        let cpu = cpu.filter(|_| !pids.is_empty()).map(|(before, after)| {
            let used = after - before;
            (
                used / self.seconds,
                used * 1e6 / (self.requests.max(1) as f64),
            )
        });
        Self { cpu, ..self }
    }
}

/// Clock ticks per second of /proc/PID/stat's times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|out| String::from_utf8_lossy(&out.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// User + system CPU seconds `pids` have used so far (all threads), or `None` if one of them
/// can't be read (it exited).
fn cpu_seconds(pids: &[u32], ticks_per_second: f64) -> Option<f64> {
    let mut ticks = 0.0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The fields after the ")" closing the command name: utime and stime are the 12th and
        // 13th (fields 14 and 15 of the whole line).
        let rest = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        ticks += fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    }
    Some(ticks / ticks_per_second)
}

/// `connections` connections, each sending `pipeline` requests at once (FC 3 reads of 125
/// registers and FC 16 writes of 123 alternately: the largest frames both ways) and then
/// reading their answers, for `duration`. Bytes count both directions.
async fn measure_throughput(
    address: SocketAddr,
    connections: usize,
    pipeline: usize,
    duration: Duration,
) -> Result<Throughput> {
    let started = Instant::now();
    let deadline = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..connections {
        tasks.spawn(async move {
            let mut stream = connect(address).await?;
            let mut buffer = [0u8; 260];
            let (mut requests, mut bytes) = (0u64, 0u64);
            let mut transaction = 0u16;
            let mut batch = Vec::new();
            while Instant::now() < deadline {
                batch.clear();
                let first = transaction;
                for i in 0..pipeline {
                    let id = first.wrapping_add(i as u16);
                    if i % 2 == 0 {
                        batch.extend_from_slice(&read_request(id, 0, MAX_READ));
                    } else {
                        batch.extend_from_slice(&write_request(id, 200, MAX_WRITE));
                    }
                }
                stream.write_all(&batch).await?;
                bytes += batch.len() as u64;
                for i in 0..pipeline {
                    let id = first.wrapping_add(i as u16);
                    let function = if i % 2 == 0 { 3 } else { 16 };
                    bytes += read_answer(&mut stream, id, function, &mut buffer).await? as u64;
                }
                requests += pipeline as u64;
                transaction = first.wrapping_add(pipeline as u16);
            }
            anyhow::Ok((requests, bytes))
        });
    }
    let (mut requests, mut bytes) = (0u64, 0u64);
    while let Some(outcome) = tasks.join_next().await {
        let (r, b) = outcome??;
        requests += r;
        bytes += b;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Throughput {
        requests,
        seconds,
        requests_per_sec: requests as f64 / seconds,
        megabytes_per_sec: bytes as f64 / seconds / 1e6,
        cpu: None,
    })
}

// --- the setups ------------------------------------------------------------------------------

mod proxies {
    use super::*;
    use plant_tests::{Agent, Issuer, JOIN_TOKEN_ATTESTATION};

    /// Both agents and their proxies' addresses.
    pub struct Proxies {
        /// Agent A's outbound proxy (hmi-1).
        pub outbound: SocketAddr,
        /// Agent B's inbound proxy (press-7).
        pub inbound: SocketAddr,
        pub gateway: Agent,
        pub client: Agent,
    }

    impl Proxies {
        pub fn pids(&self) -> Vec<u32> {
            [self.gateway.pid(), self.client.pid()]
                .into_iter()
                .flatten()
                .collect()
        }
    }

    /// Gateway agent B (inbound proxy for press-7 in front of the PLC) and agent A (outbound
    /// proxy for hmi-1 to B, and a workload entry for this process's uid as `BENCH_ID`).
    pub fn start(issuer: &Issuer, plc: SocketAddr) -> Result<Proxies> {
        let inbound = format!(
            "[[proxy.inbound]]\ndevice = \"press-7\"\nspiffe_id = \"{PLC_ID}\"\nlisten = \"127.0.0.1:0\"\nupstream = \"{plc}\"\nprotocol = \"modbus\"\nallow = [\n  {{ spiffe_id = \"{HMI_ID}\", access = \"read-write\" }},\n  {{ spiffe_id = \"{BENCH_ID}\", access = \"read-write\" }},\n]\n"
        );
        let token = issuer.join_token()?;
        let mut gateway = Agent::start_with_config(
            issuer,
            JOIN_TOKEN_ATTESTATION,
            &[("join.token", &token)],
            &inbound,
        )
        .context("starting the gateway agent (inbound proxy)")?;
        let gateway_node = gateway.node_id()?;
        issuer.create_entry(PLC_ID, &gateway_node, &["legacy:device:press-7"], &[])?;
        let inbound_address = gateway.proxy_address("press-7")?;

        let outbound = format!(
            "[[proxy.outbound]]\ndevice = \"hmi-1\"\nspiffe_id = \"{HMI_ID}\"\nlisten = \"127.0.0.1:0\"\ngateway = \"{inbound_address}\"\nserver_spiffe_id = \"{PLC_ID}\"\n"
        );
        let token = issuer.join_token()?;
        let mut client = Agent::start_with_config(
            issuer,
            JOIN_TOKEN_ATTESTATION,
            &[("join.token", &token)],
            &outbound,
        )
        .context("starting the client agent (outbound proxy)")?;
        let client_node = client.node_id()?;
        issuer.create_entry(HMI_ID, &client_node, &["legacy:device:hmi-1"], &[])?;
        let uid = format!("unix:uid:{}", plant_tests::own_uid()?);
        issuer.create_entry(BENCH_ID, &client_node, &[&uid], &[])?;
        let outbound = client.proxy_address("hmi-1")?;
        Ok(Proxies {
            outbound,
            inbound: inbound_address,
            gateway,
            client,
        })
    }

    /// An X509-SVID for `BENCH_ID` from the Workload API at `socket`: (chain DER, leaf
    /// first; PKCS#8 key DER). Waits up to 60 s for the entry to reach the agent.
    pub async fn workload_svid(socket: &Path) -> Result<(Vec<Vec<u8>>, Vec<u8>)> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let attempt = async {
                let mut client = plant_tests::workload_client(socket).await?;
                let mut stream = client
                    .fetch_x509svid(plant_tests::x509_request(true))
                    .await?
                    .into_inner();
                let message = stream.message().await?.context("no message")?;
                let svid = message
                    .svids
                    .into_iter()
                    .find(|svid| svid.spiffe_id == BENCH_ID)
                    .context("no SVID for the bench yet")?;
                anyhow::Ok((split_der(&svid.x509_svid)?, svid.x509_svid_key))
            };
            match attempt.await {
                Ok(svid) => return Ok(svid),
                Err(error) if Instant::now() > deadline => {
                    bail!("no X509-SVID for {BENCH_ID} within 60 s: {error:#}")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Concatenated DER certificates (the Workload API's `x509_svid`) one by one.
    pub fn split_der(mut bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
        let mut certificates = Vec::new();
        while !bytes.is_empty() {
            ensure!(bytes.len() >= 2 && bytes[0] == 0x30, "not a DER SEQUENCE");
            // Definite lengths only (DER): short form, or 0x8N and N big-endian length bytes.
            let (header, length) = match bytes[1] {
                short @ 0..=0x7f => (2, usize::from(short)),
                long @ 0x81..=0x84 => {
                    let count = usize::from(long & 0x7f);
                    let digits = bytes.get(2..2 + count).context("truncated DER length")?;
                    let length = digits
                        .iter()
                        .fold(0usize, |acc, digit| (acc << 8) | usize::from(*digit));
                    (2 + count, length)
                }
                _ => bail!("unsupported DER length"),
            };
            let end = header + length;
            ensure!(bytes.len() >= end, "truncated DER certificate");
            certificates.push(bytes[..end].to_vec());
            bytes = &bytes[end..];
        }
        Ok(certificates)
    }
}

mod stunnel {
    use super::*;
    use plant_tests::Issuer;

    /// A stunnel process, stopped when dropped.
    pub struct Tunnel(Child);

    impl Tunnel {
        pub fn pid(&self) -> u32 {
            self.0.id()
        }
    }

    impl Drop for Tunnel {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// A server-mode stunnel in front of the PLC and a client-mode one in front of it, each
    /// with its own EST-enrolled P-256 certificate; returns the client's listen address.
    pub fn start(
        issuer: &Issuer,
        program: &Path,
        plc: SocketAddr,
    ) -> Result<(SocketAddr, (tempfile::TempDir, Tunnel, Tunnel))> {
        let dir = tempfile::tempdir()?;
        let root = issuer.root_pem();
        let server_port = free_port()?;
        let client_port = free_port()?;
        let server = config(
            issuer,
            dir.path(),
            "stunnel-plc",
            &root,
            &format!(
                "[plc]\naccept = 127.0.0.1:{server_port}\nconnect = {plc}\nrequireCert = yes\n"
            ),
        )?;
        let client = config(
            issuer,
            dir.path(),
            "stunnel-hmi",
            &root,
            &format!(
                "client = yes\n[plc]\naccept = 127.0.0.1:{client_port}\nconnect = 127.0.0.1:{server_port}\n"
            ),
        )?;
        let server = spawn(program, &server, dir.path(), "server")?;
        let client = spawn(program, &client, dir.path(), "client")?;
        Ok((
            SocketAddr::from(([127, 0, 0, 1], client_port)),
            (dir, server, client),
        ))
    }

    /// A client-mode stunnel to `inbound` (our inbound proxy) presenting `svid` (chain DER,
    /// PKCS#8 key DER) and verifying the proxy's chain up to the plant root.
    pub fn start_client(
        issuer: &Issuer,
        program: &Path,
        svid: &(Vec<Vec<u8>>, Vec<u8>),
        inbound: SocketAddr,
    ) -> Result<(SocketAddr, (tempfile::TempDir, Tunnel))> {
        use base64::Engine;
        let dir = tempfile::tempdir()?;
        let chain = dir.path().join("bench-svid.pem");
        plant_tests::write_pem(&chain, &svid.0)?;
        let key = dir.path().join("bench-svid.key");
        let text = base64::engine::general_purpose::STANDARD.encode(&svid.1);
        let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
        for line in text.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PRIVATE KEY-----\n");
        std::fs::write(&key, pem)?;
        let port = free_port()?;
        let file = write_config(
            dir.path(),
            "stunnel-svid",
            &chain,
            &key,
            &issuer.root_pem(),
            &format!("client = yes\n[plc]\naccept = 127.0.0.1:{port}\nconnect = {inbound}\n"),
        )?;
        let tunnel = spawn(program, &file, dir.path(), "svid-client")?;
        Ok((SocketAddr::from(([127, 0, 0, 1], port)), (dir, tunnel)))
    }

    /// Enrolls `name` over EST and writes its stunnel configuration; `service` is the
    /// mode-specific part. Both sides verify the peer's chain up to the plant root.
    fn config(
        issuer: &Issuer,
        dir: &Path,
        name: &str,
        root: &Path,
        service: &str,
    ) -> Result<PathBuf> {
        let (cert, key) = plant_tests::enroll_with_token(issuer, dir, name, "device")
            .with_context(|| format!("enrolling {name} for stunnel"))?;
        // Leaf first, then the issuing CA: the chain a peer needs to reach the root.
        let chain = dir.join(format!("{name}-chain.pem"));
        let mut text = std::fs::read_to_string(&cert)?;
        let leaf_blocks = plant_tests::pem_blocks(&text, "CERTIFICATE").len();
        if leaf_blocks < 2 {
            text.push_str(&std::fs::read_to_string(issuer.issuing_pem())?);
        }
        std::fs::write(&chain, text)?;
        write_config(dir, name, &chain, &key, root, service)
    }

    /// `dir/name.conf`: foreground, warnings only, `chain` and `key` presented, the peer's
    /// chain verified up to `root`, then `service`.
    fn write_config(
        dir: &Path,
        name: &str,
        chain: &Path,
        key: &Path,
        root: &Path,
        service: &str,
    ) -> Result<PathBuf> {
        let file = dir.join(format!("{name}.conf"));
        std::fs::write(
            &file,
            format!(
                "foreground = yes\npid =\ndebug = warning\nsyslog = no\ncert = {chain}\nkey = {key}\nCAfile = {root}\nverifyChain = yes\n{service}",
                chain = chain.display(),
                key = key.display(),
                root = root.display(),
            ),
        )?;
        Ok(file)
    }

    fn spawn(program: &Path, config: &Path, dir: &Path, name: &str) -> Result<Tunnel> {
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(program)
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Tunnel(child))
    }

    /// A port nothing listens on now (stunnel can't report the port of `:0`).
    fn free_port() -> Result<u16> {
        Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port())
    }
}

// --- the report ------------------------------------------------------------------------------

/// DESIGN §8: the proxies may add this much over direct TCP.
const BUDGET_ADDED_P50_US: f64 = 100.0;
const BUDGET_ADDED_P99_US: f64 = 500.0;

fn report(args: &Args, latencies: &[(&str, &str, Latency)], rates: &[Throughput]) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, usize::from);
    let direct = latencies
        .iter()
        .find(|(key, _, _)| *key == "direct")
        .map(|(_, _, l)| *l);
    println!();
    println!("Modbus/TCP on loopback; DESIGN §8 budget for the PLC proxy: adds < {BUDGET_ADDED_P50_US:.0} µs p50, < {BUDGET_ADDED_P99_US:.0} µs p99 over direct TCP");
    println!(
        "machine: {cores} cores, {cpu}; PLC, proxies or stunnel, issuer and this client share them"
    );
    println!(
        "latency: {} sequential FC 3 reads of 10 registers on one connection (after {} unmeasured)",
        latencies.first().map_or(0, |(_, _, l)| l.requests),
        args.warmup
    );
    println!(
        "throughput: {} connections × {} pipelined requests, FC 3 read {MAX_READ} / FC 16 write {MAX_WRITE} registers alternately, {} s; MB/s counts both directions",
        args.connections, args.pipeline, args.seconds
    );
    println!();
    println!(
        "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>8} {:>6} {:>9}",
        "setup",
        "p50 µs",
        "p99 µs",
        "max µs",
        "+p50 µs",
        "+p99 µs",
        "requests/s",
        "MB/s",
        "cores",
        "CPU µs/rq"
    );
    for ((_, name, latency), rate) in latencies.iter().zip(rates) {
        let added = |value: f64, base: Option<f64>| {
            base.map_or("-".to_owned(), |b| format!("{:+.1}", value - b))
        };
        let (cores, per_request) = rate.cpu.map_or(("-".to_owned(), "-".to_owned()), |(c, r)| {
            (format!("{c:.2}"), format!("{r:.1}"))
        });
        println!(
            "{:<28} {:>9.1} {:>9.1} {:>9.1} {:>9} {:>9} {:>10.0} {:>8.1} {:>6} {:>9}",
            name,
            latency.p50_us,
            latency.p99_us,
            latency.max_us,
            added(latency.p50_us, direct.map(|d| d.p50_us)),
            added(latency.p99_us, direct.map(|d| d.p99_us)),
            rate.requests_per_sec,
            rate.megabytes_per_sec,
            cores,
            per_request
        );
    }
    println!("cores, CPU µs/rq: CPU time of the wrapping processes (both agents, both stunnels, or agent B and");
    println!("  the stunnel client) in the throughput run, per wall second and per request; PLC and client not counted");
    println!();
    let proxies = latencies
        .iter()
        .find(|(key, _, _)| *key == "proxies")
        .map(|(_, _, l)| *l);
    match (direct, proxies) {
        (Some(direct), Some(proxies)) => {
            let added_p50 = proxies.p50_us - direct.p50_us;
            let added_p99 = proxies.p99_us - direct.p99_us;
            let verdict = if added_p50 < BUDGET_ADDED_P50_US && added_p99 < BUDGET_ADDED_P99_US {
                "meets"
            } else {
                "misses"
            };
            println!(
                "budget: our proxies add < {BUDGET_ADDED_P50_US:.0} µs p50, < {BUDGET_ADDED_P99_US:.0} µs p99 over direct TCP: {verdict} (+{added_p50:.1} µs p50, +{added_p99:.1} µs p99; two TLS hops, the budget's one mTLS link has a proxy at each end)"
            );
        }
        _ => println!("budget: not judged (needs both the direct and the proxies setup)"),
    }
    for ((key, _, latency), rate) in latencies.iter().zip(rates) {
        println!(
            "RESULT setup={} p50_us={:.1} p99_us={:.1} max_us={:.1} requests_per_sec={:.0} mb_per_sec={:.1} cores={} cpu_us_per_request={}",
            key,
            latency.p50_us,
            latency.p99_us,
            latency.max_us,
            rate.requests_per_sec,
            rate.megabytes_per_sec,
            rate.cpu.map_or("?".to_owned(), |(c, _)| format!("{c:.2}")),
            rate.cpu.map_or("?".to_owned(), |(_, r)| format!("{r:.1}"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame_answer(request: &[u8], registers: &mut [u16]) -> Vec<u8> {
        let header: [u8; 7] = request[..7].try_into().expect("header");
        let mut out = Vec::new();
        plc::answer(&header, &request[7..], registers, &mut out);
        out
    }

    #[test]
    fn the_plc_answers_a_read_with_the_registers() {
        let mut registers: Vec<u16> = (0..REGISTERS as u16).collect();
        let out = frame_answer(&read_request(7, 4, 2), &mut registers);
        assert_eq!(out, [0, 7, 0, 0, 0, 7, 1, 3, 4, 0, 4, 0, 5]);
    }

    #[test]
    fn the_plc_stores_a_write_and_echoes_its_range() {
        let mut registers = vec![0u16; REGISTERS];
        let out = frame_answer(&write_request(9, 200, 3), &mut registers);
        assert_eq!(out, [0, 9, 0, 0, 0, 6, 1, 16, 0, 200, 0, 3]);
        assert_eq!(&registers[200..203], &[0, 7, 14]);
    }

    #[test]
    fn the_plc_refuses_other_functions_and_bad_ranges() {
        let mut registers = vec![0u16; REGISTERS];
        let diagnostics = [0, 1, 0, 0, 0, 6, 1, 8, 0, 0, 0, 0];
        assert_eq!(
            frame_answer(&diagnostics, &mut registers),
            [0, 1, 0, 0, 0, 3, 1, 0x88, 1]
        );
        let too_many = read_request(2, 0, MAX_READ + 1);
        assert_eq!(
            frame_answer(&too_many, &mut registers),
            [0, 2, 0, 0, 0, 3, 1, 0x83, 2]
        );
    }

    #[test]
    fn the_largest_read_answer_and_write_request_are_259_bytes() {
        let mut registers = vec![0u16; REGISTERS];
        assert_eq!(
            frame_answer(&read_request(1, 0, MAX_READ), &mut registers).len(),
            259
        );
        assert_eq!(write_request(1, 0, MAX_WRITE).len(), 259);
    }

    #[test]
    fn concatenated_der_certificates_split_at_their_lengths() -> Result<()> {
        let short = vec![0x30, 0x03, 1, 2, 3];
        let mut long = vec![0x30, 0x81, 0x80];
        long.extend([7u8; 0x80]);
        let joined = [short.clone(), long.clone()].concat();
        assert_eq!(proxies::split_der(&joined)?, vec![short, long]);
        assert!(proxies::split_der(&joined[..joined.len() - 1]).is_err());
        assert!(proxies::split_der(&[0x04, 0x00]).is_err());
        Ok(())
    }

    #[test]
    fn percentile_uses_the_nearest_rank() {
        let sorted: Vec<u64> = (1..=100).map(|us| us * 1000).collect();
        assert_eq!(percentile_us(&sorted, 50.0), 50.0);
        assert_eq!(percentile_us(&sorted, 99.0), 99.0);
        assert_eq!(percentile_us(&[], 99.0), 0.0);
    }
}
