//! kill -9 of the issuer at random moments under load, 50 times in a row, restarting each
//! time: every certificate a client received is in the inventory and revocable, no serial
//! repeats, a token that bought a certificate stays spent, and the audit chain verifies.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use est::client::{Auth, EstClient};
use est::server::Secret;
use plant_tests::{inventory_serial as serial_of, p256_csr as csr, root_der, run_ok, Issuer};
use rand::Rng;

/// Restarts survived in a row (issue 7: "50 times in a row").
const KILLS: usize = 50;
/// Concurrent enrolling clients.
const CLIENTS: usize = 8;

/// What the clients saw: each certificate received, with the token that bought it.
#[derive(Default)]
struct Received {
    serials: Vec<String>,
    spent_tokens: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_kill_9_restarts_under_load_lose_no_certificate_and_no_token() -> Result<()> {
    let mut issuer = Issuer::start()?;
    let root_der = root_der(&issuer)?;
    let tokens = run_ok(issuer.cli().args([
        "token", "create", "--label", "device", "--count", "8000", "--format", "plain",
    ]))?;
    let tokens: Arc<Mutex<Vec<String>>> =
        Arc::new(Mutex::new(tokens.lines().map(str::to_owned).collect()));
    let received: Arc<Mutex<Received>> = Arc::default();
    let mut rng = rand::thread_rng();

    for round in 0..KILLS {
        let client = EstClient::new(&issuer.url, std::slice::from_ref(&root_der), None)?;
        let mut tasks = Vec::new();
        for worker in 0..CLIENTS {
            let (client, tokens, received) = (client.clone(), tokens.clone(), received.clone());
            let request = csr(&format!("crash-{round}-{worker}"))?;
            tasks.push(tokio::spawn(async move {
                loop {
                    let Some(token) = tokens.lock().ok().and_then(|mut t| t.pop()) else {
                        return;
                    };
                    match client
                        .simple_enroll(&request, &Auth::Bearer(Secret(token.clone())))
                        .await
                    {
                        Ok(der) => {
                            if let (Ok(serial), Ok(mut r)) = (serial_of(&der), received.lock()) {
                                r.serials.push(serial);
                                r.spent_tokens.push(token);
                            }
                        }
                        // The issuer was killed under us: this answer never arrived.
                        Err(_) => return,
                    }
                }
            }));
        }
        // A random moment: anywhere from the first requests to well into the stream.
        let delay = Duration::from_millis(rng.gen_range(20..400));
        tokio::time::sleep(delay).await;
        issuer.kill()?;
        for task in tasks {
            let _ = task.await;
        }
        issuer
            .serve()
            .with_context(|| format!("restart {} after kill -9", round + 1))?;
    }

    let (received, spent) = {
        let r = received.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        (r.serials.clone(), r.spent_tokens.clone())
    };
    ensure!(
        received.len() > KILLS * 5,
        "only {} enrollments across {KILLS} rounds: the load did not run",
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
    let valid: HashSet<&str> = inventory
        .iter()
        .filter(|r| r["status"] == "valid")
        .filter_map(|r| r["serial"].as_str())
        .collect();
    for serial in &received {
        assert!(
            valid.contains(serial.as_str()),
            "received {serial} is missing (or not valid) in the inventory after kill -9"
        );
    }
    // Revocable: a sample of what clients received is revoked through the admin socket.
    for serial in received.iter().step_by((received.len() / 20).max(1)) {
        run_ok(issuer.cli().args(["revoke", serial]))
            .with_context(|| format!("revoking {serial}"))?;
    }
    let revoked = issuer.inventory(&["--status", "revoked"])?;
    ensure!(
        revoked.len() >= 20.min(received.len()),
        "{} revoked",
        revoked.len()
    );

    // A token that bought a certificate stays spent across every restart.
    let client = EstClient::new(&issuer.url, std::slice::from_ref(&root_der), None)?;
    let replayed: Vec<&String> = spent.iter().step_by((spent.len() / 25).max(1)).collect();
    for token in &replayed {
        let replay = client
            .simple_enroll(&csr("replay")?, &Auth::Bearer(Secret((*token).clone())))
            .await;
        match replay {
            Err(est::Error::Server {
                status: 401,
                message,
                ..
            }) if message.contains("already used") => {}
            other => anyhow::bail!("a token spent before a kill -9 was not refused: {other:?}"),
        }
    }

    // The audit chain survived the kills intact.
    let verified = run_ok(issuer.cli().args(["audit", "verify"]))?;
    ensure!(verified.contains("audit log intact"), "{verified}");
    // The store reopened cleanly and still issues.
    let token = issuer.token("device", Some("after-crash"))?;
    client
        .simple_enroll(&csr("after-crash")?, &Auth::Bearer(Secret(token)))
        .await
        .context("enrolling after the restarts")?;
    eprintln!(
        "crash safety: {KILLS} kill -9 restarts survived; {} certificates received, all in the \
         inventory ({} rows); {} of {} spent tokens re-presented, all refused",
        received.len(),
        inventory.len(),
        replayed.len(),
        spent.len()
    );
    Ok(())
}
