//! The TPM backend against a real software TPM (swtpm), started by each test on free ports.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use hsm::{Error, KeyRef, Signer, TpmKey, TpmKeyRef, TpmObject, TpmOptions};
use support::Swtpm;

fn verify(signer: &dyn Signer, message: &[u8], signature: &[u8]) {
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, signer.public_key().point())
        .verify(message, signature)
        .expect("signature verifies against the key's public point");
}

fn blob_ref(tpm: &Swtpm, name: &str) -> KeyRef {
    format!(
        "tpm:blob={};tcti={}",
        tpm.dir().join(name).display(),
        tpm.tcti_string()
    )
    .parse()
    .expect("key ref")
}

fn handle_ref(tpm: &Swtpm, handle: u32) -> KeyRef {
    format!("tpm:handle={handle:#010x};tcti={}", tpm.tcti_string())
        .parse()
        .expect("key ref")
}

fn tpm_ref(key_ref: &KeyRef) -> TpmKeyRef {
    match key_ref {
        KeyRef::Tpm(tpm) => tpm.clone(),
        other => panic!("not a TPM key ref: {other}"),
    }
}

#[test]
fn blob_key_signs_verifiably_and_reopens_to_the_same_key() {
    let tpm = Swtpm::start();
    let key_ref = blob_ref(&tpm, "issuing.tpmkey");
    let signer = hsm::create(&key_ref).expect("create");
    let signature = signer.sign(b"plant").expect("sign");
    verify(&*signer, b"plant", &signature);
    assert!(
        signer.location().contains("issuing.tpmkey"),
        "{}",
        signer.location()
    );

    let path = tpm.dir().join("issuing.tpmkey");
    let mode = std::fs::metadata(&path).expect("blob").permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    let pem = std::fs::read_to_string(&path).expect("blob");
    assert!(pem.starts_with("-----BEGIN TSS2 PRIVATE KEY-----"), "{pem}");

    let public = signer.public_key().clone();
    drop(signer);
    assert!(matches!(hsm::create(&key_ref), Err(Error::KeyExists(_))));
    let reopened = hsm::open(&key_ref).expect("open");
    assert_eq!(reopened.public_key(), &public);
    let signature = reopened.sign(b"again").expect("sign");
    verify(&*reopened, b"again", &signature);
}

#[test]
fn persistent_handle_key_signs_reopens_and_is_never_overwritten() {
    let tpm = Swtpm::start();
    let key_ref = handle_ref(&tpm, 0x8101_0001);
    let signer = hsm::create(&key_ref).expect("create");
    verify(&*signer, b"m", &signer.sign(b"m").expect("sign"));
    let public = signer.public_key().clone();
    drop(signer);

    let err = hsm::create(&key_ref).expect_err("handle is taken");
    assert!(matches!(err, Error::KeyPresent(_)), "{err}");
    assert!(err.to_string().contains("0x81010001"), "{err}");

    let reopened = hsm::open(&key_ref).expect("open");
    assert_eq!(reopened.public_key(), &public);
    verify(&*reopened, b"n", &reopened.sign(b"n").expect("sign"));
    drop(reopened);

    let err = hsm::open(&handle_ref(&tpm, 0x8101_0002)).expect_err("empty handle");
    assert!(matches!(err, Error::KeyNotFound(_)), "{err}");
}

#[test]
fn several_keys_of_one_tpm_are_served_at_once() {
    // swtpm serves one connection at a time: keys held together (the issuer's root and
    // issuing keys) must share one connection rather than wait for each other.
    let tpm = Swtpm::start();
    let root = hsm::create(&handle_ref(&tpm, 0x8101_0010)).expect("root");
    let issuing = hsm::create(&blob_ref(&tpm, "issuing.tpmkey")).expect("issuing");
    let again = hsm::open(&blob_ref(&tpm, "issuing.tpmkey")).expect("issuing again");
    assert_ne!(root.public_key(), issuing.public_key());
    assert_eq!(again.public_key(), issuing.public_key());
    let workers: Vec<_> = [root, issuing, again]
        .into_iter()
        .map(|key| {
            thread::spawn(move || {
                for i in 0..20u32 {
                    verify(
                        &*key,
                        &i.to_be_bytes(),
                        &key.sign(&i.to_be_bytes()).expect("sign"),
                    );
                }
                key
            })
        })
        .collect();
    let keys: Vec<_> = workers
        .into_iter()
        .map(|w| w.join().expect("worker"))
        .collect();
    // Dropping one holder of the blob key leaves the other working.
    let mut keys = keys.into_iter();
    let (root, issuing, again) = (
        keys.next().expect("root"),
        keys.next().expect("issuing"),
        keys.next().expect("again"),
    );
    drop(issuing);
    verify(&*again, b"still", &again.sign(b"still").expect("sign"));
    verify(&*root, b"root", &root.sign(b"root").expect("sign"));
}

#[test]
fn key_is_bound_to_its_tpm_and_cannot_be_duplicated() {
    use tss_esapi::constants::{CommandCode, SessionType};
    use tss_esapi::handles::{ObjectHandle, PersistentTpmHandle, TpmHandle};
    use tss_esapi::interface_types::algorithm::HashingAlgorithm;
    use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
    use tss_esapi::structures::{SymmetricDefinition, SymmetricDefinitionObject};

    let tpm = Swtpm::start();
    drop(hsm::create(&handle_ref(&tpm, 0x8101_0003)).expect("create"));

    // The signer is dropped, so its connection is closed; talk to the TPM directly.
    let conf = tss_esapi::TctiNameConf::Swtpm(
        format!("host=127.0.0.1,port={}", tpm.port())
            .parse()
            .expect("tcti"),
    );
    let mut context = tss_esapi::Context::new(conf).expect("context");
    let key = context
        .execute_without_session(|ctx| {
            ctx.tr_from_tpm_public(TpmHandle::Persistent(
                PersistentTpmHandle::new(0x8101_0003).expect("handle"),
            ))
        })
        .expect("the persistent key");
    let (public, _, _) = context
        .execute_without_session(|ctx| ctx.read_public(key.into()))
        .expect("read public");
    let attributes = public.object_attributes();
    assert!(attributes.fixed_tpm(), "fixedTPM");
    assert!(attributes.fixed_parent(), "fixedParent");
    assert!(attributes.sensitive_data_origin(), "sensitiveDataOrigin");
    assert!(attributes.user_with_auth(), "userWithAuth");
    assert!(attributes.sign_encrypt(), "sign");
    assert!(!attributes.decrypt(), "not decrypt");
    assert!(!attributes.restricted(), "not restricted");

    // TPM2_Duplicate with a policy session that names the command, as a duplication-capable
    // key would need: the TPM refuses.
    let session = context
        .start_auth_session(
            None,
            None,
            None,
            SessionType::Policy,
            SymmetricDefinition::AES_128_CFB,
            HashingAlgorithm::Sha256,
        )
        .expect("start policy session")
        .expect("a session");
    let policy = PolicySession::try_from(session).expect("policy session");
    context
        .policy_command_code(policy, CommandCode::Duplicate)
        .expect("PolicyCommandCode");
    context.set_sessions((Some(session), None, None));
    let duplicated = context.duplicate(
        key,
        ObjectHandle::Null,
        None,
        SymmetricDefinitionObject::Null,
    );
    assert!(duplicated.is_err(), "TPM2_Duplicate succeeded");
    eprintln!(
        "TPM2_Duplicate refused: {}",
        duplicated.err().map(|e| e.to_string()).unwrap_or_default()
    );

    // With plain password authorization it is refused as well.
    context.set_sessions((Some(AuthSession::Password), None, None));
    let duplicated = context.duplicate(
        key,
        ObjectHandle::Null,
        None,
        SymmetricDefinitionObject::Null,
    );
    assert!(duplicated.is_err(), "TPM2_Duplicate succeeded");
}

#[test]
fn blob_made_by_one_tpm_is_useless_on_another() {
    let first = Swtpm::start();
    let key_ref = blob_ref(&first, "issuing.tpmkey");
    drop(hsm::create(&key_ref).expect("create"));

    let second = Swtpm::start();
    let mut foreign = tpm_ref(&key_ref);
    foreign.tcti = Some(second.tcti());
    let err = TpmKey::open(&foreign).expect_err("a foreign TPM cannot load the blob");
    let message = err.to_string();
    assert!(matches!(err, Error::Tpm { .. }), "{message}");
    assert!(
        message.contains("refused to load the key blob"),
        "{message}"
    );
    assert!(
        message.contains("only loads on the TPM that created it"),
        "{message}"
    );
    eprintln!("{message}");
}

#[test]
fn killed_tpm_fails_fast_and_signing_resumes_when_it_returns() {
    let mut tpm = Swtpm::start();
    let options = TpmOptions {
        deadline: Duration::from_secs(2),
        ..TpmOptions::default()
    };
    let signer = Arc::new(
        TpmKey::create_with(&tpm_ref(&blob_ref(&tpm, "k.tpmkey")), options).expect("create"),
    );

    // A caller keeps signing throughout, as the issuer would.
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU32::new(0));
    let failed = Arc::new(AtomicU32::new(0));
    let slowest = Arc::new(Mutex::new(Duration::ZERO));
    let errors = Arc::new(Mutex::new(Vec::new()));
    let worker = {
        let (signer, stop, ok, failed, slowest, errors) = (
            Arc::clone(&signer),
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failed),
            Arc::clone(&slowest),
            Arc::clone(&errors),
        );
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let start = Instant::now();
                let result = signer.sign(b"stream");
                let took = start.elapsed();
                let mut slowest = slowest.lock().expect("lock");
                *slowest = (*slowest).max(took);
                match result {
                    Ok(sig) => {
                        verify(&*signer, b"stream", &sig);
                        ok.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => {
                        assert!(e.is_transient(), "outage errors are transient: {e}");
                        failed.fetch_add(1, Ordering::SeqCst);
                        errors.lock().expect("lock").push(e.to_string());
                        thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        })
    };
    thread::sleep(Duration::from_millis(300));
    assert!(
        ok.load(Ordering::SeqCst) > 0,
        "signing works before the outage"
    );

    tpm.kill();
    let outage = Instant::now();
    let before = failed.load(Ordering::SeqCst);
    while failed.load(Ordering::SeqCst) < before + 3 {
        assert!(
            outage.elapsed() < Duration::from_secs(10),
            "no errors while the TPM is gone"
        );
        thread::sleep(Duration::from_millis(10));
    }

    tpm.restart();
    let ok_before = ok.load(Ordering::SeqCst);
    let back = Instant::now();
    while ok.load(Ordering::SeqCst) <= ok_before {
        assert!(
            back.elapsed() < Duration::from_secs(10),
            "signing did not resume"
        );
        thread::sleep(Duration::from_millis(10));
    }
    stop.store(true, Ordering::SeqCst);
    worker.join().expect("worker");

    let slowest = *slowest.lock().expect("lock");
    let errors = errors.lock().expect("lock");
    eprintln!(
        "{} signatures, {} failures, slowest call {slowest:?}; first error: {}",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst),
        errors.first().map(String::as_str).unwrap_or_default()
    );
    assert!(
        slowest <= options.deadline + Duration::from_millis(500),
        "a call hung: {slowest:?}"
    );
    assert!(
        errors.iter().all(|e| e.contains(&tpm.tcti_string())),
        "errors name the TPM: {errors:?}"
    );
}

#[test]
fn wedged_tpm_times_out_floods_get_busy_and_work_resumes_when_it_answers() {
    let tpm = Swtpm::start();
    let options = TpmOptions {
        deadline: Duration::from_millis(1500),
        queue_capacity: 4,
    };
    let signer = Arc::new(
        TpmKey::create_with(&tpm_ref(&blob_ref(&tpm, "k.tpmkey")), options).expect("create"),
    );
    signer.sign(b"warm").expect("sign");

    tpm.freeze();
    let first = {
        let signer = Arc::clone(&signer);
        thread::spawn(move || {
            let start = Instant::now();
            (signer.sign(b"stuck"), start.elapsed())
        })
    };
    thread::sleep(Duration::from_millis(200));
    // The owner thread is stuck on the frozen TPM: the queue fills, the rest is refused.
    let flood: Vec<_> = (0..12)
        .map(|_| {
            let signer = Arc::clone(&signer);
            thread::spawn(move || {
                let start = Instant::now();
                (signer.sign(b"flood"), start.elapsed())
            })
        })
        .collect();
    let (result, took) = first.join().expect("first");
    let err = result.expect_err("a frozen TPM cannot sign");
    assert_eq!(
        err.to_string(),
        format!("TPM at {} did not answer within 1500 ms", tpm.tcti_string())
    );
    assert!(
        took < options.deadline + Duration::from_millis(500),
        "{took:?}"
    );

    let mut busy = 0;
    for handle in flood {
        let (result, took) = handle.join().expect("flood");
        assert!(
            took < options.deadline + Duration::from_millis(500),
            "{took:?}"
        );
        match result.expect_err("a frozen TPM cannot sign") {
            Error::Busy { queued, .. } => {
                assert_eq!(queued, 4);
                busy += 1;
            }
            Error::Unavailable { .. } => {}
            other => panic!("unexpected {other}"),
        }
    }
    assert!(
        busy >= 6,
        "only {busy} of 12 callers were told the TPM is busy"
    );

    // Once the TPM has been silent past the deadline, callers are told at once.
    let start = Instant::now();
    let err = signer.sign(b"late").expect_err("still frozen");
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "{:?}",
        start.elapsed()
    );
    assert!(
        err.to_string().contains("has not answered a command for"),
        "{err}"
    );

    tpm.thaw();
    let back = Instant::now();
    loop {
        match signer.sign(b"thawed") {
            Ok(sig) => {
                verify(&*signer, b"thawed", &sig);
                break;
            }
            Err(e) if back.elapsed() < Duration::from_secs(10) => {
                eprintln!("while thawing: {e}");
                thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("signing did not resume: {e}"),
        }
    }
}

#[test]
fn unreachable_tpm_is_reported_at_once_with_its_address() {
    // A port nobody listens on: bind and drop.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let key_ref = TpmKeyRef {
        object: TpmObject::Persistent(0x8101_0001),
        tcti: Some(hsm::Tcti::Swtpm {
            host: "127.0.0.1".into(),
            port,
        }),
    };
    let start = Instant::now();
    let err = TpmKey::open(&key_ref).expect_err("nothing listens");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().starts_with(&format!(
            "TPM at swtpm:host=127.0.0.1,port={port} cannot be reached"
        )),
        "{err}"
    );
}

#[test]
fn signature_rates_of_soft_and_swtpm_keys() {
    let soft = hsm::SoftKey::generate().expect("soft key");
    let soft_rate = hsm::signature_rate(&soft, 2000).expect("soft rate");
    let tpm = Swtpm::start();
    let key = hsm::create(&blob_ref(&tpm, "rate.tpmkey")).expect("create");
    let tpm_rate = hsm::signature_rate(&*key, 200).expect("swtpm rate");
    eprintln!("signature rate: soft {soft_rate:.0}/s, swtpm {tpm_rate:.0}/s (one caller)");
    assert!(soft_rate > 0.0 && tpm_rate > 0.0);
}

#[test]
fn a_slow_tpm_signs_within_its_deadline_shows_its_queue_and_times_out_a_shorter_one() {
    let tpm = Swtpm::start();
    let link = support::SlowLink::start(&tpm, Duration::from_millis(70));
    let key_ref: KeyRef = format!(
        "tpm:blob={};tcti={}",
        tpm.dir().join("slow.tpmkey").display(),
        link.tcti_string()
    )
    .parse()
    .expect("key ref");
    let generous = TpmOptions {
        deadline: Duration::from_secs(10),
        queue_capacity: 3,
    };
    let key = TpmKey::create_with(&tpm_ref(&key_ref), generous).expect("create through the link");
    let signature = key.sign(b"slow but sure").expect("sign");
    verify(&key, b"slow but sure", &signature);
    assert_eq!(
        key.queue(),
        Some(hsm::Queue {
            waiting: 0,
            capacity: 3
        })
    );
    drop(key);

    let hasty = TpmOptions {
        deadline: Duration::from_millis(50),
        queue_capacity: 3,
    };
    match TpmKey::open_with(&tpm_ref(&key_ref), hasty) {
        Err(Error::Unavailable { reason, .. }) => {
            assert!(reason.contains("did not answer within 50 ms"), "{reason}")
        }
        other => panic!("a 70 ms TPM met a 50 ms deadline: {other:?}"),
    }
}
