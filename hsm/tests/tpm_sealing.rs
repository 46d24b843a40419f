//! Secrets sealed to a TPM, against real swtpm processes: they unseal in the TPM that sealed
//! them, across a restart of it, and nowhere else.

mod support;

use hsm::tpm::Sealer;
use hsm::TpmOptions;
use support::Swtpm;

#[test]
fn a_sealed_secret_opens_in_its_own_tpm_only() {
    let mut tpm = Swtpm::start();
    let other = Swtpm::start();
    let sealer = Sealer::open(&tpm.tcti(), TpmOptions::default()).expect("open");
    let secret = [7u8; 32];
    let blob = sealer.seal(&secret).expect("seal");
    assert!(
        !blob.windows(secret.len()).any(|w| w == secret),
        "the blob must not carry the secret in the clear"
    );
    assert_eq!(sealer.unseal(&blob).expect("unseal").as_slice(), secret);
    drop(sealer);

    // After a restart (the TPM's state survives, as on a reboot) it still opens.
    tpm.restart();
    let again = Sealer::open(&tpm.tcti(), TpmOptions::default()).expect("open");
    assert_eq!(again.unseal(&blob).expect("unseal").as_slice(), secret);

    // Another TPM refuses the blob, and garbage is an error, not a panic.
    let stranger = Sealer::open(&other.tcti(), TpmOptions::default()).expect("open");
    assert!(stranger.unseal(&blob).is_err());
    assert!(stranger.unseal(&blob[..blob.len() - 1]).is_err());
    assert!(stranger.unseal(&[]).is_err());
}
