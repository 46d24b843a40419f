//! The agent's metrics listener against a crowd of idle connections, and the agent's
//! open-file limit. The agent is started through `prlimit` with a soft limit of 1024 below
//! a higher hard one, as a service manager's default would start it.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use plant_tests::{Agent, Issuer};
use rustix::process::{getrlimit, Resource};

/// Connections the agent's metrics listener holds at most (agent::daemon::metrics::MAX_CONNECTIONS).
const MAX_CONNECTIONS: usize = 32;

/// The soft and hard open-file limits of process `pid`, from /proc/<pid>/limits.
fn open_file_limits(pid: u32) -> Result<(String, String)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("no open files line")?;
    let mut fields = line["Max open files".len()..].split_whitespace();
    Ok((
        fields.next().context("soft")?.to_owned(),
        fields.next().context("hard")?.to_owned(),
    ))
}

fn descriptors(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

#[test]
fn idle_metrics_connections_neither_pile_up_nor_keep_a_scrape_out() -> Result<()> {
    let issuer = Issuer::start()?;
    let token = issuer.join_token()?;
    // A soft limit of 1024 below a higher hard one, for the agent only.
    let hard = getrlimit(Resource::Nofile).maximum;
    let nofile = format!(
        "--nofile={}:{}",
        hard.map_or(1024, |max| max.min(1024)),
        hard.map_or("unlimited".to_owned(), |max| max.to_string())
    );
    let mut agent = Agent::start_through(
        &issuer,
        plant_tests::JOIN_TOKEN_ATTESTATION,
        &[("join.token", &token)],
        "",
        &["prlimit", &nofile, "--"],
    )?;
    agent.node_id()?;
    let pid = agent.pid().context("agent pid")?;
    let before = descriptors(pid)?;

    let url = std::fs::read_to_string(agent.dir.path().join("state/metrics.url"))?;
    let address = url
        .trim()
        .strip_prefix("http://")
        .and_then(|u| u.strip_suffix("/metrics"))
        .context("metrics.url")?
        .to_owned();
    // Twice the agent's inherited soft limit in connections that never send a byte.
    let idle = (0..2048)
        .map(|_| TcpStream::connect(&address))
        .collect::<std::io::Result<Vec<_>>>()?;
    // A scrape beside them is answered (curl gives up after 10 s).
    let text = agent
        .metrics()
        .with_context(|| format!("no scrape beside {} idle connections", idle.len()))?;
    ensure!(text.contains("plant_agent_svids "), "{text}");
    // And the agent holds about MAX_CONNECTIONS of them, not one descriptor per connection.
    let deadline = Instant::now() + Duration::from_secs(30);
    let open = loop {
        let open = descriptors(pid)?;
        if open <= before + MAX_CONNECTIONS + 16 || Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(
        open <= before + MAX_CONNECTIONS + 16,
        "the agent holds {open} descriptors ({before} before {} idle metrics connections)",
        idle.len()
    );
    drop(idle);

    // It raised its soft open-file limit to the hard one at start, and said so.
    let (soft, hard) = open_file_limits(pid)?;
    assert_eq!(soft, hard, "the agent's open-file limit");
    let log = agent.log();
    assert!(log.contains("open file limit"), "{log}");
    // And never ran out of descriptors meanwhile (which would have refused every listener).
    assert!(!log.contains("Too many open files"), "{log}");
    Ok(())
}
