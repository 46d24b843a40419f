//! `agent_load`: the agent's side of the DESIGN §8 speed budgets. `scripts/bench agent` runs
//! it; like `est_load` it prints a summary for people and one `RESULT key=value …` line for
//! scripts, and never judges the figures.
//!
//! - `entries`: registration entries for an attested agent's node through the issuer's admin
//!   gRPC (much faster than one `issuer entry create` process each), then waits until the
//!   agent's status.json shows an X509-SVID for every one of them.
//! - `workload`: concurrent Workload API clients calling FetchX509SVID, timing each call from
//!   the request to the first stream message; a new connection per call (a workload starting
//!   up) or one kept connection per client.
//! - `mint`: MintX509Svids with the agent's persisted node identity, as fast as the issuer
//!   answers: SVIDs minted per second.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "agent_load",
    about = "Load and measurements for the agent (DESIGN §8)"
)]
struct Args {
    /// Tokio worker threads (default: one per core).
    #[arg(long, global = true)]
    threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create entries for the agent's node and wait until it holds an SVID for each.
    Entries {
        /// The issuer's admin socket (`<issuer state>/admin.sock`).
        #[arg(long)]
        admin_socket: PathBuf,
        /// The agent's status.json (`<agent state_dir>/status.json`).
        #[arg(long)]
        status: PathBuf,
        /// Entries to create.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// The uid in entry 0's selector (`unix:uid:<uid>`): the Workload API clients run as
        /// this user. The other entries get uids nobody on the machine has.
        #[arg(long)]
        uid: u32,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Concurrent FetchX509SVID calls; latency to the first message.
    Workload {
        /// The agent's Workload API socket.
        #[arg(long)]
        socket: PathBuf,
        /// Concurrent clients.
        #[arg(long, default_value_t = 100)]
        clients: usize,
        /// How long to run.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// A new connection per call, or one kept connection per client.
        #[arg(long, value_enum, default_value_t = Mode::NewConnection)]
        mode: Mode,
        /// Each client calls once every this many ms, the clients' schedules spread evenly
        /// over the interval (0: back to back, the saturation case).
        #[arg(long, default_value_t = 0)]
        interval_ms: u64,
    },
    /// MintX509Svids with the agent's node identity, as fast as the issuer answers.
    Mint {
        /// The agent's state_dir (node-svid.pem, node-key.pem).
        #[arg(long)]
        agent_state: PathBuf,
        /// The issuer's agent API, `https://host:port` (its state/agent_api.url).
        #[arg(long)]
        server: String,
        /// The plant root CA (PEM).
        #[arg(long)]
        bundle: PathBuf,
        /// How long to run.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// CSRs per call (the agent sends 100).
        #[arg(long, default_value_t = 100)]
        batch: usize,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Connect, call, disconnect: a workload starting up.
    NewConnection,
    /// One connection per client, a new stream per call.
    KeepAlive,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::NewConnection => "new-connection",
            Mode::KeepAlive => "keep-alive",
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    runtime.enable_all();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads.max(1));
    }
    let runtime = runtime.build()?;
    runtime.block_on(async move {
        match args.command {
            Command::Entries {
                admin_socket,
                status,
                count,
                uid,
                timeout,
            } => {
                entries(
                    &admin_socket,
                    &status,
                    count,
                    uid,
                    Duration::from_secs(timeout),
                )
                .await
            }
            Command::Workload {
                socket,
                clients,
                seconds,
                mode,
                interval_ms,
            } => {
                workload(
                    &socket,
                    clients.max(1),
                    Duration::from_secs_f64(seconds),
                    mode,
                    Duration::from_millis(interval_ms),
                )
                .await
            }
            Command::Mint {
                agent_state,
                server,
                bundle,
                seconds,
                batch,
                concurrency,
            } => {
                mint(
                    &agent_state,
                    &server,
                    &bundle,
                    Duration::from_secs_f64(seconds),
                    batch.max(1),
                    concurrency.max(1),
                )
                .await
            }
        }
    })
}

// --- entries -------------------------------------------------------------------------------

/// Admin calls in flight at once while creating entries.
const CREATE_CONCURRENCY: usize = 8;

async fn entries(
    admin_socket: &Path,
    status: &Path,
    count: usize,
    uid: u32,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let (node, trust_domain) = loop {
        if let Some(status) = read_status(status) {
            if let Some(node) = status["node"]["spiffe_id"].as_str() {
                let trust_domain = status["trust_domain"]
                    .as_str()
                    .context("status.json names no trust_domain")?
                    .to_owned();
                break (node.to_owned(), trust_domain);
            }
        }
        ensure!(
            Instant::now() < deadline,
            "the agent did not attest (no node in {})",
            status.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let channel = plant_tests::unix_channel(admin_socket)
        .await
        .with_context(|| format!("connecting to {}", admin_socket.display()))?;
    let client = proto::admin::entries_client::EntriesClient::new(channel);

    let started = Instant::now();
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CREATE_CONCURRENCY {
        let (mut client, next, node, trust_domain) = (
            client.clone(),
            Arc::clone(&next),
            node.clone(),
            trust_domain.clone(),
        );
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                if i >= count {
                    return Ok::<_, anyhow::Error>(());
                }
                // Entry 0 is the bench's own uid; the others name uids far above any real one.
                let selector_uid = if i == 0 { uid } else { 2_000_000 + i as u32 };
                client
                    .create(proto::admin::CreateEntryRequest {
                        spiffe_id: format!("spiffe://{trust_domain}/bench/workload-{i}"),
                        parent_id: node.clone(),
                        selectors: vec![format!("unix:uid:{selector_uid}")],
                        ..Default::default()
                    })
                    .await
                    .with_context(|| format!("creating entry {i}"))?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let created = started.elapsed();
    println!(
        "agent_load: {count} entries for {node} created in {:.2} s",
        created.as_secs_f64()
    );

    let mut last_report = Instant::now();
    let held = loop {
        let held = read_status(status).map_or(0, |s| svids_held(&s));
        if held >= count {
            break held;
        }
        ensure!(
            Instant::now() < deadline,
            "the agent holds {held} of {count} SVIDs after {} s",
            timeout.as_secs()
        );
        if last_report.elapsed() > Duration::from_secs(5) {
            println!("  … the agent holds {held} of {count} SVIDs");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let synced = started.elapsed();
    println!(
        "  the agent holds {held} SVIDs {:.2} s after the first entry was created",
        synced.as_secs_f64()
    );
    println!(
        "RESULT entries={count} create_seconds={:.3} svids={held} all_svids_seconds={:.3}",
        created.as_secs_f64(),
        synced.as_secs_f64()
    );
    Ok(())
}

/// status.json, or None while it is missing or being replaced.
fn read_status(path: &Path) -> Option<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Entries in status.json with an X509-SVID.
fn svids_held(status: &serde_json::Value) -> usize {
    status["entries"]
        .as_array()
        .map_or(0, |e| e.iter().filter(|e| e["svid"].is_object()).count())
}

// --- workload ------------------------------------------------------------------------------

/// The figures of one run.
#[derive(Debug, Default)]
struct Report {
    latencies_us: Vec<u32>,
    ok: u64,
    failed: u64,
    failure: Option<String>,
}

impl Report {
    fn merge(&mut self, other: Report) {
        self.latencies_us.extend(other.latencies_us);
        self.ok += other.ok;
        self.failed += other.failed;
        if self.failure.is_none() {
            self.failure = other.failure;
        }
    }

    fn fail(&mut self, what: String) {
        self.failed += 1;
        if self.failure.is_none() {
            self.failure = Some(what);
        }
    }
}

type WorkloadClient =
    proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel>;

async fn workload(
    socket: &Path,
    clients: usize,
    duration: Duration,
    mode: Mode,
    interval: Duration,
) -> Result<()> {
    // One call first: the socket answers and this user has an entry with an SVID.
    let mut probe = plant_tests::workload_client(socket).await?;
    let spiffe_id = fetch_once(&mut probe)
        .await
        .context("a first FetchX509SVID (is there an entry for this uid?)")?;
    drop(probe);

    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let (socket, stop) = (socket.to_owned(), Arc::clone(&stop));
        // Paced clients start at evenly spread offsets: started together they would call
        // in bursts of `clients` at once and measure the burst, not the rate.
        let mut schedule = (!interval.is_zero()).then(|| {
            let offset = interval.mul_f64(client as f64 / clients as f64);
            let mut ticks =
                tokio::time::interval_at(tokio::time::Instant::now() + offset, interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks
        });
        tasks.spawn(async move {
            let mut report = Report::default();
            let mut kept: Option<WorkloadClient> = None;
            loop {
                if let Some(ticks) = schedule.as_mut() {
                    ticks.tick().await;
                }
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let began = Instant::now();
                let client = match (mode, kept.as_mut()) {
                    (Mode::KeepAlive, Some(client)) => Ok(client.clone()),
                    _ => plant_tests::workload_client(&socket).await,
                };
                let outcome = match client {
                    Ok(mut client) => {
                        let outcome = fetch_once(&mut client).await;
                        if mode == Mode::KeepAlive && kept.is_none() && outcome.is_ok() {
                            kept = Some(client);
                        }
                        outcome.map(drop)
                    }
                    Err(e) => Err(e),
                };
                match outcome {
                    Ok(()) => {
                        report.ok += 1;
                        report
                            .latencies_us
                            .push(u32::try_from(began.elapsed().as_micros()).unwrap_or(u32::MAX));
                    }
                    Err(e) => {
                        report.fail(format!("{e:#}"));
                        kept = None;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
            }
            report
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut report = Report::default();
    while let Some(done) = tasks.join_next().await {
        report.merge(done?);
    }
    let elapsed = start.elapsed().as_secs_f64();
    report.latencies_us.sort_unstable();
    let l = &report.latencies_us;
    let (p50, p90, p99, max) = (
        percentile_ms(l, 50.0),
        percentile_ms(l, 90.0),
        percentile_ms(l, 99.0),
        percentile_ms(l, 100.0),
    );
    let rate = report.ok as f64 / elapsed;
    let pace = if interval.is_zero() {
        "back to back".to_owned()
    } else {
        format!("each every {} ms", interval.as_millis())
    };
    println!(
        "agent_load: FetchX509SVID, {} ({clients} clients, {pace}) as {spiffe_id}",
        mode.name(),
    );
    println!(
        "  {} calls in {elapsed:.2} s: {} ok, {} failed; {rate:.0} SVIDs/s",
        report.ok + report.failed,
        report.ok,
        report.failed
    );
    println!(
        "  request to first message: p50 {p50:.2} ms, p90 {p90:.2} ms, p99 {p99:.2} ms, max {max:.2} ms"
    );
    if let Some(failure) = &report.failure {
        println!("  failed, e.g.: {failure}");
    }
    println!(
        "RESULT mode={} clients={clients} interval_ms={} requests={} ok={} failed={} seconds={elapsed:.3} \
         per_sec={rate:.0} p50_ms={p50:.2} p90_ms={p90:.2} p99_ms={p99:.2} max_ms={max:.2}",
        mode.name(),
        interval.as_millis(),
        report.ok + report.failed,
        report.ok,
        report.failed,
    );
    Ok(())
}

/// One FetchX509SVID: the SPIFFE ID of the first SVID in the first message.
async fn fetch_once(client: &mut WorkloadClient) -> Result<String> {
    let mut stream = client
        .fetch_x509svid(plant_tests::x509_request(true))
        .await?
        .into_inner();
    let message = stream
        .message()
        .await?
        .context("the stream ended without a message")?;
    let svid = message
        .svids
        .into_iter()
        .next()
        .context("the first message holds no SVID")?;
    ensure!(!svid.x509_svid.is_empty(), "an SVID without certificates");
    Ok(svid.spiffe_id)
}

/// Nearest-rank percentile of sorted microsecond values, in milliseconds.
fn percentile_ms(sorted_us: &[u32], percent: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let rank = (percent / 100.0 * sorted_us.len() as f64).ceil() as usize;
    f64::from(sorted_us[rank.clamp(1, sorted_us.len()) - 1]) / 1000.0
}

// --- mint ----------------------------------------------------------------------------------

async fn mint(
    agent_state: &Path,
    server: &str,
    bundle: &Path,
    duration: Duration,
    batch: usize,
    concurrency: usize,
) -> Result<()> {
    use agent::daemon::issuer_client::{IssuerEndpoint, NodeIdentity};
    let [chain_file, key_file, node_bundle_file] = agent::daemon::cache::node_files(agent_state);
    let read = |path: &Path| {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    };
    let chain = plant_tests::pem_blocks(&read(&chain_file)?, "CERTIFICATE");
    let key = agent::daemon::svid::KeyPair::from_pkcs8_pem(&read(&key_file)?)?;
    let node_bundle = plant_tests::pem_blocks(&read(&node_bundle_file)?, "CERTIFICATE");
    let spiffe_id = agent::daemon::svid::spiffe_id_of(
        "node SVID",
        chain
            .first()
            .context("node-svid.pem holds no certificate")?,
    )?;
    let identity = NodeIdentity::from_node_svid(
        proto::agent::NodeSvid {
            spiffe_id: spiffe_id.as_str().to_owned(),
            chain,
            bundle: node_bundle,
        },
        key,
    )?;
    let anchors = plant_tests::pem_blocks(&read(bundle)?, "CERTIFICATE");
    let client = IssuerEndpoint::new(server, &anchors)?.client(Some(&identity))?;
    let entries = client.sync().await?.entries;
    ensure!(!entries.is_empty(), "{} has no entries", identity.spiffe_id);

    // One CSR per entry, made before the clock starts: the issuer takes only the public key,
    // so sending the same CSR again costs it what a fresh one costs.
    let mut requests = Vec::with_capacity(entries.len());
    for entry in &entries {
        let id = proto::SpiffeId::new(&entry.spiffe_id)?;
        requests.push((
            entry.id.clone(),
            agent::daemon::svid::KeyPair::generate()?.csr(Some(&id))?,
        ));
    }
    let requests = Arc::new(requests);
    // Warm up: the TLS connection, and a check that minting works at all.
    let first = client.mint_x509(requests[..1].to_vec()).await?;
    ensure!(first.len() == 1, "the issuer minted {} of 1", first.len());

    let stop = Arc::new(AtomicBool::new(false));
    let minted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for worker in 0..concurrency {
        let (client, requests, stop, minted) = (
            client.clone(),
            Arc::clone(&requests),
            Arc::clone(&stop),
            Arc::clone(&minted),
        );
        tasks.spawn(async move {
            let mut calls = Vec::new();
            let mut at = worker * batch % requests.len();
            while !stop.load(Ordering::Relaxed) {
                let chunk: Vec<_> = (0..batch.min(requests.len()))
                    .map(|k| requests[(at + k) % requests.len()].clone())
                    .collect();
                at = (at + batch * concurrency) % requests.len();
                let began = Instant::now();
                let svids = client.mint_x509(chunk).await?;
                calls.push(began.elapsed());
                minted.fetch_add(svids.len() as u64, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(calls)
        });
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut calls = Vec::new();
    while let Some(done) = tasks.join_next().await {
        calls.extend(done??);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let minted = minted.load(Ordering::Relaxed);
    let rate = minted as f64 / elapsed;
    let mut call_us: Vec<u32> = calls
        .iter()
        .map(|d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX))
        .collect();
    call_us.sort_unstable();
    let (p50, p99) = (percentile_ms(&call_us, 50.0), percentile_ms(&call_us, 99.0));
    if calls.is_empty() {
        bail!("no MintX509Svids call finished in {elapsed:.1} s");
    }
    println!(
        "agent_load: MintX509Svids as {}, {} entries, {batch} CSRs a call, {concurrency} calls in flight",
        identity.spiffe_id,
        requests.len()
    );
    println!(
        "  {minted} SVIDs in {} calls in {elapsed:.2} s: {rate:.0} SVIDs/s; a call p50 {p50:.1} ms, p99 {p99:.1} ms",
        calls.len()
    );
    println!(
        "RESULT svids={minted} calls={} seconds={elapsed:.3} svids_per_sec={rate:.0} batch={batch} \
         concurrency={concurrency} call_p50_ms={p50:.2} call_p99_ms={p99:.2}",
        calls.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_the_nearest_rank() {
        let sorted: Vec<u32> = (1..=100).map(|ms| ms * 1000).collect();
        assert_eq!(percentile_ms(&sorted, 50.0), 50.0);
        assert_eq!(percentile_ms(&sorted, 99.0), 99.0);
        assert_eq!(percentile_ms(&[], 99.0), 0.0);
    }

    #[test]
    fn only_entries_with_an_svid_are_counted() {
        let status = serde_json::json!({
            "entries": [{"svid": {"expires_at": "x"}}, {"svid": null}, {}]
        });
        assert_eq!(svids_held(&status), 1);
    }
}
