//! The TPM journey with the real processes: a swtpm "manufactured" with an EK certificate
//! from a local CA (`swtpm_setup --create-ek-cert`), a real `agent run` attesting with
//! `method = "tpm"` to a real `issuer serve` that trusts that CA under `[attestation.tpm]`,
//! and a workload getting its X509-SVID from the agent with the `spiffe` crate.

use std::path::Path;
use std::process::Command;

use anyhow::{ensure, Context, Result};
use plant_tests::swtpm::Swtpm;
use plant_tests::{openssl, run_ok, Agent, Issuer};
use sha2::Digest;
use spiffe::X509Source;

const HISTORIAN: &str = "spiffe://plant.example/historian";

/// An issuer whose `[attestation.tpm]` trusts the EK CA in `ek_ca` (PEM), with `edit`
/// applied to issuer.toml's text first.
fn issuer_trusting(ek_ca: &Path, edit: impl FnOnce(String) -> String) -> Result<Issuer> {
    Issuer::start_with(|toml| {
        let text = edit(std::fs::read_to_string(toml)?);
        let table = format!("\n[attestation.tpm]\nek_ca = [\"{}\"]\n", ek_ca.display());
        std::fs::write(toml, text + &table)?;
        Ok(())
    })
}

/// The agent's `[attestation]` body for this TPM.
fn tpm_attestation(tpm: &Swtpm) -> String {
    format!("method = \"tpm\"\ntcti = \"{}\"\n", tpm.tcti_string())
}

/// The node SPIFFE ID the TPM's EK must give, computed without our code: tpm2-tools reads
/// the RSA EK certificate from NV (0x01c00002), openssl takes out its public key, and the id
/// is the hex SHA-256 of that SubjectPublicKeyInfo. Call it before an agent holds the TPM
/// (swtpm serves one connection at a time).
fn expected_node_id(tpm: &Swtpm) -> Result<String> {
    let der = tpm.dir().join("ek.der");
    run_ok(
        Command::new("tpm2_nvread")
            .args(["-C", "o", "0x01c00002", "-o"])
            .arg(&der)
            .env("TPM2TOOLS_TCTI", tpm.tcti_string())
            .env("TSS2_LOG", "all+NONE"),
    )
    .context("tpm2_nvread (apt package tpm2-tools)")?;
    let public = openssl(&[
        "x509",
        "-inform",
        "DER",
        "-in",
        &der.to_string_lossy(),
        "-noout",
        "-pubkey",
    ])?;
    let spki = plant_tests::pem_blocks(&public, "PUBLIC KEY")
        .pop()
        .context("no public key")?;
    Ok(format!(
        "spiffe://plant.example/agent/tpm/{}",
        hex::encode(sha2::Sha256::digest(&spki))
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tpm_agent_attests_and_serves_a_workload_svid_from_an_entry_under_its_node() -> Result<()>
{
    let tpm = Swtpm::start_manufactured();
    let expected = expected_node_id(&tpm)?;
    let issuer = issuer_trusting(&tpm.ek_ca_certificate(), |text| text)?;
    let mut agent = Agent::start(&issuer, &tpm_attestation(&tpm), &[])?;
    let node = agent.node_id()?;
    assert_eq!(node, expected, "the node is named for its EK");

    // The issuer knows the node by the same name.
    let agents = run_ok(issuer.cli().args(["agent", "list"]))?;
    assert!(agents.contains(&node), "issuer agent list:\n{agents}");

    issuer.create_entry(
        HISTORIAN,
        &node,
        &[&format!("unix:uid:{}", plant_tests::own_uid()?)],
        &["--ttl", "1m"],
    )?;
    agent.wait_for_svid(HISTORIAN)?;
    let endpoint = format!("unix://{}", agent.socket.display());
    let source = X509Source::builder()
        .endpoint(&endpoint)
        .build()
        .await
        .with_context(|| format!("X509Source against the agent:\n{}", agent.log()))?;
    let svid = source.svid()?;
    assert_eq!(svid.spiffe_id().to_string(), HISTORIAN);

    // The leaf chains to the bundle the agent serves, by openssl.
    let td = spiffe::TrustDomain::new("plant.example")?;
    let bundle = source
        .try_bundle_for_trust_domain(&td)
        .context("no bundle for plant.example")?;
    let dir = tempfile::tempdir()?;
    let roots: Vec<Vec<u8>> = bundle
        .authorities()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_ref().to_vec())
        .collect();
    let (bundle_pem, leaf_pem, chain_pem) = (
        dir.path().join("bundle.pem"),
        dir.path().join("leaf.pem"),
        dir.path().join("chain.pem"),
    );
    plant_tests::write_pem(&bundle_pem, &roots)?;
    plant_tests::write_pem(&leaf_pem, &chain[..1])?;
    plant_tests::write_pem(&chain_pem, &chain)?;
    let out = openssl(&[
        "verify",
        "-CAfile",
        &bundle_pem.to_string_lossy(),
        "-untrusted",
        &chain_pem.to_string_lossy(),
        &leaf_pem.to_string_lossy(),
    ])?;
    assert!(out.trim().ends_with("OK"), "openssl verify: {out}");

    let status = agent.status()?;
    assert!(
        status.contains(&node) && status.contains(HISTORIAN),
        "{status}"
    );
    source.shutdown().await;
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:\n{}",
        agent.log()
    );
    Ok(())
}

#[test]
fn an_issuer_trusting_another_manufacturer_refuses_the_tpm_agent() -> Result<()> {
    let tpm = Swtpm::start_manufactured();
    let other_manufacturer = Swtpm::start_manufactured();
    let issuer = issuer_trusting(&other_manufacturer.ek_ca_certificate(), |text| text)?;
    let error = Agent::start(&issuer, &tpm_attestation(&tpm), &[])
        .and_then(|mut agent| agent.node_id())
        .expect_err("an EK from an untrusted manufacturer was attested");
    let error = format!("{error:#}");
    assert!(
        error.contains("agent run exited with") && !error.contains("exit status: 0"),
        "the agent gives up with a failure: {error}"
    );
    assert!(
        error.contains("CN=swtpm-localca") && error.contains("[attestation.tpm] ek_ca"),
        "the agent names the EK certificate's issuer and what to configure: {error}"
    );

    let audit = run_ok(issuer.cli().args(["audit", "tail", "-n", "100"]))?;
    assert!(
        audit.contains("agent.attestation_refused") && audit.contains("ek_untrusted"),
        "no refusal in the audit log:\n{audit}"
    );
    let agents = run_ok(issuer.cli().args(["agent", "list"]))?;
    assert!(
        !agents.contains("/agent/tpm/"),
        "issuer agent list:\n{agents}"
    );
    Ok(())
}

#[test]
fn a_tpm_node_attests_again_by_itself_after_its_svid_lapsed_in_an_outage() -> Result<()> {
    let tpm = Swtpm::start_manufactured();
    // 10 s node SVIDs: lapsed 10 s at most after the outage begins.
    let mut issuer = issuer_trusting(&tpm.ek_ca_certificate(), |text| {
        text.replacen("node_svid_ttl = \"1h\"", "node_svid_ttl = \"10s\"", 1)
    })?;
    let mut agent = Agent::start(&issuer, &tpm_attestation(&tpm), &[])?;
    let node = agent.node_id()?;
    let (first, _) = agent.node_status()?;

    issuer.kill()?;
    agent.wait_status("attestation retried after the lapse", |(_, error)| {
        error.as_deref().is_some_and(|e| e.contains("attesting"))
    })?;
    // A TPM node renews by attesting, so it retries attestation from half life on; wait
    // for the SVID to lapse as well.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !agent.log().contains("node SVID expired") {
        ensure!(
            std::time::Instant::now() < deadline,
            "the node SVID did not lapse:\n{}",
            agent.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Back on the same address: the agent proves its TPM again, with no one's help.
    issuer.serve_on_the_same_agent_api()?;
    agent.wait_status("attested again", |(expires, error)| {
        expires.is_some() && expires != &first && error.is_none()
    })?;
    assert_eq!(agent.node_id()?, node, "the same TPM, the same node");
    assert!(
        agent.log().contains("node SVID expired"),
        "the node SVID lapsed during the outage:\n{}",
        agent.log()
    );
    let audit = run_ok(issuer.cli().args(["audit", "tail", "-n", "100"]))?;
    ensure!(
        audit.matches(&node).count() >= 2,
        "two attestations of {node} in the audit log:\n{audit}"
    );
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:\n{}",
        agent.log()
    );
    Ok(())
}

#[test]
fn a_tpm_node_renews_by_attesting_and_its_node_key_never_leaves_the_tpm() -> Result<()> {
    let tpm = Swtpm::start_manufactured();
    let other_tpm = Swtpm::start_manufactured();
    // One issuer trusting both TPMs' manufacturers.
    let cas = tempfile::tempdir()?;
    let both = cas.path().join("ek-cas.pem");
    std::fs::write(
        &both,
        std::fs::read_to_string(tpm.ek_ca_certificate())?
            + &std::fs::read_to_string(other_tpm.ek_ca_certificate())?,
    )?;
    // 12 s node SVIDs: renewed from about 5 s on.
    let issuer = issuer_trusting(&both, |text| {
        text.replacen("node_svid_ttl = \"1h\"", "node_svid_ttl = \"12s\"", 1)
    })?;
    let mut agent = Agent::start(&issuer, &tpm_attestation(&tpm), &[])?;
    let node = agent.node_id()?;
    let (first, _) = agent.node_status()?;
    agent.wait_status("node SVID renewed", |(expires, error)| {
        expires.is_some() && expires != &first && error.is_none()
    })?;
    let log = agent.log();
    ensure!(
        log.contains("node SVID renewed by attesting again"),
        "renewed another way:\n{log}"
    );
    assert_eq!(agent.node_id()?, node, "the same TPM, the same node");

    // No key file: a reference to a blob only this TPM loads, and only the current blob.
    let state = agent.dir.path().join("state");
    ensure!(!state.join("node-key.pem").exists(), "a node key file");
    let key_ref = std::fs::read_to_string(state.join("node-key.ref"))?;
    ensure!(key_ref.starts_with("tpm:blob=node-key-"), "{key_ref}");
    let blobs = std::fs::read_dir(&state)?
        .filter_map(std::result::Result::ok)
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tpm"))
        .count();
    assert_eq!(blobs, 1, "old node key blobs are removed");
    ensure!(
        agent.stop()?,
        "agent did not exit cleanly:\n{}",
        agent.log()
    );

    // The state directory copied to a machine with another TPM: the node key does not
    // load there, so that machine is not this node; it attests as what it is.
    let mut copy = Agent::start(&issuer, &tpm_attestation(&other_tpm), &[])?;
    let copy_node = copy.node_id()?;
    ensure!(copy.stop()?, "copy did not stop cleanly:\n{}", copy.log());
    let copy_state = copy.dir.path().join("state");
    std::fs::remove_dir_all(&copy_state)?;
    copy_tree(&state, &copy_state)?;
    std::fs::remove_file(copy_state.join("status.json"))?;
    copy.run()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !copy.log().contains("persisted node identity not") {
        ensure!(
            std::time::Instant::now() < deadline,
            "the copied node key was used:\n{}",
            copy.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    ensure!(copy.stop()?, "copy did not stop cleanly:\n{}", copy.log());
    ensure!(copy_node != node, "two TPMs, two nodes");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_issuer_refuses_mtls_renewal_of_a_tpm_node() -> Result<()> {
    use agent::daemon::node::tpm::TpmAttestation;
    use agent::daemon::node::NodeAttestation;
    use proto::agent::agent_client::AgentClient;
    use proto::agent::{attest_request, attest_response, AttestRequest};
    let tpm = Swtpm::start_manufactured();
    let issuer = issuer_trusting(&tpm.ek_ca_certificate(), |text| text)?;
    // Attest by hand with a node key in memory, as a modified agent could.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .der()
        .to_vec();
    let tcti = tpm.tcti_string();
    let (evidence, mut attestation) = {
        let csr = csr.clone();
        tokio::task::spawn_blocking(move || {
            let mut attestation = TpmAttestation::open(&tcti)?;
            let evidence = attestation.evidence(&csr)?;
            anyhow::Ok((evidence, attestation))
        })
        .await??
    };
    let mut client = AgentClient::new(plant_tests::agent_api_channel(&issuer, None).await?);
    let (sender, receiver) = tokio::sync::mpsc::channel(2);
    sender
        .send(AttestRequest {
            step: Some(attest_request::Step::Evidence(evidence)),
        })
        .await?;
    let mut responses = client
        .attest(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await?
        .into_inner();
    let Some(attest_response::Step::Challenge(challenge)) =
        responses.message().await?.context("no challenge")?.step
    else {
        anyhow::bail!("the tpm method is challenged first");
    };
    let answer = {
        let csr = csr.clone();
        tokio::task::spawn_blocking(move || attestation.answer(&challenge, &csr)).await??
    };
    sender
        .send(AttestRequest {
            step: Some(attest_request::Step::ChallengeResponse(answer)),
        })
        .await?;
    let Some(attest_response::Step::NodeSvid(svid)) =
        responses.message().await?.context("no node SVID")?.step
    else {
        anyhow::bail!("expected the node SVID");
    };
    // Its node SVID authenticates, but renewing it over mTLS is refused.
    let mut node = AgentClient::new(
        plant_tests::agent_api_channel(&issuer, Some((svid.chain, key.serialize_der()))).await?,
    );
    node.sync_entries(proto::agent::SyncEntriesRequest {})
        .await?;
    let refused = node
        .renew_node_svid(proto::agent::RenewNodeSvidRequest {
            csr: plant_tests::p256_csr("again")?,
        })
        .await
        .expect_err("mTLS renewal of a TPM node");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{refused:?}"
    );
    assert!(
        refused.message().contains("by attesting again"),
        "{}",
        refused.message()
    );
    Ok(())
}

/// Copies the files (not folders' metadata) of `from` into `to`, recursively.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

#[test]
fn a_tpm_gateways_saved_keys_are_sealed_to_its_tpm_and_a_copy_elsewhere_serves_nothing(
) -> Result<()> {
    let tpm = Swtpm::start_manufactured();
    let other_tpm = Swtpm::start_manufactured();
    let mut issuer = issuer_trusting(&tpm.ek_ca_certificate(), |text| text)?;
    let mut gateway = Agent::start(&issuer, &tpm_attestation(&tpm), &[])?;
    let node = gateway.node_id()?;
    issuer.create_entry(
        HISTORIAN,
        &node,
        &[&format!("unix:uid:{}", plant_tests::own_uid()?)],
        &["--ttl", "10m"],
    )?;
    gateway.wait_for_svid(HISTORIAN)?;
    let cache = gateway.dir.path().join("state/cache");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while plant_tests::saved_svid_files(&cache.join("svids")).is_empty() {
        ensure!(
            std::time::Instant::now() < deadline,
            "nothing saved:\n{}",
            gateway.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // The key is in the file only sealed: encrypted under a key only this TPM unseals.
    ensure!(cache.join("key.sealed").exists(), "no sealed cache key");
    for file in plant_tests::saved_svid_files(&cache.join("svids")) {
        let text = std::fs::read_to_string(&file).with_context(|| file.display().to_string())?;
        ensure!(
            text.contains("\"sealed_key\"") && !text.contains("\"key\""),
            "{text}"
        );
    }

    // A power cut during an issuer outage: the same gateway, the same TPM, serves at once.
    gateway.kill()?;
    issuer.kill()?;
    gateway.run()?;
    let probe = env!("CARGO_BIN_EXE_workload_probe");
    let out = run_ok(Command::new(probe).arg(&gateway.socket))?;
    assert_eq!(out.trim(), format!("ok {HISTORIAN}"), "{}", gateway.log());
    ensure!(
        gateway.stop()?,
        "gateway did not stop cleanly:\n{}",
        gateway.log()
    );

    // The state directory copied to a machine with another TPM: its node files come along,
    // but the saved keys do not open there, so nothing is served from them.
    let mut copy =
        Agent::start(&issuer, &tpm_attestation(&other_tpm), &[]).context("the copy's agent")?;
    ensure!(copy.stop()?, "copy did not stop cleanly:\n{}", copy.log());
    let copy_state = copy.dir.path().join("state");
    std::fs::remove_dir_all(&copy_state).context("clearing the copy's state")?;
    copy_tree(&gateway.dir.path().join("state"), &copy_state).context("copying the state")?;
    std::fs::remove_file(copy_state.join("status.json")).context("status.json")?;
    copy.run()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !copy.log().contains("sealed to another TPM") {
        ensure!(
            std::time::Instant::now() < deadline,
            "the copy did not refuse the sealed keys:\n{}",
            copy.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let status: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(copy_state.join("status.json"))?)?;
    let served = status["entries"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| !e["svid"].is_null())
        .count();
    assert_eq!(served, 0, "the copy serves SVIDs: {status}");
    Ok(())
}
