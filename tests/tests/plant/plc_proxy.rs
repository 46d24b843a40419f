//! The legacy PLC proxy end to end: a pymodbus PLC (PyPI; nobody here wrote it) behind a
//! gateway agent's inbound proxy, pymodbus SCADA clients behind a second agent's outbound
//! proxies, real mTLS between the two agents with SVIDs from a real issuer.
//!
//! ```text
//! modbus_scada.py ──tcp──▶ client agent (outbound hmi-1 | viewer-1 | intruder)
//!                 ══mTLS══▶ gateway agent (inbound press-7) ──tcp──▶ modbus_plc.py
//! ```

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use plant_tests::{metric, run, Agent, Issuer};

const PRESS: &str = "spiffe://plant.example/plc/press-7";
const HMI: &str = "spiffe://plant.example/scada/hmi-1";
const VIEWER: &str = "spiffe://plant.example/viewer/line-1";
const INTRUDER: &str = "spiffe://plant.example/contractor/laptop";

fn python() -> Result<PathBuf> {
    let python = std::env::var("PLANT_PYTHON")
        .context("PLANT_PYTHON must point at the Python with pymodbus (scripts/test sets it up)")?;
    Ok(PathBuf::from(python))
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// The simulated PLC: modbus_plc.py (pymodbus server).
struct Plc {
    child: Child,
    port: u16,
}

impl Plc {
    fn start(port: u16) -> Result<Self> {
        let (child, port) = plant_tests::spawn_modbus_plc(&python()?, port)?;
        Ok(Self { child, port })
    }

    /// A PLC that also appends the hex of every chunk it receives to `wire_log`.
    fn recording(wire_log: &Path) -> Result<Self> {
        use std::io::BufRead;
        let mut child = Command::new(python()?)
            .arg(script("modbus_plc.py"))
            .arg("0")
            .arg("--wire-log")
            .arg(wire_log)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting modbus_plc.py")?;
        let stdout = child.stdout.take().context("PLC stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let port = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|p| p.parse().ok());
        let mut plc = Self { child, port: 0 };
        match port {
            Some(port) => plc.port = port,
            None => bail!("modbus_plc.py printed {line:?}"),
        }
        Ok(plc)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Plc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// An issuer, the PLC, the gateway agent in front of it and the client agent with three
/// legacy clients: hmi-1 (read-write), viewer-1 (read-only by prefix), intruder (not allowed).
struct Plant {
    issuer: Issuer,
    plc: Plc,
    gateway: Agent,
    gateway_node: String,
    client: Agent,
}

fn join_token_agent(issuer: &Issuer, proxies: &str) -> Result<Agent> {
    let token = issuer.join_token()?;
    Agent::start_with_config(
        issuer,
        plant_tests::JOIN_TOKEN_ATTESTATION,
        &[("join.token", &token)],
        proxies,
    )
}

/// `press_ttl`: the PLC identity's lifetime (the agent rotates it at half life).
fn plant(press_ttl: &str) -> Result<Plant> {
    let issuer = Issuer::start()?;
    let plc = Plc::start(0)?;
    plant_with(issuer, plc, press_ttl, "")
}

/// A plant with this PLC, and `press_extra` added to the gateway's press-7 table.
fn plant_with(issuer: Issuer, plc: Plc, press_ttl: &str, press_extra: &str) -> Result<Plant> {
    let mut gateway = join_token_agent(
        &issuer,
        &format!(
            r#"
[[proxy.inbound]]
device = "press-7"
spiffe_id = "{PRESS}"
listen = "127.0.0.1:0"
upstream = "127.0.0.1:{port}"
protocol = "modbus"
connect_timeout = "1s"
allow = [
  {{ spiffe_id = "{HMI}", access = "read-write" }},
  {{ prefix = "spiffe://plant.example/viewer" }},
]
{press_extra}
"#,
            port = plc.port
        ),
    )?;
    let gateway_node = gateway.node_id()?;
    issuer.create_entry(
        PRESS,
        &gateway_node,
        &["legacy:device:press-7"],
        &["--ttl", press_ttl],
    )?;
    let press = gateway.proxy_address("press-7")?;
    let outbound = |device: &str, id: &str| {
        format!(
            "\n[[proxy.outbound]]\ndevice = \"{device}\"\nspiffe_id = \"{id}\"\nlisten = \"127.0.0.1:0\"\ngateway = \"{press}\"\nserver_spiffe_id = \"{PRESS}\"\n"
        )
    };
    let mut client = join_token_agent(
        &issuer,
        &[
            outbound("hmi-1", HMI),
            outbound("viewer-1", VIEWER),
            outbound("intruder", INTRUDER),
        ]
        .concat(),
    )?;
    let client_node = client.node_id()?;
    for (device, id) in [("hmi-1", HMI), ("viewer-1", VIEWER), ("intruder", INTRUDER)] {
        issuer.create_entry(id, &client_node, &[&format!("legacy:device:{device}")], &[])?;
    }
    let plant = Plant {
        issuer,
        plc,
        gateway,
        gateway_node,
        client,
    };
    plant.gateway.wait_for_log("proxy identity ready", 1)?;
    plant.client.wait_for_log("proxy identity ready", 3)?;
    Ok(plant)
}

impl Plant {
    /// The local port of a legacy client's outbound proxy.
    fn outbound(&self, device: &str) -> Result<SocketAddr> {
        self.client.proxy_address(device)
    }
}

trait AgentLog {
    fn wait_for_log(&self, needle: &str, times: usize) -> Result<()>;
}

impl AgentLog for Agent {
    /// Waits until the agent's log holds `needle` at least `times` times.
    fn wait_for_log(&self, needle: &str, times: usize) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if self.log().matches(needle).count() >= times {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{needle:?} not {times} times in the agent log within 40 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs modbus_scada.py (pymodbus client) against `address` with `steps` on one connection;
/// one JSON object per step.
fn scada(address: SocketAddr, steps: serde_json::Value) -> Result<Vec<serde_json::Value>> {
    let out = run(Command::new(python()?)
        .arg(script("modbus_scada.py"))
        .args(["--timeout", "10"])
        .arg(address.to_string())
        .arg("--json")
        .arg(steps.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let results = stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<serde_json::Value>, _>>()
        .with_context(|| {
            format!(
                "modbus_scada.py printed {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    if results.is_empty() {
        bail!(
            "modbus_scada.py printed nothing: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(results)
}

/// modbus_scada.py --concurrent: `n` connections at once, each read, write, read back.
fn concurrent(address: SocketAddr, n: usize) -> Result<serde_json::Value> {
    let out = run(Command::new(python()?)
        .arg(script("modbus_scada.py"))
        .args(["--timeout", "20"])
        .arg(address.to_string())
        .args(["--concurrent", &n.to_string()]))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim())
        .with_context(|| format!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
}

fn values(result: &serde_json::Value) -> Vec<i64> {
    result["values"]
        .as_array()
        .map(|v| v.iter().filter_map(serde_json::Value::as_i64).collect())
        .unwrap_or_default()
}

#[test]
fn scada_reads_and_writes_reach_the_plc_and_a_read_only_write_is_refused_in_session() -> Result<()>
{
    let plant = plant("1h")?;
    let hmi = plant.outbound("hmi-1")?;
    let results = scada(
        hmi,
        serde_json::json!([
            ["read_holding", 0, 10],
            ["write_register", 5, 1234],
            ["write_registers", 20, "7,8,9"],
            ["read_holding", 0, 10],
            ["read_holding", 20, 3],
            ["write_coil", 3, 1],
            ["read_coils", 0, 8],
            ["read_input", 0, 2],
        ]),
    )?;
    let log = || plant.gateway.log();
    for r in &results {
        assert_eq!(r["result"], "ok", "{r}\n{}", log());
    }
    assert_eq!(values(&results[0]), (0..10).collect::<Vec<_>>());
    assert_eq!(values(&results[3]), [0, 1, 2, 3, 4, 1234, 6, 7, 8, 9]);
    assert_eq!(values(&results[4]), [7, 8, 9]);
    assert_eq!(
        results[6]["values"],
        serde_json::json!([true, false, true, true, true, false, true, false])
    );
    assert_eq!(values(&results[7]), [1000, 1001]);
    let session = &results[0]["session"];
    assert!(
        results.iter().all(|r| &r["session"] == session),
        "one connection"
    );

    // The read-only peer: its write is answered with exception 01 on the same connection,
    // which stays up for the read after it; the PLC never saw the write.
    let viewer = plant.outbound("viewer-1")?;
    let results = scada(
        viewer,
        serde_json::json!([
            ["read_holding", 5, 1],
            ["write_register", 5, 999],
            ["read_holding", 5, 1],
            ["diagnostics"],
            ["read_input", 1, 1],
        ]),
    )?;
    assert_eq!(results[0]["result"], "ok", "{}", results[0]);
    assert_eq!(values(&results[0]), [1234]);
    assert_eq!(results[1]["result"], "exception", "{}", results[1]);
    assert_eq!(results[1]["exception_code"], 1, "{}", results[1]);
    assert_eq!(results[2]["result"], "ok", "{}", results[2]);
    assert_eq!(
        values(&results[2]),
        [1234],
        "the write did not reach the PLC"
    );
    assert_eq!(results[3]["result"], "exception", "{}", results[3]);
    assert_eq!(results[4]["result"], "ok", "{}", results[4]);
    assert!(results
        .iter()
        .all(|r| r["session"] == results[0]["session"]));

    // Logged per session, and counted.
    plant.gateway.wait_for_log("session ended", 2)?;
    let log = log();
    assert!(log.contains("Modbus request refused"), "{log}");
    let ended = log
        .lines()
        .filter(|l| l.contains("session ended") && l.contains(VIEWER))
        .collect::<Vec<_>>();
    assert_eq!(ended.len(), 1, "{log}");
    assert!(ended[0].contains("refused_requests=2"), "{}", ended[0]);
    assert!(
        ended[0].contains("device=\"press-7\"") || ended[0].contains("device=press-7"),
        "{}",
        ended[0]
    );
    let metrics = plant.gateway.metrics()?;
    assert_eq!(
        metric(
            &metrics,
            "plant_agent_proxy_modbus_requests_refused_total{device=\"press-7\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "plant_agent_proxy_sessions_total{device=\"press-7\",mode=\"inbound\"}"
        ),
        Some(2.0),
        "{metrics}"
    );

    // `agent status` lists the proxy with the address it is bound to.
    let status = plant.gateway.status()?;
    let line = status
        .lines()
        .find(|l| l.contains("press-7") && l.contains("inbound"))
        .with_context(|| format!("no proxy line in {status}"))?;
    let bound = plant.gateway.proxy_address("press-7")?.to_string();
    assert!(line.contains(&bound) && line.contains(PRESS), "{line}");

    // The inventory shows the PLC's certificate, its gateway and the clients' ones.
    let inventory = plant.issuer.inventory(&[])?;
    let press = inventory
        .iter()
        .find(|c| c.to_string().contains(PRESS))
        .with_context(|| format!("no certificate for {PRESS} in {inventory:?}"))?;
    assert_eq!(press["status"], "valid", "{press}");
    assert_eq!(
        press["owner"],
        format!("legacy:press-7@{}", plant.gateway_node),
        "{press}"
    );

    // Each refusal is an audit record on the issuer, reported by the gateway's agent.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tail = plant_tests::run_ok(plant.issuer.cli().args(["audit", "tail", "-n", "50"]))?;
        let refused: Vec<&str> = tail
            .lines()
            .filter(|l| l.contains("proxy.request_refused") && l.contains(VIEWER))
            .collect();
        if refused.len() == 2 {
            assert!(
                refused.iter().any(|l| l.contains("\"function_code\":6")),
                "{tail}"
            );
            assert!(
                refused.iter().any(|l| l.contains("\"function_code\":8")),
                "{tail}"
            );
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no 2 refusals in the audit log:\n{tail}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    plant_tests::run_ok(plant.issuer.cli().args(["audit", "verify"]))?;
    Ok(())
}

#[test]
fn a_peer_not_on_the_allow_list_is_refused_at_the_handshake() -> Result<()> {
    let plant = plant("1h")?;
    let intruder = plant.outbound("intruder")?;
    let results = scada(intruder, serde_json::json!([["read_holding", 0, 1]]))?;
    assert!(
        ["closed", "timeout"].contains(&results[0]["result"].as_str().unwrap_or_default()),
        "{}",
        results[0]
    );
    plant
        .gateway
        .wait_for_log("refused at the TLS handshake", 1)?;
    let metrics = plant.gateway.metrics()?;
    assert_eq!(
        metric(
            &metrics,
            "plant_agent_proxy_connections_refused_total{device=\"press-7\",mode=\"inbound\",reason=\"not_allowed\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "plant_agent_proxy_sessions_total{device=\"press-7\",mode=\"inbound\"}"
        ),
        Some(0.0),
        "no session, no byte to the PLC"
    );
    // An allowed peer right after is served.
    let results = scada(
        plant.outbound("hmi-1")?,
        serde_json::json!([["read_holding", 1, 1]]),
    )?;
    assert_eq!(values(&results[0]), [1], "{}", results[0]);
    Ok(())
}

/// A raw Modbus/TCP request: read `count` holding registers from `address`.
fn read_holding(transaction: u16, address: u16, count: u16) -> Vec<u8> {
    let mut frame = transaction.to_be_bytes().to_vec();
    frame.extend([0, 0, 0, 6, 1, 3]);
    frame.extend(address.to_be_bytes());
    frame.extend(count.to_be_bytes());
    frame
}

/// Reads one response frame; `None` if the connection closed.
fn read_frame(stream: &mut TcpStream) -> Result<Option<Vec<u8>>> {
    let mut header = [0; 7];
    if let Err(e) = stream.read_exact(&mut header) {
        return match e.kind() {
            std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset => Ok(None),
            _ => Err(e.into()),
        };
    }
    let length = usize::from(u16::from_be_bytes([header[4], header[5]]));
    let mut body = vec![0; length.saturating_sub(1)];
    stream.read_exact(&mut body)?;
    Ok(Some([header.to_vec(), body].concat()))
}

fn connect(address: SocketAddr) -> Result<TcpStream> {
    let stream = TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(20)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[test]
fn malformed_frames_close_only_their_own_session() -> Result<()> {
    let plant = plant("1h")?;
    let hmi = plant.outbound("hmi-1")?;
    let mut good = connect(hmi)?;
    good.write_all(&read_holding(1, 0, 2))?;
    let answer = read_frame(&mut good)?.context("an answer")?;
    assert_eq!(answer[..2], [0, 1]);

    let cases: [(&str, Vec<u8>); 3] = [
        (
            "length 300",
            [vec![0, 9, 0, 0, 1, 44, 1, 3], vec![0; 20]].concat(),
        ),
        ("protocol 7", vec![0, 9, 0, 7, 0, 6, 1, 3, 0, 0, 0, 1]),
        ("length 1", vec![0, 9, 0, 0, 0, 1, 1]),
    ];
    for (n, (what, bytes)) in cases.iter().enumerate() {
        let mut bad = connect(hmi)?;
        bad.write_all(bytes)?;
        assert_eq!(read_frame(&mut bad)?, None, "{what}: the session is closed");
        plant
            .gateway
            .wait_for_log("malformed Modbus/TCP frame from the peer", n + 1)?;
    }
    // pymodbus's own client, asked to send a frame longer than Modbus allows.
    let results = scada(
        hmi,
        serde_json::json!([[
            "send",
            format!("000a0000{:04x}0110{}", 262, "00".repeat(261))
        ]]),
    )?;
    assert_eq!(results[0]["result"], "closed", "{}", results[0]);

    // The good session, opened before, is untouched.
    good.write_all(&read_holding(2, 10, 1))?;
    let answer = read_frame(&mut good)?.context("still served")?;
    assert_eq!(answer[..2], [0, 2]);
    assert_eq!(answer[9..11], [0, 10]);
    let metrics = plant.gateway.metrics()?;
    assert_eq!(
        metric(
            &metrics,
            "plant_agent_proxy_malformed_sessions_total{device=\"press-7\"}"
        ),
        Some(4.0),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn a_rotation_during_an_open_session_does_not_drop_it() -> Result<()> {
    // A 20 s PLC identity rotates after about 10 s.
    let plant = plant("20s")?;
    let hmi = plant.outbound("hmi-1")?;
    let before = plant.gateway.log().matches("proxy identity ready").count();
    let mut session = connect(hmi)?;
    session.write_all(&read_holding(1, 0, 1))?;
    read_frame(&mut session)?.context("first answer")?;
    plant
        .gateway
        .wait_for_log("proxy identity ready", before + 1)?;
    session.write_all(&read_holding(2, 1, 1))?;
    let answer = read_frame(&mut session)?.context("the session survived the rotation")?;
    assert_eq!(answer[..2], [0, 2]);
    // New sessions get the new certificate: pymodbus through a fresh handshake.
    let results = scada(hmi, serde_json::json!([["read_holding", 2, 1]]))?;
    assert_eq!(values(&results[0]), [2], "{}", results[0]);
    let log = plant.gateway.log();
    assert_eq!(log.matches("session opened").count(), 2, "{log}");
    Ok(())
}

#[test]
fn plc_down_closes_clients_promptly_and_back_up_serves_them_again() -> Result<()> {
    let mut plant = plant("1h")?;
    let hmi = plant.outbound("hmi-1")?;
    let port = plant.plc.port;
    plant.plc.stop();
    // Twenty clients at once while it is down: each closed promptly, not left waiting,
    // and only a few connection attempts reach the PLC's address (the reconnect storm of a
    // PLC reboot is not passed on).
    let summary = concurrent(hmi, 20)?;
    assert_eq!(summary["succeeded"], 0, "{summary}");
    assert_eq!(summary["closed"], 20, "{summary}");
    let log = plant.gateway.log();
    assert!(log.contains("unreachable"), "{log}");
    // Each client connection that got past the handshake is a session; pymodbus may retry
    // a closed one, so count sessions rather than clients. Most must have been closed
    // without a connect to the PLC (back-off 0.5 s doubling, one probe at a time).
    let tried = log.matches("connecting to 127.0.0.1").count();
    let sessions = log.matches("session opened").count();
    assert!(log.contains("not trying again"), "{log}");
    assert!(
        tried >= 1 && tried * 2 <= sessions,
        "{tried} connect attempts for {sessions} sessions:\n{log}"
    );

    plant.plc = Plc::start(port)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let results = scada(hmi, serde_json::json!([["read_holding", 3, 1]]))?;
        if results[0]["result"] == "ok" {
            assert_eq!(values(&results[0]), [3]);
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "not served 30 s after the PLC came back: {}\n{}",
            results[0],
            plant.gateway.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    plant.gateway.wait_for_log("upstream reachable again", 1)?;
    Ok(())
}

#[test]
fn two_hundred_concurrent_sessions_through_both_proxies() -> Result<()> {
    let plant = plant("1h")?;
    let hmi = plant.outbound("hmi-1")?;
    let summary = concurrent(hmi, 200)?;
    assert_eq!(summary["sessions"], 200, "{summary}");
    assert_eq!(
        summary["succeeded"],
        200,
        "{summary}\n{}",
        plant.gateway.log()
    );
    plant.gateway.wait_for_log("session ended", 200)?;
    let metrics = plant.gateway.metrics()?;
    assert_eq!(
        metric(
            &metrics,
            "plant_agent_proxy_sessions_total{device=\"press-7\",mode=\"inbound\"}"
        ),
        Some(200.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "plant_agent_proxy_sessions_active{device=\"press-7\",mode=\"inbound\"}"
        ),
        Some(0.0),
        "{metrics}"
    );
    Ok(())
}

#[test]
fn a_revoked_peer_is_cut_off_mid_session_and_refused_at_the_next_handshake() -> Result<()> {
    let plant = plant("1h")?;
    let hmi = plant.outbound("hmi-1")?;
    let mut open = connect(hmi)?;
    open.write_all(&read_holding(1, 0, 1))?;
    read_frame(&mut open)?.context("served before the revocation")?;

    let inventory = plant.issuer.inventory(&[])?;
    let serial = inventory
        .iter()
        .find(|c| c["status"] == "valid" && c["sans"].to_string().contains(HMI))
        .and_then(|c| c["serial"].as_str())
        .with_context(|| format!("no valid certificate for {HMI} in {inventory:?}"))?
        .to_owned();
    plant_tests::run_ok(
        plant
            .issuer
            .cli()
            .args(["revoke", &serial, "--reason", "keyCompromise"]),
    )?;

    // The gateway learns the CRL at its next sync and ends the open session.
    plant
        .gateway
        .wait_for_log("the peer's certificate was revoked", 1)?;
    assert_eq!(read_frame(&mut open)?, None, "the open session is closed");
    let results = scada(hmi, serde_json::json!([["read_holding", 0, 1]]))?;
    assert_eq!(results[0]["result"], "closed", "{}", results[0]);
    plant
        .gateway
        .wait_for_log("refused at the TLS handshake", 1)?;
    let metrics = plant.gateway.metrics()?;
    assert_eq!(
        metric(
            &metrics,
            "plant_agent_proxy_connections_refused_total{device=\"press-7\",mode=\"inbound\",reason=\"revoked\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    // The read-only viewer, not revoked, is still served.
    let results = scada(
        plant.outbound("viewer-1")?,
        serde_json::json!([["read_holding", 4, 1]]),
    )?;
    assert_eq!(values(&results[0]), [4], "{}", results[0]);
    Ok(())
}

#[test]
fn silent_connections_do_not_lock_the_allowed_peer_out() -> Result<()> {
    let plant = plant("1h")?;
    let press = plant.gateway.proxy_address("press-7")?;
    // As many silent TCP connections as the device has session slots (256 by default):
    // never a TLS byte. They once took a slot each at accept, for the handshake timeout.
    let silent = (0..256)
        .map(|_| TcpStream::connect(press))
        .collect::<std::io::Result<Vec<_>>>()?;
    let results = scada(
        plant.outbound("hmi-1")?,
        serde_json::json!([["read_holding", 0, 2]]),
    )?;
    assert_eq!(
        results[0]["result"],
        "ok",
        "the allowed peer was locked out by {} silent connections: {}\n{}",
        silent.len(),
        results[0],
        plant.gateway.log()
    );
    assert_eq!(values(&results[0]), [0, 1]);
    // The silent ones were shed (the oldest first), not given sessions.
    let metrics = plant.gateway.metrics()?;
    let shed = metric(
        &metrics,
        "plant_agent_proxy_connections_refused_total{device=\"press-7\",mode=\"inbound\",reason=\"handshake_shed\"}",
    )
    .unwrap_or(0.0);
    assert!(shed >= 1.0, "no silent connection was shed:\n{metrics}");
    assert_eq!(
        metric(
            &metrics,
            "plant_agent_proxy_sessions_total{device=\"press-7\",mode=\"inbound\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    drop(silent);
    Ok(())
}

#[test]
fn a_session_idle_past_the_idle_timeout_is_closed() -> Result<()> {
    let issuer = Issuer::start()?;
    let plc = Plc::start(0)?;
    let plant = plant_with(issuer, plc, "1h", "idle_timeout = \"3s\"")?;
    let hmi = plant.outbound("hmi-1")?;
    let mut session = connect(hmi)?;
    // Polled every 300 ms for longer than the idle timeout: traffic keeps it open.
    let polling = Instant::now();
    let mut transaction = 0;
    while polling.elapsed() < Duration::from_secs(5) {
        transaction += 1;
        session.write_all(&read_holding(transaction, 0, 1))?;
        let answer = read_frame(&mut session)?
            .with_context(|| format!("closed while polled:\n{}", plant.gateway.log()))?;
        assert_eq!(answer[..2], transaction.to_be_bytes());
        std::thread::sleep(Duration::from_millis(300));
    }
    // Then silent: the gateway closes it (the read below waits up to 20 s).
    assert_eq!(
        read_frame(&mut session)?,
        None,
        "the idle session is closed"
    );
    plant.gateway.wait_for_log("session ended: idle", 1)?;
    Ok(())
}

#[test]
fn a_write_smuggled_inside_a_read_is_refused_and_never_reaches_the_plc() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wire_log = dir.path().join("wire.log");
    let issuer = Issuer::start()?;
    let plc = Plc::recording(&wire_log)?;
    let plant = plant_with(issuer, plc, "1h", "")?;
    // The read-only viewer: a read of holding register 5 whose MBAP length also covers a
    // whole request writing 0xBEEF to it. The proxy saw function code 3 and let it pass.
    let write_pdu = [6u8, 0, 5, 0xbe, 0xef];
    let write = [&[0u8, 2, 0, 0, 0, 6, 1][..], &write_pdu].concat();
    let read_pdu = [3u8, 0, 5, 0, 1];
    let length = u16::try_from(1 + read_pdu.len() + write.len())?;
    let smuggled = [
        &[0u8, 1, 0, 0][..],
        &length.to_be_bytes(),
        &[1],
        &read_pdu,
        &write,
    ]
    .concat();
    let mut viewer = connect(plant.outbound("viewer-1")?)?;
    viewer.write_all(&smuggled)?;
    assert_eq!(
        read_frame(&mut viewer)?,
        None,
        "the session carrying the smuggled write is closed:\n{}",
        plant.gateway.log()
    );
    plant
        .gateway
        .wait_for_log("malformed Modbus/TCP frame from the peer", 1)?;
    let log = plant.gateway.log();
    assert!(log.contains("the request it announces takes 5"), "{log}");

    // Nothing of it reached the PLC; a read through the allowed writer shows the register as
    // it was (and that the PLC logs what it receives).
    let results = scada(
        plant.outbound("hmi-1")?,
        serde_json::json!([["read_holding", 5, 1]]),
    )?;
    assert_eq!(values(&results[0]), [5], "{}", results[0]);
    let wire = std::fs::read_to_string(&wire_log)?;
    assert!(!wire.is_empty(), "the PLC logged nothing");
    assert!(
        !wire.replace('\n', "").contains(&hex::encode(write_pdu)),
        "the smuggled write reached the PLC:\n{wire}"
    );

    // Audited on the issuer as a refused request of the viewer's.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let tail = plant_tests::run_ok(plant.issuer.cli().args(["audit", "tail", "-n", "50"]))?;
        if tail.lines().any(|l| {
            l.contains("proxy.request_refused")
                && l.contains(VIEWER)
                && l.contains("\"function_code\":3")
        }) {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no audit record of the smuggling attempt:\n{tail}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

#[test]
fn a_gateway_restarted_during_an_issuer_outage_fronts_its_plc_from_the_saved_cache() -> Result<()> {
    let mut plant = plant("1h")?;
    let hmi = plant.outbound("hmi-1")?;
    let read = serde_json::json!([["read_holding", 0, 3]]);
    assert_eq!(scada(hmi, read.clone())?[0]["result"], "ok");

    // The gateway loses power while the issuer is unreachable. It comes back on the same
    // proxy address (the client agent's outbound proxy is configured with it).
    let press = plant.gateway.proxy_address("press-7")?;
    plant.gateway.kill()?;
    plant.issuer.kill()?;
    let toml = std::fs::read_to_string(plant.gateway.config())?;
    let toml = toml.replacen(
        "\nlisten = \"127.0.0.1:0\"",
        &format!("\nlisten = \"{press}\""),
        1,
    );
    std::fs::write(plant.gateway.config(), toml)?;
    std::fs::remove_file(plant.gateway.dir.path().join("state/proxies.json"))?;
    plant.gateway.run()?;
    ensure!(
        plant.gateway.proxy_address("press-7")? == press,
        "the proxy moved"
    );

    // Its PLC identity, the bundle and the CRL come from the saved cache: the SCADA client
    // reaches the PLC through mTLS again with no issuer anywhere.
    plant.gateway.wait_for_log("proxy identity ready", 2)?;
    let results = scada(hmi, read)?;
    assert_eq!(
        results[0]["result"],
        "ok",
        "{}\n{}",
        results[0],
        plant.gateway.log()
    );
    assert_eq!(values(&results[0]), [0, 1, 2]);
    ensure!(
        plant.gateway.status()?.contains("SERVING THE SAVED CACHE"),
        "{}",
        plant.gateway.status()?
    );
    Ok(())
}
