//! kill -9 during a stream of enrollments: every certificate a client received is in the
//! inventory after restart, no serial repeats, and the store opens and issues again.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use der::Decode;
use est::client::{Auth, EstClient};
use est::server::Secret;
use plant_tests::{run_ok, Issuer};

fn csr(name: &str) -> Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    Ok(params.serialize_request(&key)?.der().to_vec())
}

fn serial_of(der: &[u8]) -> Result<String> {
    let cert = x509_cert::Certificate::from_der(der)?;
    let bytes = cert.tbs_certificate.serial_number.as_bytes();
    // The inventory writes serials as 16 bytes, hex.
    let mut padded = vec![0u8; 16usize.saturating_sub(bytes.len())];
    padded.extend_from_slice(bytes);
    Ok(hex::encode(padded))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_certificate_a_client_received_survives_kill_9() -> Result<()> {
    let mut issuer = Issuer::start()?;
    let root = std::fs::read(issuer.root_pem())?;
    let root_der = x509_cert::Certificate::load_pem_chain(&root)?
        .first()
        .map(der::Encode::to_der)
        .context("root")??;
    let tokens = run_ok(issuer.cli().args([
        "token", "create", "--label", "device", "--count", "3000", "--format", "plain",
    ]))?;
    let tokens: Arc<Mutex<Vec<String>>> =
        Arc::new(Mutex::new(tokens.lines().map(str::to_owned).collect()));
    let received: Arc<Mutex<Vec<String>>> = Arc::default();

    for round in 0..3 {
        let client = EstClient::new(&issuer.url, std::slice::from_ref(&root_der), None)?;
        let mut tasks = Vec::new();
        for worker in 0..8 {
            let (client, tokens, received) = (client.clone(), tokens.clone(), received.clone());
            let request = csr(&format!("crash-{round}-{worker}"))?;
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(token) = tokens.lock().ok().and_then(|mut t| t.pop()) else {
                        return;
                    };
                    match client
                        .simple_enroll(&request, &Auth::Bearer(Secret(token)))
                        .await
                    {
                        Ok(der) => {
                            if let (Ok(serial), Ok(mut r)) = (serial_of(&der), received.lock()) {
                                r.push(serial);
                            }
                        }
                        // The issuer was killed under us: this answer never arrived.
                        Err(_) => return,
                    }
                }
            }));
        }
        // Kill at a different moment each round, mid-stream.
        tokio::time::sleep(Duration::from_millis(400 + 250 * round)).await;
        issuer.kill()?;
        for task in tasks {
            let _ = task.await;
        }
        issuer.serve()?;
    }

    let received = received.lock().map(|r| r.clone()).unwrap_or_default();
    ensure!(
        received.len() > 50,
        "only {} enrollments before the kills",
        received.len()
    );
    let inventory = issuer.inventory(&[])?;
    let serials: Vec<&str> = inventory
        .iter()
        .filter_map(|r| r["serial"].as_str())
        .collect();
    let unique: HashSet<&str> = serials.iter().copied().collect();
    assert_eq!(
        unique.len(),
        serials.len(),
        "a serial repeats in the inventory"
    );
    let received_unique: HashSet<&String> = received.iter().collect();
    assert_eq!(
        received_unique.len(),
        received.len(),
        "a client got a repeated serial"
    );
    for serial in &received {
        assert!(
            unique.contains(serial.as_str()),
            "received {serial} is missing after kill -9"
        );
    }
    // The audit chain survived the kills intact.
    let verified = run_ok(issuer.cli().args(["audit", "verify"]))?;
    ensure!(verified.contains("audit log intact"), "{verified}");
    // The store reopened cleanly and still issues.
    let token = issuer.token("device", Some("after-crash"))?;
    let client = EstClient::new(&issuer.url, &[root_der], None)?;
    client
        .simple_enroll(&csr("after-crash")?, &Auth::Bearer(Secret(token)))
        .await
        .context("enrolling after the restarts")?;
    eprintln!(
        "crash safety: {} certificates received across 3 kill -9 restarts, all in the inventory ({} rows)",
        received.len(),
        inventory.len()
    );
    Ok(())
}
