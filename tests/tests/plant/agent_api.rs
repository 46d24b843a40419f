//! The issuer's agent API end to end: a real `issuer serve`, a tonic client over real TLS
//! (rustls), node attestation with a join token, entry sync, SVID minting, JWT-SVIDs checked
//! against the published JWKS, and eviction.

use anyhow::{bail, ensure, Context, Result};
use base64::Engine;
use plant_tests::{agent_api_channel, openssl, verify_against, write_pem, Issuer};
use proto::agent::agent_client::AgentClient;
use proto::agent::{
    attest_request, attest_response, evidence, AttestRequest, Evidence, JoinTokenEvidence,
    MintJwtSvidRequest, MintX509SvidsRequest, NodeSvid, ProxyEvent, ReportProxyEventsRequest,
    SyncEntriesRequest, X509SvidRequest,
};

const TD: &str = "plant.example";

/// A fresh P-256 key and a CSR for it (DER); only the key is used by the issuer.
fn key_and_csr() -> Result<(rcgen::KeyPair, Vec<u8>)> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .der()
        .to_vec();
    Ok((key, csr))
}

/// A node: its SVID chain and key, for mTLS.
struct Node {
    svid: NodeSvid,
    key: rcgen::KeyPair,
}

impl Node {
    fn tls_identity(&self) -> (Vec<Vec<u8>>, Vec<u8>) {
        (self.svid.chain.clone(), self.key.serialize_der())
    }
}

async fn attest_with_token(issuer: &Issuer, token: &str) -> Result<Result<Node, tonic::Status>> {
    let mut client = AgentClient::new(agent_api_channel(issuer, None).await?);
    let (key, csr) = key_and_csr()?;
    let evidence = AttestRequest {
        step: Some(attest_request::Step::Evidence(Evidence {
            csr,
            method: Some(evidence::Method::JoinToken(JoinTokenEvidence {
                token: token.to_owned(),
            })),
        })),
    };
    let mut responses = match client.attest(tokio_stream::iter([evidence])).await {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    match responses.message().await {
        Ok(Some(response)) => match response.step {
            Some(attest_response::Step::NodeSvid(svid)) => Ok(Ok(Node { svid, key })),
            other => bail!("a join token gets the node SVID at once, not {other:?}"),
        },
        Ok(None) => bail!("the attestation stream ended without an answer"),
        Err(status) => Ok(Err(status)),
    }
}

fn uri_sans(der: &[u8], dir: &std::path::Path, name: &str) -> Result<String> {
    let pem = dir.join(format!("{name}.pem"));
    write_pem(&pem, &[der.to_vec()])?;
    openssl(&[
        "x509",
        "-in",
        &pem.to_string_lossy(),
        "-noout",
        "-ext",
        "subjectAltName,basicConstraints,keyUsage,extendedKeyUsage",
    ])
}

fn verify_svid_chain(
    issuer: &Issuer,
    chain: &[Vec<u8>],
    dir: &std::path::Path,
    name: &str,
) -> Result<()> {
    let leaf = dir.join(format!("{name}-leaf.pem"));
    let rest = dir.join(format!("{name}-chain.pem"));
    write_pem(&leaf, &chain[..1])?;
    ensure!(chain.len() > 1, "the chain holds the intermediates");
    write_pem(&rest, &chain[1..])?;
    verify_against(issuer, &leaf, &rest)
}

/// Checks an ES256 JWT's signature with the JWKS key named by its `kid`; returns the claims.
fn verify_jwt(token: &str, jwks: &[u8]) -> Result<serde_json::Value> {
    use p256::ecdsa::signature::Verifier;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    ensure!(parts.len() == 3, "a JWS compact token has three parts");
    let header: serde_json::Value = serde_json::from_slice(&b64.decode(parts[0])?)?;
    ensure!(
        header["alg"] == "ES256" && header["typ"] == "JWT",
        "{header}"
    );
    let jwks: serde_json::Value = serde_json::from_slice(jwks)?;
    let jwk = jwks["keys"]
        .as_array()
        .context("keys")?
        .iter()
        .find(|k| k["kid"] == header["kid"])
        .context("no JWKS key with the token's kid")?;
    ensure!(jwk["use"] == "jwt-svid" && jwk["crv"] == "P-256", "{jwk}");
    let mut point = vec![4u8];
    for c in ["x", "y"] {
        point.extend(b64.decode(jwk[c].as_str().context("coordinate")?)?);
    }
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&point)?;
    let signature = p256::ecdsa::Signature::from_slice(&b64.decode(parts[2])?)?;
    key.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature)
        .context("the JWT signature does not verify with the JWKS key")?;
    Ok(serde_json::from_slice(&b64.decode(parts[1])?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_token_nodes_sync_and_mint_only_their_own_entries_until_evicted() -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;

    // Attest two nodes; a join token works once.
    let token_a = issuer.join_token()?;
    let node_a = attest_with_token(&issuer, &token_a)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let reused = attest_with_token(&issuer, &token_a)
        .await?
        .err()
        .context("a reused join token attested")?;
    assert_eq!(reused.code(), tonic::Code::PermissionDenied, "{reused:?}");
    assert!(
        reused.message().contains("already used"),
        "{}",
        reused.message()
    );
    let node_b = attest_with_token(&issuer, &issuer.join_token()?)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;

    let a_id = node_a.svid.spiffe_id.clone();
    let b_id = node_b.svid.spiffe_id.clone();
    assert!(
        a_id.starts_with(&format!("spiffe://{TD}/agent/join_token/")),
        "{a_id}"
    );
    assert!(
        !a_id.contains(&token_a),
        "the node id is not the token secret"
    );
    assert_ne!(a_id, b_id);
    verify_svid_chain(&issuer, &node_a.svid.chain, dir.path(), "node-a")?;
    let text = uri_sans(&node_a.svid.chain[0], dir.path(), "node-a")?;
    assert!(text.contains(&format!("URI:{a_id}")), "{text}");
    assert!(text.contains("CA:FALSE"), "{text}");

    // Malformed evidence is the agent's error, not a refusal.
    let mut client = AgentClient::new(agent_api_channel(&issuer, None).await?);
    let no_csr = AttestRequest {
        step: Some(attest_request::Step::Evidence(Evidence {
            csr: b"not a CSR".to_vec(),
            method: Some(evidence::Method::JoinToken(JoinTokenEvidence {
                token: issuer.join_token()?,
            })),
        })),
    };
    let bad = client
        .attest(tokio_stream::iter([no_csr]))
        .await?
        .into_inner()
        .message()
        .await
        .err()
        .context("a bad CSR attested")?;
    assert_eq!(bad.code(), tonic::Code::InvalidArgument, "{bad:?}");

    // An EST enrollment token is not a join token.
    let est_token = issuer.token("device", Some("plc-1"))?;
    let refused = attest_with_token(&issuer, &est_token)
        .await?
        .err()
        .context("an EST token attested")?;
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);

    // Entries: one per node.
    let entry_a = issuer.create_entry(
        &format!("spiffe://{TD}/historian"),
        &a_id,
        &["unix:uid:1000"],
        &["--dns", "historian.plant.example", "--ttl", "10m"],
    )?;
    let entry_b = issuer.create_entry(
        &format!("spiffe://{TD}/hmi"),
        &b_id,
        &["unix:uid:1001"],
        &[],
    )?;
    let duplicate = plant_tests::run(issuer.cli().args([
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/historian"),
        "--parent",
        &a_id,
        "--selector",
        "unix:uid:1000",
    ]))?;
    assert!(!duplicate.status.success(), "a duplicate entry was created");
    let foreign = plant_tests::run(issuer.cli().args([
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://other.example/x",
        "--parent",
        &a_id,
        "--selector",
        "unix:uid:1000",
    ]))?;
    assert!(
        String::from_utf8_lossy(&foreign.stderr).contains("trust domain"),
        "{foreign:?}"
    );

    // Node A, authenticated by its node SVID, sees only its own entry and the bundles.
    let mut client_a =
        AgentClient::new(agent_api_channel(&issuer, Some(node_a.tls_identity())).await?);
    let synced = client_a
        .sync_entries(SyncEntriesRequest {})
        .await?
        .into_inner();
    let ids: Vec<&str> = synced.entries.iter().map(|e| e.id.as_str()).collect();
    assert_eq!(ids, [entry_a.as_str()]);
    assert_eq!(synced.entries[0].selectors, ["unix:uid:1000"]);
    assert_eq!(synced.x509_bundle, node_a.svid.bundle);
    let root_pem = std::fs::read_to_string(issuer.root_pem())?;
    assert_eq!(
        synced.x509_bundle,
        plant_tests::pem_blocks(&root_pem, "CERTIFICATE")
    );

    // Its own entry mints; node B's entry is refused, by name.
    let (_workload_key, csr) = key_and_csr()?;
    let minted = client_a
        .mint_x509_svids(MintX509SvidsRequest {
            requests: vec![X509SvidRequest {
                entry_id: entry_a.clone(),
                csr: csr.clone(),
            }],
        })
        .await?
        .into_inner();
    assert_eq!(minted.svids.len(), 1);
    let svid = &minted.svids[0];
    assert_eq!(svid.spiffe_id, format!("spiffe://{TD}/historian"));
    verify_svid_chain(&issuer, &svid.chain, dir.path(), "workload")?;
    let text = uri_sans(&svid.chain[0], dir.path(), "workload")?;
    assert!(
        text.contains(&format!("URI:spiffe://{TD}/historian")),
        "{text}"
    );
    assert!(text.contains("DNS:historian.plant.example"), "{text}");
    assert!(
        text.contains("TLS Web Server Authentication, TLS Web Client Authentication"),
        "{text}"
    );
    assert_eq!(
        text.matches("URI:").count(),
        1,
        "exactly one URI SAN: {text}"
    );
    let denied = client_a
        .mint_x509_svids(MintX509SvidsRequest {
            requests: vec![X509SvidRequest {
                entry_id: entry_b.clone(),
                csr,
            }],
        })
        .await
        .err()
        .context("node A minted node B's entry")?;
    assert_eq!(denied.code(), tonic::Code::PermissionDenied);
    assert!(denied.message().contains(&entry_b), "{}", denied.message());

    // A JWT-SVID verifies with the JWKS from the sync.
    let jwt = client_a
        .mint_jwt_svid(MintJwtSvidRequest {
            entry_id: entry_a.clone(),
            audience: vec!["db".into()],
        })
        .await?
        .into_inner();
    let claims = verify_jwt(&jwt.token, &synced.jwt_bundle)?;
    assert_eq!(claims["sub"], format!("spiffe://{TD}/historian"));
    assert_eq!(claims["aud"], "db");
    assert_eq!(claims["exp"], jwt.expires_at);
    let no_audience = client_a
        .mint_jwt_svid(MintJwtSvidRequest {
            entry_id: entry_a.clone(),
            audience: vec![],
        })
        .await
        .err()
        .context("a JWT-SVID without audience")?;
    assert_eq!(no_audience.code(), tonic::Code::InvalidArgument);

    // Without a client certificate only Attest is open.
    let mut anonymous = AgentClient::new(agent_api_channel(&issuer, None).await?);
    let refused = anonymous
        .sync_entries(SyncEntriesRequest {})
        .await
        .err()
        .context("anonymous sync")?;
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);

    // Evicted: refused, and listed as evicted; node B is untouched.
    plant_tests::run_ok(issuer.cli().args(["agent", "evict", &a_id]))?;
    let mut client_a =
        AgentClient::new(agent_api_channel(&issuer, Some(node_a.tls_identity())).await?);
    let evicted = client_a
        .sync_entries(SyncEntriesRequest {})
        .await
        .err()
        .context("evicted node synced")?;
    assert_eq!(evicted.code(), tonic::Code::PermissionDenied, "{evicted:?}");
    let agents: Vec<serde_json::Value> = serde_json::from_str(&plant_tests::run_ok(
        issuer.cli().args(["agent", "list", "--format", "json"]),
    )?)?;
    let evicted_flag = |id: &str| {
        agents
            .iter()
            .find(|a| a["spiffe_id"] == id)
            .map(|a| a["evicted"].clone())
    };
    assert_eq!(evicted_flag(&a_id), Some(serde_json::Value::Bool(true)));
    assert_eq!(evicted_flag(&b_id), Some(serde_json::Value::Bool(false)));
    let revoked = issuer.inventory(&["--status", "revoked"])?;
    assert_eq!(
        revoked.len(),
        1,
        "the evicted node's SVID is revoked: {revoked:?}"
    );
    let mut client_b =
        AgentClient::new(agent_api_channel(&issuer, Some(node_b.tls_identity())).await?);
    let synced_b = client_b
        .sync_entries(SyncEntriesRequest {})
        .await?
        .into_inner();
    assert_eq!(synced_b.entries.len(), 1);

    // Entries are listed and deleted by id.
    let listed: Vec<serde_json::Value> = serde_json::from_str(&plant_tests::run_ok(
        issuer
            .cli()
            .args(["entry", "list", "--format", "json", "--parent", &b_id]),
    )?)?;
    assert_eq!(listed.len(), 1);
    plant_tests::run_ok(issuer.cli().args(["entry", "delete", &entry_b]))?;
    let synced_b = client_b
        .sync_entries(SyncEntriesRequest {})
        .await?
        .into_inner();
    assert!(synced_b.entries.is_empty());

    let audit = plant_tests::run_ok(issuer.cli().args(["audit", "tail", "-n", "100"]))?;
    for kind in [
        "agent.attested",
        "agent.attestation_refused",
        "entry.created",
        "entry.deleted",
        "agent.evicted",
    ] {
        assert!(audit.contains(kind), "no {kind} in the audit log:\n{audit}");
    }
    Ok(())
}

/// Attests with x509pop: the device certificate (DER) and its key (PKCS#8 PEM) from EST
/// enrollment sign the issuer's nonce || SHA-256(csr).
async fn attest_x509pop(
    issuer: &Issuer,
    device_der: &[u8],
    device_key_pem: &str,
) -> Result<Result<Node, tonic::Status>> {
    use p256::ecdsa::signature::Signer;
    use p256::pkcs8::DecodePrivateKey;
    use proto::agent::{
        challenge, challenge_response, ChallengeResponse, X509PopChallengeResponse, X509PopEvidence,
    };
    use sha2::Digest;
    let mut client = AgentClient::new(agent_api_channel(issuer, None).await?);
    let (key, csr) = key_and_csr()?;
    let (sender, receiver) = tokio::sync::mpsc::channel(2);
    sender
        .send(AttestRequest {
            step: Some(attest_request::Step::Evidence(Evidence {
                csr: csr.clone(),
                method: Some(evidence::Method::X509pop(X509PopEvidence {
                    chain: vec![device_der.to_vec()],
                })),
            })),
        })
        .await?;
    let mut responses = match client
        .attest(tokio_stream::wrappers::ReceiverStream::new(receiver))
        .await
    {
        Ok(r) => r.into_inner(),
        Err(status) => return Ok(Err(status)),
    };
    let challenge = match responses.message().await {
        Ok(Some(r)) => match r.step {
            Some(attest_response::Step::Challenge(c)) => c,
            other => bail!("x509pop is challenged first, not {other:?}"),
        },
        Ok(None) => bail!("the stream ended"),
        Err(status) => return Ok(Err(status)),
    };
    let Some(challenge::Method::X509pop(c)) = challenge.method else {
        bail!("not an x509pop challenge");
    };
    let mut message = c.nonce.clone();
    message.extend_from_slice(&sha2::Sha256::digest(&csr));
    let device_key = p256::ecdsa::SigningKey::from_pkcs8_pem(device_key_pem)?;
    let signature: p256::ecdsa::Signature = device_key.sign(&message);
    sender
        .send(AttestRequest {
            step: Some(attest_request::Step::ChallengeResponse(ChallengeResponse {
                method: Some(challenge_response::Method::X509pop(
                    X509PopChallengeResponse {
                        signature: signature.to_der().as_bytes().to_vec(),
                    },
                )),
            })),
        })
        .await?;
    match responses.message().await {
        Ok(Some(r)) => match r.step {
            Some(attest_response::Step::NodeSvid(svid)) => Ok(Ok(Node { svid, key })),
            other => bail!("expected the node SVID, got {other:?}"),
        },
        Ok(None) => bail!("the stream ended"),
        Err(status) => Ok(Err(status)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_enrolled_device_attests_by_x509pop_again_after_eviction_but_not_once_revoked(
) -> Result<()> {
    let issuer = Issuer::start()?;
    let dir = tempfile::tempdir()?;
    let (cert_pem, key_pem) =
        plant_tests::enroll_with_token(&issuer, dir.path(), "gw-1", "device")?;
    let device = plant_tests::pem_blocks(&std::fs::read_to_string(&cert_pem)?, "CERTIFICATE")
        .into_iter()
        .next()
        .context("enrolled certificate")?;
    let key = std::fs::read_to_string(&key_pem)?;

    let first = attest_x509pop(&issuer, &device, &key)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let node_id = format!("spiffe://{TD}/agent/x509pop/gw-1");
    assert_eq!(first.svid.spiffe_id, node_id);
    verify_svid_chain(&issuer, &first.svid.chain, dir.path(), "x509pop-node")?;

    // Attesting again replaces the node SVID: the old one no longer authenticates.
    let second = attest_x509pop(&issuer, &device, &key)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let mut old = AgentClient::new(agent_api_channel(&issuer, Some(first.tls_identity())).await?);
    let stale = old
        .sync_entries(SyncEntriesRequest {})
        .await
        .err()
        .context("a replaced node SVID still authenticates")?;
    assert_eq!(stale.code(), tonic::Code::Unauthenticated, "{stale:?}");
    let mut current =
        AgentClient::new(agent_api_channel(&issuer, Some(second.tls_identity())).await?);
    current.sync_entries(SyncEntriesRequest {}).await?;

    // Renewal gives a new node SVID for a new key, which then authenticates.
    let (renewed_key, csr) = key_and_csr()?;
    let renewed = current
        .renew_node_svid(proto::agent::RenewNodeSvidRequest { csr })
        .await?
        .into_inner();
    assert_eq!(renewed.spiffe_id, node_id);
    let renewed = Node {
        svid: renewed,
        key: renewed_key,
    };
    let mut client =
        AgentClient::new(agent_api_channel(&issuer, Some(renewed.tls_identity())).await?);
    client.sync_entries(SyncEntriesRequest {}).await?;

    // A batch comes back in request order; an oversized batch is refused before any work.
    let entries: Vec<String> = ["opcua", "historian"]
        .iter()
        .map(|name| {
            issuer.create_entry(
                &format!("spiffe://{TD}/{name}"),
                &node_id,
                &["unix:uid:1000"],
                &[],
            )
        })
        .collect::<Result<_>>()?;
    let requests: Vec<X509SvidRequest> = entries
        .iter()
        .map(|id| {
            Ok(X509SvidRequest {
                entry_id: id.clone(),
                csr: key_and_csr()?.1,
            })
        })
        .collect::<Result<_>>()?;
    let minted = client
        .mint_x509_svids(MintX509SvidsRequest {
            requests: requests.clone(),
        })
        .await?
        .into_inner();
    let got: Vec<(&str, &str)> = minted
        .svids
        .iter()
        .map(|s| (s.entry_id.as_str(), s.spiffe_id.as_str()))
        .collect();
    let opcua = format!("spiffe://{TD}/opcua");
    let historian = format!("spiffe://{TD}/historian");
    assert_eq!(
        got,
        [
            (entries[0].as_str(), opcua.as_str()),
            (entries[1].as_str(), historian.as_str())
        ]
    );
    let oversized = client
        .mint_x509_svids(MintX509SvidsRequest {
            requests: vec![requests[0].clone(); 1001],
        })
        .await
        .err()
        .context("an oversized batch was minted")?;
    assert_eq!(oversized.code(), tonic::Code::InvalidArgument);
    assert!(
        oversized.message().contains("at most 1000"),
        "{}",
        oversized.message()
    );

    // Evicted, an x509pop node may attest again (as in SPIRE).
    plant_tests::run_ok(issuer.cli().args(["agent", "evict", &node_id]))?;
    let refused = client
        .sync_entries(SyncEntriesRequest {})
        .await
        .err()
        .context("evicted")?;
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    let back = attest_x509pop(&issuer, &device, &key)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let mut client = AgentClient::new(agent_api_channel(&issuer, Some(back.tls_identity())).await?);
    client.sync_entries(SyncEntriesRequest {}).await?;

    // A revoked device certificate attests no more.
    issuer.revoke(&cert_pem)?;
    let refused = attest_x509pop(&issuer, &device, &key)
        .await?
        .err()
        .context("a revoked device certificate attested")?;
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("revoked"),
        "{}",
        refused.message()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_and_workload_svids_chain_through_the_signing_key_and_pass_pkilint() -> Result<()> {
    let issuer = Issuer::start_with(plant_tests::enable_short_lived_keys)?;
    let dir = tempfile::tempdir()?;
    let node = attest_with_token(&issuer, &issuer.join_token()?)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let entry = issuer.create_entry(
        &format!("spiffe://{TD}/historian"),
        &node.svid.spiffe_id,
        &["unix:uid:1000"],
        &["--dns", "historian.plant.example"],
    )?;
    let mut client = AgentClient::new(agent_api_channel(&issuer, Some(node.tls_identity())).await?);
    let (_key, csr) = key_and_csr()?;
    let minted = client
        .mint_x509_svids(MintX509SvidsRequest {
            requests: vec![X509SvidRequest {
                entry_id: entry,
                csr,
            }],
        })
        .await?
        .into_inner();
    // Signed by a short-lived key: the chain is the leaf, that key's certificate and the
    // issuing CA, and nothing else (no other published signing key, no root).
    for (name, chain) in [
        ("node", &node.svid.chain),
        ("workload", &minted.svids[0].chain),
    ] {
        assert_eq!(chain.len(), 3, "{name} chain");
        verify_svid_chain(&issuer, chain, dir.path(), name)?;
    }
    for (name, der) in [
        ("node-svid", &node.svid.chain[0]),
        ("workload-svid", &minted.svids[0].chain[0]),
    ] {
        let pem = dir.path().join(format!("{name}.pem"));
        write_pem(&pem, std::slice::from_ref(der))?;
        let findings: Vec<String> = plant_tests::pkilint_findings(&pem)?
            .into_iter()
            // pkilint checks URIs with python-validators' `url`, which knows only schemes
            // like http and ftp and so calls every spiffe:// URI invalid; SPIFFE IDs are
            // checked against SPIFFE-ID.md by the issuer's own SpiffeId type instead.
            .filter(|f| {
                !(f["code"] == "pkix.invalid_uri_syntax"
                    && f["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("\"spiffe://")))
            })
            .map(|f| format!("{} {} {}", f["severity"], f["code"], f["message"]))
            .collect();
        assert!(findings.is_empty(), "{name}: {findings:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_device_svid_is_owned_by_the_device_behind_its_gateway() -> Result<()> {
    let issuer = Issuer::start()?;
    let gateway = attest_with_token(&issuer, &issuer.join_token()?)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let gateway_id = gateway.svid.spiffe_id.clone();
    let press = issuer.create_entry(
        &format!("spiffe://{TD}/plc/press-7"),
        &gateway_id,
        &["legacy:device:press-7"],
        &[],
    )?;
    let historian = issuer.create_entry(
        &format!("spiffe://{TD}/historian"),
        &gateway_id,
        &["unix:uid:1000"],
        &[],
    )?;
    let mut client =
        AgentClient::new(agent_api_channel(&issuer, Some(gateway.tls_identity())).await?);
    let requests = [&press, &historian]
        .into_iter()
        .map(|entry_id| {
            let (_key, csr) = key_and_csr()?;
            Ok(X509SvidRequest {
                entry_id: entry_id.clone(),
                csr,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let minted = client
        .mint_x509_svids(MintX509SvidsRequest { requests })
        .await?
        .into_inner();
    assert_eq!(minted.svids.len(), 2);

    // The inventory names the PLC and the gateway holding its identity; other workload
    // SVIDs keep their entry as owner.
    let owner_of = |subject: &str| -> Result<String> {
        let rows = issuer.inventory(&["--subject", subject])?;
        ensure!(rows.len() == 1, "one {subject} certificate: {rows:?}");
        Ok(rows[0]["owner"].as_str().context("owner")?.to_owned())
    };
    assert_eq!(
        owner_of("plc/press-7")?,
        format!("legacy:press-7@{gateway_id}")
    );
    assert_eq!(owner_of("historian")?, format!("entry:{historian}"));
    let by_owner = issuer.inventory(&["--owner", &format!("legacy:press-7@{gateway_id}")])?;
    assert_eq!(by_owner.len(), 1, "{by_owner:?}");
    Ok(())
}

/// Audit records of `kind` (the `issuer audit tail` lines that name it).
fn audit_lines(issuer: &Issuer, kind: &str) -> Result<Vec<String>> {
    let tail = plant_tests::run_ok(issuer.cli().args(["audit", "tail", "-n", "200"]))?;
    Ok(tail
        .lines()
        .filter(|l| l.contains(&format!(" {kind} ")))
        .map(str::to_owned)
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_modbus_requests_reported_by_a_node_land_in_the_issuer_audit_log() -> Result<()> {
    use agent::daemon::proxy_audit::{ProxyAudit, RefusedRequest};
    let issuer = Issuer::start()?;
    let node = attest_with_token(&issuer, &issuer.join_token()?)
        .await?
        .map_err(|s| anyhow::anyhow!("{s:?}"))?;
    let node_id = node.svid.spiffe_id.clone();

    // The agent's reporter, over the agent's own issuer client with the node SVID.
    let key = agent::daemon::svid::KeyPair::from_pkcs8_pem(&node.key.serialize_pem())?;
    let identity =
        agent::daemon::issuer_client::NodeIdentity::from_node_svid(node.svid.clone(), key)?;
    let root_pem = std::fs::read_to_string(issuer.root_pem())?;
    let endpoint = agent::daemon::issuer_client::IssuerEndpoint::new(
        &issuer.agent_api_url()?,
        &plant_tests::pem_blocks(&root_pem, "CERTIFICATE"),
    )?;
    // Refusals before the node has a client are kept until it has one.
    let (publish, issuer_client) = tokio::sync::watch::channel(None);
    let audit = ProxyAudit::spawn(issuer_client);
    let peer = proto::SpiffeId::new(&format!("spiffe://{TD}/historian"))?;
    for transaction_id in [0x0101, 0x0102, 0x0103] {
        audit.refused(RefusedRequest {
            device: "press-7".into(),
            peer: peer.clone(),
            function_code: 6,
            transaction_id,
            unit_id: 17,
        });
    }
    publish.send(Some(endpoint.client(Some(&identity))?))?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let refused = loop {
        let lines = audit_lines(&issuer, "proxy.request_refused")?;
        if lines.len() >= 3 || std::time::Instant::now() > deadline {
            break lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    };
    assert_eq!(refused.len(), 3, "{refused:?}");
    for (line, transaction_id) in refused.iter().zip([0x0101, 0x0102, 0x0103]) {
        for expected in [
            format!("\"node\":\"{node_id}\""),
            "\"device\":\"press-7\"".to_owned(),
            format!("\"peer\":\"{peer}\""),
            "\"function_code\":6".to_owned(),
            format!("\"transaction_id\":{transaction_id}"),
            "\"unit_id\":17".to_owned(),
        ] {
            assert!(line.contains(&expected), "{expected} not in {line}");
        }
    }

    // A drop summary, sent as the agent would after its queue overflowed.
    let mut client = AgentClient::new(agent_api_channel(&issuer, Some(node.tls_identity())).await?);
    let refused_event = |device: &str| ProxyEvent {
        device: device.to_owned(),
        peer_spiffe_id: peer.to_string(),
        kind: "modbus.request_refused".into(),
        function_code: 16,
        transaction_id: 9,
        unit_id: 1,
        at: 1_700_000_000,
        count: 1,
    };
    client
        .report_proxy_events(ReportProxyEventsRequest {
            events: vec![ProxyEvent {
                kind: "proxy.events_dropped".into(),
                count: 7,
                at: 1_700_000_000,
                ..ProxyEvent::default()
            }],
        })
        .await?;
    let dropped = audit_lines(&issuer, "proxy.events_dropped")?;
    assert_eq!(dropped.len(), 1, "{dropped:?}");
    assert!(dropped[0].contains("\"count\":7"), "{}", dropped[0]);

    // Bad batches are refused whole, saying why, and record nothing.
    let too_many = client
        .report_proxy_events(ReportProxyEventsRequest {
            events: vec![refused_event("press-7"); 1001],
        })
        .await
        .err()
        .context("1001 events were accepted")?;
    assert_eq!(
        too_many.code(),
        tonic::Code::InvalidArgument,
        "{too_many:?}"
    );
    assert!(
        too_many.message().contains("at most 1000"),
        "{}",
        too_many.message()
    );
    let bad_device = client
        .report_proxy_events(ReportProxyEventsRequest {
            events: vec![refused_event("press-7"), refused_event("press 7; rm")],
        })
        .await
        .err()
        .context("a bad device name was accepted")?;
    assert_eq!(bad_device.code(), tonic::Code::InvalidArgument);
    assert!(
        bad_device.message().contains("proxy event 1: device"),
        "{}",
        bad_device.message()
    );
    assert_eq!(audit_lines(&issuer, "proxy.request_refused")?.len(), 3);

    // Only a node reports.
    let mut anonymous = AgentClient::new(agent_api_channel(&issuer, None).await?);
    let anonymous = anonymous
        .report_proxy_events(ReportProxyEventsRequest {
            events: vec![refused_event("press-7")],
        })
        .await
        .err()
        .context("an anonymous report was accepted")?;
    assert_eq!(anonymous.code(), tonic::Code::Unauthenticated);

    let verified = plant_tests::run_ok(issuer.cli().args(["audit", "verify"]))?;
    assert!(verified.contains("audit log intact"), "{verified}");
    Ok(())
}
