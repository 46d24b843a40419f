//! The commissioning journeys against an in-process EST server: `est::server::router` over
//! real TLS on a loopback port, with a small test CA behind it (the real issuer's journeys
//! live in the workspace's `tests/`). Each test starts its own server on port 0.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use agent::certificate::CertificateFacts;
use agent::commissioning::batch::{self, BatchOptions};
use agent::commissioning::credentials::{AuthScheme, EnrollmentToken, Pkcs12Password};
use agent::commissioning::enrollment::{self, Device, EnrollOptions, KeyOrigin};
use agent::commissioning::reenrollment::{self, CurrentKey, ReenrollOptions};
use agent::pem_files::{self, Overwrite, CA_FILE, CERT_FILE, CHAIN_FILE, KEY_FILE};
use agent::Error;
use est::csr::RequestedName;
use est::server::{
    Backend, Credentials, EnrollRequest, Operation, ServerKeygenResult, ServerOptions,
    TlsClientCertificate,
};
use est::{Label, Refusal};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A CA that issues from a CSR's names and key, with single-use tokens.
struct TestCa {
    root: Vec<u8>,
    issuing: Vec<u8>,
    issuer: rcgen::Issuer<'static, KeyPair>,
    /// token -> the subject it is bound to; removed when used.
    tokens: Mutex<HashMap<String, String>>,
    issued: Mutex<Vec<Vec<u8>>>,
    serial: AtomicU64,
}

fn ca_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
}

impl TestCa {
    /// The CA, plus the TLS server's chain and key (issued by the root for 127.0.0.1).
    fn new() -> (Self, Vec<Vec<u8>>, Vec<u8>) {
        let root_key = KeyPair::generate().expect("key");
        let root_params = ca_params("Test Plant Root");
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = rcgen::Issuer::new(root_params, root_key);
        let issuing_key = KeyPair::generate().expect("key");
        let issuing_params = ca_params("Test Plant Issuing CA");
        let issuing = issuing_params
            .signed_by(&issuing_key, &root_issuer)
            .expect("issuing");
        let tls_key = KeyPair::generate().expect("key");
        let mut tls_params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        tls_params
            .subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().expect("ip")));
        // The issuer's own identity, which EST clients require of the server.
        tls_params.subject_alt_names.push(SanType::URI(
            "spiffe://plant.test/issuer".try_into().expect("uri"),
        ));
        tls_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let tls = tls_params
            .signed_by(&tls_key, &root_issuer)
            .expect("tls cert");
        let ca = Self {
            root: root.der().to_vec(),
            issuing: issuing.der().to_vec(),
            issuer: rcgen::Issuer::new(issuing_params, issuing_key),
            tokens: Mutex::new(HashMap::new()),
            issued: Mutex::new(Vec::new()),
            serial: AtomicU64::new(0x1000),
        };
        (ca, vec![tls.der().to_vec()], tls_key.serialize_der())
    }

    fn add_token(&self, token: &str, subject: &str) {
        self.tokens
            .lock()
            .expect("lock")
            .insert(token.into(), subject.into());
    }

    fn token_unused(&self, token: &str) -> bool {
        self.tokens.lock().expect("lock").contains_key(token)
    }

    fn consume(&self, credentials: &Credentials, subject: &str) -> Result<(), est::Error> {
        let token = match credentials {
            Credentials::Basic { user, password } if user == subject => &password.0,
            Credentials::Bearer(token) => &token.0,
            _ => {
                return Err(est::Error::refused(
                    Refusal::Unauthorized,
                    "token unknown or already used",
                ))
            }
        };
        let mut tokens = self.tokens.lock().expect("lock");
        match tokens.get(token) {
            Some(bound) if bound == subject => {
                tokens.remove(token);
                Ok(())
            }
            _ => Err(est::Error::refused(
                Refusal::Unauthorized,
                "token unknown or already used",
            )),
        }
    }

    fn issue(&self, request: &EnrollRequest, public_point: &[u8]) -> Result<Vec<u8>, est::Error> {
        let cn = request.csr.common_name().unwrap_or_default();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, cn);
        for name in &request.csr.requested().names {
            params.subject_alt_names.push(match name {
                RequestedName::Dns(d) => SanType::DnsName(d.as_str().try_into().expect("dns")),
                RequestedName::Ip(ip) => SanType::IpAddress(*ip),
                RequestedName::Uri(u) => SanType::URI(u.as_str().try_into().expect("uri")),
                _ => return Err(est::Error::refused(Refusal::BadRequest, "unsupported SAN")),
            });
        }
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let serial = self.serial.fetch_add(1, Ordering::SeqCst);
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial.to_be_bytes()[5..]));
        let spki = hsm::PublicKey::from_uncompressed_point(public_point).expect("point");
        let spki = rcgen::SubjectPublicKeyInfo::from_der(spki.spki_der()).expect("spki");
        let cert = params
            .signed_by(&spki, &self.issuer)
            .expect("sign")
            .der()
            .to_vec();
        self.issued.lock().expect("lock").push(cert.clone());
        Ok(cert)
    }
}

impl Backend for TestCa {
    fn knows_label(&self, label: Option<&Label>) -> bool {
        label.is_none_or(|l| l.as_str() == "plc")
    }

    fn ca_certificates(&self, _label: Option<&Label>) -> Vec<Vec<u8>> {
        vec![self.issuing.clone(), self.root.clone()]
    }

    fn csr_attributes(&self, _label: Option<&Label>) -> Vec<est::csr_attrs::AttrOrOid> {
        Vec::new()
    }

    async fn enroll(&self, request: EnrollRequest) -> Result<Vec<u8>, est::Error> {
        if request.operation == Operation::SimpleReenroll {
            let presented = request.client_certificate.as_ref().and_then(|c| c.leaf());
            let Some(current) = presented else {
                return Err(est::Error::refused(Refusal::Unauthorized, "no client cert"));
            };
            if !self
                .issued
                .lock()
                .expect("lock")
                .iter()
                .any(|c| c == current)
            {
                return Err(est::Error::refused(
                    Refusal::Forbidden,
                    "foreign certificate",
                ));
            }
            let current = CertificateFacts::from_der("current", current).expect("parse");
            let subject =
                der::Encode::to_der(&current.parsed().tbs_certificate.subject).expect("der");
            if subject != request.csr.subject_der() {
                return Err(est::Error::refused(
                    Refusal::BadRequest,
                    "CSR Subject differs from the certificate being renewed",
                ));
            }
        } else {
            let cn = request.csr.common_name().unwrap_or_default().to_owned();
            self.consume(&request.credentials, &cn)?;
        }
        let point = request.csr.public_key().to_vec();
        self.issue(&request, &point)
    }

    async fn server_keygen(
        &self,
        request: EnrollRequest,
    ) -> Result<ServerKeygenResult, est::Error> {
        let cn = request.csr.common_name().unwrap_or_default().to_owned();
        self.consume(&request.credentials, &cn)?;
        let key = hsm::SoftKey::generate().expect("key");
        let certificate = self.issue(&request, hsm::Signer::public_key(&key).point())?;
        Ok(ServerKeygenResult {
            pkcs8_der: key.to_pkcs8_der().expect("pkcs8").to_vec(),
            certificate,
        })
    }
}

/// A running test server: its URL and the CA behind it.
struct Server {
    url: String,
    ca: Arc<TestCa>,
}

impl Server {
    async fn start() -> Self {
        let (ca, tls_chain, tls_key) = TestCa::new();
        let ca = Arc::new(ca);
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca.root.clone()))
            .expect("root");
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .allow_unauthenticated()
        .build()
        .expect("verifier");
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                tls_chain.into_iter().map(CertificateDer::from).collect(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(tls_key)),
            )
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let router = est::server::router(Arc::clone(&ca), ServerOptions::default());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let router = router.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let peer: Option<Vec<Vec<u8>>> = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|certs| certs.iter().map(|c| c.to_vec()).collect());
                    let router = match peer {
                        Some(chain) => {
                            router.layer(axum::Extension(TlsClientCertificate(Arc::new(chain))))
                        }
                        None => router,
                    };
                    let service = hyper_util::service::TowerToHyperService::new(router);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            url: format!("https://127.0.0.1:{port}"),
            ca,
        }
    }

    fn fingerprint(&self) -> String {
        est::fingerprint(&self.ca.root)
    }
}

fn token(text: &str) -> EnrollmentToken {
    EnrollmentToken::new(text).expect("token")
}

fn plc_label() -> Option<Label> {
    Some("plc".parse().expect("label"))
}

fn local_enrollment(server: &Server, subject: &str, secret: &str, out: &Path) -> EnrollOptions {
    EnrollOptions {
        server: server.url.clone(),
        ca_fingerprint: server.fingerprint(),
        device: Device::new(
            subject,
            plc_label(),
            vec![format!("{subject}.cell2.plant")],
            vec!["10.2.0.7".parse::<IpAddr>().expect("ip")],
            token(secret),
        )
        .expect("device"),
        auth: AuthScheme::Basic,
        out: Some(out.to_owned()),
        overwrite: Overwrite::Refuse,
        keys: KeyOrigin::Local,
    }
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("meta").permissions().mode() & 0o777
}

#[tokio::test]
async fn enrollment_pins_the_ca_and_writes_key_cert_chain_and_root() {
    let server = Server::start().await;
    server.ca.add_token("tok-7", "plc-7");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("plc-7");

    let enrolled = enrollment::enroll(local_enrollment(&server, "plc-7", "tok-7", &out))
        .await
        .expect("enrolled");

    assert_eq!(enrolled.subject, "CN=plc-7");
    assert_eq!(enrolled.files.len(), 4);
    assert_eq!(mode(&out.join(KEY_FILE)), 0o600);
    let cert = pem_files::read_certificates(&out.join(CERT_FILE)).expect("cert");
    let leaf = CertificateFacts::from_der("leaf", &cert[0]).expect("leaf");
    assert_eq!(leaf.serial_hex(), enrolled.serial);
    let key = hsm::SoftKey::open(&out.join(KEY_FILE)).expect("key opens");
    leaf.ensure_key("leaf", hsm::Signer::public_key(&key))
        .expect("cert is for the written key");
    assert_eq!(
        pem_files::read_certificates(&out.join(CHAIN_FILE)).expect("chain"),
        vec![server.ca.issuing.clone()]
    );
    assert_eq!(
        pem_files::read_certificates(&out.join(CA_FILE)).expect("ca"),
        vec![server.ca.root.clone()]
    );
    let summary = enrolled.to_string();
    assert!(summary.contains("not after:"), "{summary}");
    assert!(summary.contains("key.pem"), "{summary}");
}

#[tokio::test]
async fn used_token_gets_the_servers_words_and_advice() {
    let server = Server::start().await;
    server.ca.add_token("tok-7", "plc-7");
    let dir = tempfile::tempdir().expect("tempdir");
    enrollment::enroll(local_enrollment(
        &server,
        "plc-7",
        "tok-7",
        &dir.path().join("a"),
    ))
    .await
    .expect("first use");
    let err = enrollment::enroll(local_enrollment(
        &server,
        "plc-7",
        "tok-7",
        &dir.path().join("b"),
    ))
    .await
    .expect_err("second use");
    let text = err.to_string();
    assert!(
        text.contains("EST server answered 401: token unknown or already used; ask the PKI operator for a new token"),
        "{text}"
    );
    assert!(!err.is_usage());
    // Nothing is left behind for the failed device, so a retry with a new token just works.
    assert!(!dir.path().join("b").join(KEY_FILE).exists());
}

#[tokio::test]
async fn wrong_fingerprint_stops_before_any_token_is_sent() {
    let server = Server::start().await;
    server.ca.add_token("tok-7", "plc-7");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = local_enrollment(&server, "plc-7", "tok-7", dir.path());
    options.ca_fingerprint = "00".repeat(32);
    let err = enrollment::enroll(options).await.expect_err("refused");
    assert!(
        matches!(
            &err,
            Error::Est {
                source: est::Error::Fingerprint { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("Do not enroll"), "{err}");
    assert!(server.ca.token_unused("tok-7"));
    assert!(!dir.path().join(KEY_FILE).exists());
}

#[tokio::test]
async fn bearer_token_enrolls_too() {
    let server = Server::start().await;
    server.ca.add_token("tok-b", "gw-1");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut options = local_enrollment(&server, "gw-1", "tok-b", dir.path());
    options.auth = AuthScheme::Bearer;
    enrollment::enroll(options).await.expect("enrolled");
    assert!(!server.ca.token_unused("tok-b"));
}

#[tokio::test]
async fn server_generated_key_arrives_as_a_pkcs12_bundle() {
    let server = Server::start().await;
    server.ca.add_token("tok-p", "plc-9");
    let dir = tempfile::tempdir().expect("tempdir");
    let p12 = dir.path().join("plc-9.p12");
    let password_file = dir.path().join("pw");
    std::fs::write(&password_file, "commissioning\n").expect("pw");
    let mut options = local_enrollment(&server, "plc-9", "tok-p", &dir.path().join("pem"));
    options.keys = KeyOrigin::Server {
        pkcs12: p12.clone(),
        password: Pkcs12Password::from_file(&password_file).expect("password"),
    };
    let enrolled = enrollment::enroll(options).await.expect("enrolled");
    assert_eq!(enrolled.subject, "CN=plc-9");
    assert_eq!(mode(&p12), 0o600);
    let store = p12_keystore::KeyStore::from_pkcs12(
        &std::fs::read(&p12).expect("read"),
        "commissioning",
        p12_keystore::Pkcs12ImportPolicy::Relaxed,
    )
    .expect("bundle opens");
    let (alias, chain) = store.private_key_chain().expect("key entry");
    assert_eq!(alias, "plc-9");
    let ders: Vec<&[u8]> = chain.certs().iter().map(|c| c.as_der()).collect();
    assert_eq!(ders.len(), 3, "leaf, issuing CA, root");
    assert_eq!(ders[1], server.ca.issuing.as_slice());
    assert_eq!(ders[2], server.ca.root.as_slice());
    let key = hsm::SoftKey::from_pkcs8(chain.key().as_der()).expect("key");
    CertificateFacts::from_der("leaf", ders[0])
        .expect("leaf")
        .ensure_key("leaf", hsm::Signer::public_key(&key))
        .expect("bundle key matches its certificate");
    // The PEM files come along when --out is given, but no key.pem.
    let pem_dir = dir.path().join("pem");
    assert!(pem_dir.join(CERT_FILE).exists());
    assert!(!pem_dir.join(KEY_FILE).exists());
}

#[tokio::test]
async fn batch_enrolls_the_good_rows_and_reports_the_bad_one() {
    let server = Server::start().await;
    server.ca.add_token("t1", "plc-1");
    server.ca.add_token("t3", "plc-3");
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("devices.csv");
    std::fs::write(
        &csv,
        "subject,token,dns,ip\n\
         plc-1,t1,plc-1.plant,10.0.0.1\n\
         plc-2,not-issued,,\n\
         plc-3,t3,,10.0.0.3;10.0.1.3\n",
    )
    .expect("csv");
    let out = dir.path().join("cabinet");
    let outcome = batch::enroll_batch(BatchOptions {
        server: server.url.clone(),
        ca_fingerprint: server.fingerprint(),
        devices_csv: csv,
        out: out.clone(),
        default_label: plc_label(),
        auth: AuthScheme::Basic,
        overwrite: Overwrite::Refuse,
        concurrency: 2,
    })
    .await
    .expect("batch ran");
    assert_eq!((outcome.enrolled(), outcome.failed()), (2, 1));
    let text = outcome.to_string();
    assert!(text.starts_with("2 enrolled, 1 failed"), "{text}");
    assert!(
        text.contains("line 3 (plc-2): EST server answered 401"),
        "{text}"
    );
    for subject in ["plc-1", "plc-3"] {
        for file in [KEY_FILE, CERT_FILE, CHAIN_FILE, CA_FILE] {
            assert!(out.join(subject).join(file).exists(), "{subject}/{file}");
        }
    }
    assert!(!out.join("plc-2").join(KEY_FILE).exists());
    let report = std::fs::read_to_string(out.join(batch::REPORT_FILE)).expect("report");
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines[0], "subject,status,serial_or_error");
    assert!(lines[1].starts_with("plc-1,enrolled,"), "{report}");
    assert!(lines[2].starts_with("plc-2,failed,"), "{report}");
    assert!(lines[3].starts_with("plc-3,enrolled,"), "{report}");
    assert!(!report.contains("t1"), "tokens stay out of the report");
}

#[tokio::test]
async fn renewal_keeps_the_names_and_rekey_replaces_the_key() {
    let server = Server::start().await;
    server.ca.add_token("tok-7", "plc-7");
    let dir = tempfile::tempdir().expect("tempdir");
    let first = enrollment::enroll(local_enrollment(&server, "plc-7", "tok-7", dir.path()))
        .await
        .expect("enrolled");
    let old_key = std::fs::read_to_string(dir.path().join(KEY_FILE)).expect("key");
    let reenroll = |rekey| ReenrollOptions {
        server: server.url.clone(),
        cert: dir.path().join(CERT_FILE),
        key: CurrentKey::Pem(dir.path().join(KEY_FILE)),
        ca: dir.path().join(CA_FILE),
        chain: None,
        label: plc_label(),
        out: None,
        rekey,
        new_key: None,
    };

    let renewed = reenrollment::reenroll(reenroll(false))
        .await
        .expect("renewed");
    assert_ne!(renewed.serial, first.serial);
    assert_eq!(renewed.subject, "CN=plc-7");
    assert_eq!(
        std::fs::read_to_string(dir.path().join(KEY_FILE)).expect("key"),
        old_key,
        "without --rekey the key stays"
    );

    let rekeyed = reenrollment::reenroll(reenroll(true))
        .await
        .expect("rekeyed");
    assert_ne!(rekeyed.serial, renewed.serial);
    assert_ne!(
        std::fs::read_to_string(dir.path().join(KEY_FILE)).expect("key"),
        old_key
    );
    assert_eq!(mode(&dir.path().join(KEY_FILE)), 0o600);
    let cert = pem_files::read_certificates(&dir.path().join(CERT_FILE)).expect("cert");
    let leaf = CertificateFacts::from_der("leaf", &cert[0]).expect("leaf");
    let key = hsm::SoftKey::open(&dir.path().join(KEY_FILE)).expect("key");
    leaf.ensure_key("leaf", hsm::Signer::public_key(&key))
        .expect("new cert is for the new key");
    let san = leaf
        .parsed()
        .tbs_certificate
        .get::<x509_cert::ext::pkix::SubjectAltName>()
        .expect("ext")
        .expect("SAN kept")
        .1;
    assert_eq!(san.0.len(), 2, "DNS and IP SAN carried over");
}

fn agent_binary(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_agent"))
        .args(args)
        .env_remove("PLANT_EST_TOKEN")
        .output()
        .expect("agent runs")
}

#[test]
fn usage_errors_exit_64_and_say_what_to_fix() {
    let out = agent_binary(&["enroll", "--server", "https://127.0.0.1:9"]);
    assert_eq!(out.status.code(), Some(64));

    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("devices.csv");
    std::fs::write(&csv, "subject,token\nplc-1,a\nplc-1,b\n").expect("csv");
    let out = agent_binary(&[
        "enroll",
        "--batch",
        csv.to_str().expect("utf8"),
        "--server",
        "https://127.0.0.1:9",
        "--ca-fingerprint",
        &"ab".repeat(32),
        "--out",
        dir.path().to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");

    let out = agent_binary(&[
        "enroll",
        "--server",
        "https://127.0.0.1:9",
        "--ca-fingerprint",
        &"ab".repeat(32),
        "--subject",
        "plc-1",
        "--out",
        dir.path().to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--token-file"), "{stderr}");
}

#[test]
fn batch_file_check_lists_every_problem_with_its_line_and_enrolls_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("devices.csv");
    std::fs::write(
        &csv,
        "subject,token,ip\nplc-1,a,\n,b,\nplc-3,,\nplc-1,d,\nplc-5,e,10.0.0.300\nplc-6,f,\n",
    )
    .expect("csv");
    let out_dir = dir.path().join("out");
    // The server is never reached: the file is refused before the CA is asked anything.
    let out = agent_binary(&[
        "enroll",
        "--batch",
        csv.to_str().expect("utf8"),
        "--server",
        "https://127.0.0.1:9",
        "--ca-fingerprint",
        &"ab".repeat(32),
        "--out",
        out_dir.to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "{}: 4 problems, nothing enrolled:\n\
             \x20 line 3: the subject is empty\n\
             \x20 line 4: the token for \"plc-3\" is empty\n\
             \x20 line 5: subject \"plc-1\" is also on line 2; each device needs its own row\n\
             \x20 line 6: \"10.0.0.300\" in column ip is not an IP address\n",
            csv.display()
        )),
        "{stderr}"
    );
    assert!(!out_dir.exists(), "nothing is written for a refused file");
}

#[tokio::test]
async fn failed_batch_row_makes_the_binary_exit_1() {
    let server = Server::start().await;
    server.ca.add_token("t1", "plc-1");
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("devices.csv");
    std::fs::write(&csv, "subject,token\nplc-1,t1\nplc-2,unknown\n").expect("csv");
    let args: Vec<String> = vec![
        "enroll".into(),
        "--batch".into(),
        csv.display().to_string(),
        "--server".into(),
        server.url.clone(),
        "--ca-fingerprint".into(),
        server.fingerprint(),
        "--label".into(),
        "plc".into(),
        "--out".into(),
        dir.path().join("out").display().to_string(),
    ];
    let out = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        agent_binary(&args)
    })
    .await
    .expect("join");
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("1 enrolled, 1 failed"), "{stdout}");
    // No progress-bar escape codes when stdout is not a terminal.
    assert!(!stdout.contains('\u{1b}'), "{stdout}");
}
