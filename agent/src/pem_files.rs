//! The files a device's credentials live in, and how they are written.
//!
//! Every file is written to a temporary file in the same directory, flushed, and renamed
//! over the target, then the directory is flushed: a power cut or a full disk leaves the old
//! file or the new one, never half of one. Private keys are created owner-only (0600) and
//! never replace an existing key unless the caller says so.

use std::fs::{self, File, Permissions};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use der::pem::LineEnding;
use der::{Decode, DecodePem, Encode};
use hsm::KeyRef;
use x509_cert::Certificate;

use crate::Error;

/// The private key, PKCS#8 PEM.
pub const KEY_FILE: &str = "key.pem";
/// Instead of `key.pem` when the key lives in a TPM or PKCS#11 token: its key reference
/// (`hsm::KeyRef` grammar), relative paths meaning relative to this file's directory.
pub const KEY_REF_FILE: &str = "key.ref";
/// The device's certificate.
pub const CERT_FILE: &str = "cert.pem";
/// The issuing CA certificate(s), nearest first, without the root.
pub const CHAIN_FILE: &str = "chain.pem";
/// The root CA certificate the engineer pinned by fingerprint.
pub const CA_FILE: &str = "ca.pem";

const KEY_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;

/// Whether writing a private key may replace an existing one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overwrite {
    /// Refuse: the existing key may be the only copy of a working identity.
    Refuse,
    /// Replace it (`--force`, or a renewal that re-keys on purpose).
    Allow,
}

/// A directory holding one device's `key.pem` (or `key.ref`), `cert.pem`, `chain.pem` and
/// `ca.pem`.
#[derive(Debug, Clone)]
pub struct CredentialDir {
    dir: PathBuf,
}

impl CredentialDir {
    /// The directory (not created yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Path of a file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates the directory and checks that `key.pem` and `key.ref` may be written, before
    /// any token is spent: finding out after the CA issued would waste a single-use token.
    pub fn prepare(&self, overwrite: Overwrite) -> Result<(), Error> {
        prepare_directory(&self.dir)?;
        refuse_existing(&self.file(KEY_FILE), overwrite)?;
        refuse_existing(&self.file(KEY_REF_FILE), overwrite)
    }

    /// Writes `key.ref` (mode 0600: it tells where the device's identity lives).
    pub fn write_key_ref(&self, key_ref: &KeyRef, overwrite: Overwrite) -> Result<PathBuf, Error> {
        let path = self.file(KEY_REF_FILE);
        let text = format!("{key_ref}\n");
        write_atomically(&path, text.as_bytes(), KEY_MODE, overwrite)?;
        Ok(path)
    }

    /// Writes `key.pem` (mode 0600).
    pub fn write_key(&self, pkcs8_pem: &str, overwrite: Overwrite) -> Result<PathBuf, Error> {
        let path = self.file(KEY_FILE);
        write_atomically(&path, pkcs8_pem.as_bytes(), KEY_MODE, overwrite)?;
        Ok(path)
    }

    /// Writes `cert.pem`, `chain.pem` and, when given, `ca.pem`; returns the paths written.
    pub fn write_certificates(
        &self,
        leaf: &[u8],
        chain: &[Vec<u8>],
        root: Option<&[u8]>,
    ) -> Result<Vec<PathBuf>, Error> {
        let mut written = Vec::with_capacity(3);
        let mut files = vec![
            (CERT_FILE, encode_certificates([leaf])?),
            (
                CHAIN_FILE,
                encode_certificates(chain.iter().map(Vec::as_slice))?,
            ),
        ];
        if let Some(root) = root {
            files.push((CA_FILE, encode_certificates([root])?));
        }
        for (name, pem) in files {
            let path = self.file(name);
            write_atomically(&path, pem.as_bytes(), PUBLIC_MODE, Overwrite::Allow)?;
            written.push(path);
        }
        Ok(written)
    }
}

/// Creates `dir` if needed and proves a file can be created in it, so a read-only or full
/// target shows up before the CA is asked, not after a single-use token is spent.
pub fn prepare_directory(dir: &Path) -> Result<(), Error> {
    fs::create_dir_all(dir).map_err(Error::io(dir))?;
    tempfile::tempfile_in(dir).map_err(Error::io(dir))?;
    Ok(())
}

/// Fails with [`Error::WouldOverwrite`] if `path` exists and `overwrite` is `Refuse`.
pub fn refuse_existing(path: &Path, overwrite: Overwrite) -> Result<(), Error> {
    if overwrite == Overwrite::Refuse && fs::symlink_metadata(path).is_ok() {
        return Err(Error::WouldOverwrite(path.to_owned()));
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory (created 0600 by
/// `tempfile`, so a key is never readable by others, even for a moment), then renames it into
/// place and flushes the directory. With `Overwrite::Refuse` the rename fails if `path`
/// exists, even if it appeared after an earlier check.
pub fn write_atomically(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    overwrite: Overwrite,
) -> Result<(), Error> {
    replace_file(path, bytes, mode, overwrite)?;
    // The rename is durable only once the directory entry is on disk.
    sync_directory(parent_of(path))
}

/// [`write_atomically`] without the directory flush: the file's content is on disk and
/// readers see the old file or the new one, but the rename itself is durable only after
/// [`sync_directory`]. For writing many files in one directory with one flush at the end.
pub fn replace_file(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    overwrite: Overwrite,
) -> Result<(), Error> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(Error::io(dir))?;
    let io = Error::io(path);
    let written = temp
        .as_file()
        .set_permissions(Permissions::from_mode(mode))
        .and_then(|()| temp.write_all(bytes))
        .and_then(|()| temp.as_file().sync_all());
    if let Err(e) = written {
        return Err(io(e));
    }
    let persisted = match overwrite {
        Overwrite::Allow => temp.persist(path),
        Overwrite::Refuse => temp.persist_noclobber(path),
    };
    match persisted {
        Ok(_) => Ok(()),
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => {
            Err(Error::WouldOverwrite(path.to_owned()))
        }
        Err(e) => Err(io(e.error)),
    }
}

/// Flushes `dir` itself: renames and removals in it survive a power cut once this returns.
pub fn sync_directory(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The key reference in a `key.ref` file, its relative paths resolved against the file's
/// (absolute) directory.
pub fn read_key_ref(path: &Path) -> Result<KeyRef, Error> {
    let text = fs::read_to_string(path).map_err(Error::io(path))?;
    let key_ref: KeyRef = text.trim().parse().map_err(|e| {
        Error::Usage(format!(
            "{} does not hold a key reference: {e}",
            path.display()
        ))
    })?;
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let dir = std::path::absolute(dir).map_err(Error::io(dir))?;
    Ok(key_ref.with_base_dir(&dir))
}

/// Certificates as concatenated PEM blocks.
pub fn encode_certificates<'a>(ders: impl IntoIterator<Item = &'a [u8]>) -> Result<String, Error> {
    let mut out = String::new();
    for der in ders {
        let pem = der::pem::encode_string("CERTIFICATE", LineEnding::LF, der)
            .map_err(|e| Error::certificate("encoding PEM", e))?;
        out.push_str(&pem);
    }
    Ok(out)
}

/// All certificates in a PEM (or single DER) file, DER, in file order; an empty file gives
/// none (a `chain.pem` of a CA without intermediates is empty).
pub fn read_certificates(path: &Path) -> Result<Vec<Vec<u8>>, Error> {
    let bytes = fs::read(path).map_err(Error::io(path))?;
    let what = path.display().to_string();
    let text = bytes.trim_ascii();
    let certs = if text.is_empty() {
        Vec::new()
    } else if contains(text, PEM_BEGIN) {
        // RFC 7468 §5.2 lets text surround the blocks (`openssl pkcs7 -print_certs` writes
        // subject= and issuer= lines before each): take each block and skip the rest.
        pem_blocks(text)
            .map(|block| Certificate::from_pem(block).map_err(|e| Error::certificate(&what, e)))
            .collect::<Result<Vec<_>, _>>()?
    } else {
        // Some tools hand out a bare DER file; take that too.
        vec![Certificate::from_der(&bytes).map_err(|e| Error::certificate(&what, e))?]
    };
    certs
        .iter()
        .map(|c| c.to_der().map_err(|e| Error::certificate(&what, e)))
        .collect()
}

const PEM_BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
const PEM_END: &[u8] = b"-----END CERTIFICATE-----";

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Each `BEGIN CERTIFICATE`…`END CERTIFICATE` block in `text`, with its delimiters; an
/// unterminated last block is passed on whole so the parser names the problem.
fn pem_blocks(mut text: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        let start = find(text, PEM_BEGIN)?;
        let rest = &text[start..];
        let end = find(rest, PEM_END).map_or(rest.len(), |e| e + PEM_END.len());
        text = &rest[end..];
        Some(&rest[..end])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificates_are_read_past_explanatory_text_around_pem_blocks() {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["a.example".into()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cert.pem");
        let text = format!(
            "subject=CN=a\nissuer=CN=a\n{}\nsubject=CN=a\n{}trailing words\n",
            cert.pem(),
            cert.pem()
        );
        fs::write(&path, text).expect("write");
        let read = read_certificates(&path).expect("read");
        assert_eq!(read, vec![cert.der().to_vec(), cert.der().to_vec()]);
        // A cut-off block is an error that names the file, not a silent skip.
        fs::write(&path, &cert.pem()[..200]).expect("write");
        let e = read_certificates(&path)
            .expect_err("cut-off block")
            .to_string();
        assert!(e.contains("cert.pem"), "{e}");
    }

    #[test]
    fn key_file_is_owner_only_and_not_overwritten_without_force() {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = CredentialDir::new(dir.path().join("plc-7"));
        creds.prepare(Overwrite::Refuse).expect("prepare");
        let path = creds.write_key("first", Overwrite::Refuse).expect("write");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let again = creds.write_key("second", Overwrite::Refuse);
        assert!(matches!(again, Err(Error::WouldOverwrite(_))), "{again:?}");
        assert!(matches!(
            creds.prepare(Overwrite::Refuse),
            Err(Error::WouldOverwrite(_))
        ));
        assert_eq!(fs::read_to_string(&path).expect("read"), "first");

        creds.prepare(Overwrite::Allow).expect("prepare with force");
        creds.write_key("second", Overwrite::Allow).expect("force");
        assert_eq!(fs::read_to_string(&path).expect("read"), "second");
        let mode = fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn atomic_write_leaves_no_temporary_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = CredentialDir::new(dir.path());
        creds.write_key("k", Overwrite::Refuse).expect("key");
        let _ = creds.write_key("k", Overwrite::Refuse);
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(KEY_FILE)]);
    }

    #[test]
    fn certificates_round_trip_through_pem_files() {
        let (root, ca, leaf) = crate::certificate::tests::three_level_chain();
        let dir = tempfile::tempdir().expect("tempdir");
        let creds = CredentialDir::new(dir.path());
        let written = creds
            .write_certificates(&leaf, std::slice::from_ref(&ca), Some(&root))
            .expect("write");
        assert_eq!(written.len(), 3);
        assert_eq!(
            read_certificates(&creds.file(CERT_FILE)).expect("cert"),
            vec![leaf]
        );
        assert_eq!(
            read_certificates(&creds.file(CHAIN_FILE)).expect("chain"),
            vec![ca]
        );
        assert_eq!(
            read_certificates(&creds.file(CA_FILE)).expect("ca"),
            vec![root]
        );
        let mode = fs::metadata(creds.file(CERT_FILE))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o644);
    }
}
