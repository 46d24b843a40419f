//! The PKCS#11 backend against SoftHSM2 with a token store of its own.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, when the module is initialised, and PKCS#11 allows
//! one initialisation per process; so this test binary gets one SoftHSM2 configuration with
//! its own token folder, and each test its own token (login state is per token).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::object::{Attribute, AttributeInfo, AttributeType, ObjectClass};
use hsm::{Error, KeyRef, Signer, DEFAULT_PKCS11_MODULE};

const USER_PIN: &str = "1234";
const TOKENS: [&str; 5] = [
    "plant",
    "plant-wrong-pin",
    "plant-extract",
    "plant-lookup",
    "plant-rate",
];

struct SoftHsm {
    dir: tempfile::TempDir,
}

/// The SoftHSM2 store for this process, with every test's token initialised up front
/// (a token initialised after the module loaded may not be seen by it).
fn softhsm() -> &'static SoftHsm {
    static SOFTHSM: OnceLock<SoftHsm> = OnceLock::new();
    SOFTHSM.get_or_init(|| {
        assert!(
            Path::new(DEFAULT_PKCS11_MODULE).exists() && which("softhsm2-util"),
            "SoftHSM2 is not installed ({DEFAULT_PKCS11_MODULE}, softhsm2-util); run \
             scripts/setup (apt package softhsm2) — the PKCS#11 tests never skip"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir(&tokens).expect("token dir");
        let conf = dir.path().join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                tokens.display()
            ),
        )
        .expect("conf");
        for label in TOKENS {
            let output = Command::new("softhsm2-util")
                .args(["--init-token", "--free", "--label", label])
                .args(["--pin", USER_PIN, "--so-pin", "5678"])
                .env("SOFTHSM2_CONF", &conf)
                .output()
                .expect("run softhsm2-util");
            assert!(
                output.status.success(),
                "softhsm2-util --init-token {label}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        std::fs::write(dir.path().join("pin"), format!("{USER_PIN}\n")).expect("pin file");
        std::fs::write(dir.path().join("wrong-pin"), "0000\n").expect("pin file");
        std::fs::write(dir.path().join("empty-pin"), "").expect("pin file");
        // Set before any test loads the module; nothing else in this binary reads it.
        std::env::set_var("SOFTHSM2_CONF", &conf);
        SoftHsm { dir }
    })
}

impl SoftHsm {
    fn key_ref(&self, token: &str, object: &str, pin_file: &str) -> KeyRef {
        format!(
            "pkcs11:module={DEFAULT_PKCS11_MODULE};token={token};object={object};pin-file={}",
            self.pin_file(pin_file).display()
        )
        .parse()
        .expect("key ref")
    }

    fn pin_file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn verify(signer: &dyn Signer, message: &[u8]) {
    let signature = signer.sign(message).expect("sign");
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, signer.public_key().point())
        .verify(message, &signature)
        .expect("signature verifies against the key's public point");
}

#[test]
fn key_is_generated_in_the_token_signs_verifiably_and_reopens() {
    let hsm = softhsm();
    let key_ref = hsm.key_ref("plant", "issuing-ca", "pin");
    let signer = hsm::create(&key_ref).expect("create");
    verify(&*signer, b"plant");
    let location = signer.location();
    assert!(
        location.contains("'issuing-ca'") && location.contains("'plant'"),
        "{location}"
    );
    assert!(!location.contains(USER_PIN) && !format!("{signer:?}").contains(USER_PIN));

    let err = hsm::create(&key_ref).expect_err("label is taken");
    assert!(matches!(err, Error::KeyPresent(_)), "{err}");

    let reopened = hsm::open(&key_ref).expect("open");
    assert_eq!(reopened.public_key(), signer.public_key());
    verify(&*reopened, b"again");
}

#[test]
fn wrong_pin_is_a_clear_error_naming_the_token() {
    let hsm = softhsm();
    let err =
        hsm::create(&hsm.key_ref("plant-wrong-pin", "k", "wrong-pin")).expect_err("wrong PIN");
    assert!(matches!(err, Error::Login { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        "PKCS#11 login to token 'plant-wrong-pin' failed: wrong PIN"
    );
    assert!(!format!("{err:?}").contains("0000"));

    let err = hsm::open(&hsm.key_ref("plant-wrong-pin", "k", "empty-pin")).expect_err("no PIN");
    assert!(matches!(err, Error::PinMissing { .. }), "{err}");
    assert!(err.to_string().contains("pin-file"), "{err}");
}

#[test]
fn unknown_token_or_object_is_named_in_the_error() {
    let hsm = softhsm();
    let err = hsm::open(&hsm.key_ref("no-such-token", "k", "pin")).expect_err("no token");
    let message = err.to_string();
    assert!(
        message.contains("no token labelled 'no-such-token'"),
        "{message}"
    );
    assert!(
        message.contains("'plant-lookup'"),
        "lists the tokens present: {message}"
    );

    let err = hsm::open(&hsm.key_ref("plant-lookup", "missing", "pin")).expect_err("no key");
    assert!(matches!(err, Error::KeyNotFound(_)), "{err}");
    assert!(err.to_string().contains("'missing'"), "{err}");
}

#[test]
fn private_key_is_sensitive_and_never_extractable() {
    let hsm = softhsm();
    let signer = hsm::create(&hsm.key_ref("plant-extract", "ca", "pin")).expect("create");
    verify(&*signer, b"m");

    // Look at the object the way any other PKCS#11 application would. The signer keeps its
    // session open, and login state is per application, so this session is logged in too.
    let pkcs11 = Pkcs11::new(DEFAULT_PKCS11_MODULE).expect("module");
    match pkcs11.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK)) {
        Ok(())
        | Err(cryptoki::error::Error::Pkcs11(
            cryptoki::error::RvError::CryptokiAlreadyInitialized,
            _,
        )) => {}
        Err(e) => panic!("initialize: {e}"),
    }
    let slot = pkcs11
        .get_slots_with_initialized_token()
        .expect("slots")
        .into_iter()
        .find(|slot| {
            pkcs11
                .get_token_info(*slot)
                .expect("info")
                .label()
                .trim_end()
                == "plant-extract"
        })
        .expect("token");
    let session = pkcs11.open_ro_session(slot).expect("session");
    let keys = session
        .find_objects(&[
            Attribute::Class(ObjectClass::PRIVATE_KEY),
            Attribute::Label(b"ca".to_vec()),
        ])
        .expect("find");
    assert_eq!(keys.len(), 1, "one private key labelled ca");
    let flags = session
        .get_attributes(
            keys[0],
            &[
                AttributeType::Token,
                AttributeType::Sensitive,
                AttributeType::Extractable,
                AttributeType::AlwaysSensitive,
                AttributeType::NeverExtractable,
                AttributeType::Sign,
            ],
        )
        .expect("attributes");
    for flag in &flags {
        match flag {
            Attribute::Token(v) => assert!(*v, "CKA_TOKEN"),
            Attribute::Sensitive(v) => assert!(*v, "CKA_SENSITIVE"),
            Attribute::Extractable(v) => assert!(!*v, "CKA_EXTRACTABLE"),
            Attribute::AlwaysSensitive(v) => assert!(*v, "CKA_ALWAYS_SENSITIVE"),
            Attribute::NeverExtractable(v) => assert!(*v, "CKA_NEVER_EXTRACTABLE"),
            Attribute::Sign(v) => assert!(*v, "CKA_SIGN"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(flags.len(), 6, "every flag reported: {flags:?}");

    // The private scalar cannot be read out: the token calls CKA_VALUE sensitive, and a
    // read returns nothing.
    let info = session
        .get_attribute_info(keys[0], &[AttributeType::Value])
        .expect("attribute info");
    assert!(
        matches!(info.as_slice(), [AttributeInfo::Sensitive]),
        "CKA_VALUE is {info:?}"
    );
    let value = session.get_attributes(keys[0], &[AttributeType::Value]);
    let leaked =
        matches!(&value, Ok(attrs) if attrs.iter().any(|a| matches!(a, Attribute::Value(_))));
    assert!(!leaked, "CKA_VALUE was returned");
}

#[test]
fn signature_rate_of_a_softhsm_key() {
    let hsm = softhsm();
    let signer = hsm::create(&hsm.key_ref("plant-rate", "rate", "pin")).expect("create");
    let rate = hsm::signature_rate(&*signer, 1000).expect("rate");
    eprintln!("signature rate: SoftHSM2 {rate:.0}/s (one caller)");
    assert!(rate > 0.0);
}
