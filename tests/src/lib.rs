//! Harness for the end-to-end journeys: real `issuer` and `agent` processes on loopback
//! (port 0), real TLS, the store on a temp folder, and third-party clients (curl, openssl,
//! pkilint) driven as their users would.
//!
//! The binaries come from `PLANT_BIN_DIR` (set by `scripts/test`, which builds them first)
//! or the workspace's `target/debug`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// A real swtpm on free ports: the same fixture the hsm crate's own tests use.
#[path = "../../hsm/tests/support/mod.rs"]
pub mod swtpm;

pub mod soak;

/// Where `issuer` and `agent` are.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("PLANT_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug"));
    dir.join(name)
}

/// Runs a command and returns its output; fails with its stderr when it can't start.
pub fn run(command: &mut Command) -> Result<Output> {
    command
        .output()
        .with_context(|| format!("running {command:?}"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run_ok(command: &mut Command) -> Result<String> {
    let out = run(command)?;
    if !out.status.success() {
        bail!(
            "{command:?} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The SVID files an agent saved in `svids` (its `state/cache/svids`): `<entry id>.json`,
/// not the temporary files of a write in progress.
pub fn saved_svid_files(svids: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(svids)
        .into_iter()
        .flatten()
        .filter_map(std::result::Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            path.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".json") && !n.starts_with('.'))
        })
        .collect()
}

/// Extra environment for a child, as the `Issuer` and `Agent` handles keep it across restarts.
fn owned_env(env: &[(&str, &str)]) -> Vec<(String, String)> {
    env.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The `[attestation]` table of an agent joining with the token in `join.token` beside its
/// agent.toml.
pub const JOIN_TOKEN_ATTESTATION: &str =
    "method = \"join_token\"\njoin_token_file = \"join.token\"\n";

/// A running issuer with its own CA in a temp folder.
#[derive(Debug)]
pub struct Issuer {
    /// The CA folder (issuer.toml, ca/, tls/, state/).
    pub dir: tempfile::TempDir,
    /// `https://127.0.0.1:PORT`.
    pub url: String,
    child: Option<Child>,
    /// Extra environment for `issuer serve` (e.g. libfaketime's), kept across restarts.
    env: Vec<(String, String)>,
}

impl Issuer {
    /// `issuer init` + `issuer serve`.
    pub fn start() -> Result<Self> {
        Self::start_with(|_| Ok(()))
    }

    /// Like [`Issuer::start`], editing issuer.toml before serving.
    pub fn start_with(edit: impl FnOnce(&Path) -> Result<()>) -> Result<Self> {
        Self::start_custom(&[], edit)
    }

    /// Like [`Issuer::start`], with extra `issuer init` arguments and an edit of issuer.toml.
    pub fn start_custom(
        init_args: &[&str],
        edit: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Self> {
        Self::start_custom_env(&[], init_args, edit)
    }

    /// Like [`Issuer::start_custom`], with `env` added for `issuer init` and every
    /// `issuer serve` (e.g. `SOFTHSM2_CONF`): tests share one process, so none sets its
    /// own environment for its children to inherit.
    pub fn start_custom_env(
        env: &[(&str, &str)],
        init_args: &[&str],
        edit: impl FnOnce(&Path) -> Result<()>,
    ) -> Result<Self> {
        let env = owned_env(env);
        let dir = tempfile::tempdir()?;
        run_ok(
            Command::new(bin("issuer"))
                .envs(env.iter().map(|(k, v)| (k, v)))
                .args([
                    "init",
                    "--dir",
                    &dir.path().to_string_lossy(),
                    "--trust-domain",
                    "plant.example",
                    "--listen",
                    "127.0.0.1:0",
                    "--crl-listen",
                    "127.0.0.1:0",
                ])
                .args(init_args),
        )?;
        edit(&dir.path().join("issuer.toml"))?;
        let mut issuer = Self {
            dir,
            url: String::new(),
            child: None,
            env,
        };
        issuer.serve()?;
        Ok(issuer)
    }

    /// Starts (or restarts) `issuer serve` and waits until it answers.
    pub fn serve(&mut self) -> Result<()> {
        let url_file = self.dir.path().join("state/est.url");
        let _ = std::fs::remove_file(&url_file);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("issuer.log"))?;
        let child = Command::new(bin("issuer"))
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .args(["serve", "--config"])
            .arg(self.config())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting issuer serve")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&url_file) {
                if text.ends_with('\n') {
                    self.url = text.trim().to_owned();
                    break;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("issuer serve exited with {status}:\n{}", self.log());
            }
            if Instant::now() > deadline {
                bail!("issuer did not start within 30 s:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // The admin socket is bound before the URL file is written.
        Ok(())
    }

    /// Starts `issuer serve` again with its agent API on the address it had (issuer.toml
    /// says port 0 until now): agents keep the URL they were configured with, so an issuer
    /// coming back from an outage must come back there.
    pub fn serve_on_the_same_agent_api(&mut self) -> Result<()> {
        let api = self.agent_api_url()?;
        self.kill()?;
        let port = api.rsplit(':').next().context("port")?;
        let toml = std::fs::read_to_string(self.config())?;
        let (head, tail) = toml.split_once("[agent_api]").context("[agent_api]")?;
        let tail = tail.replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
            1,
        );
        std::fs::write(self.config(), format!("{head}[agent_api]{tail}"))?;
        self.serve()?;
        ensure!(self.agent_api_url()? == api, "the issuer's agent API moved");
        Ok(())
    }

    /// Restarts `issuer serve` with `env` added (kept for later restarts), e.g. libfaketime's
    /// variables for clock-fault tests.
    pub fn serve_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        self.kill()?;
        self.env = owned_env(env);
        self.serve()
    }

    /// Restarts `issuer serve` with its wall clock `offset` off this machine's (libfaketime
    /// syntax: `+4m`, `-3y`), while curl, openssl and the test keep the machine's.
    pub fn serve_shifted(&mut self, offset: &str) -> Result<()> {
        let env = shifted_clock(offset)?;
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        self.serve_with_env(&env)
    }

    /// Waits up to `within` for `issuer serve` to exit by itself; its status.
    pub fn wait_for_exit(&mut self, within: Duration) -> Result<std::process::ExitStatus> {
        let child = self.child.as_mut().context("the issuer is not running")?;
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                return Ok(status);
            }
            ensure!(
                Instant::now() < deadline,
                "the issuer still runs after {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The `issuer serve` process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL, as a power cut or OOM kill would.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// The issuer's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("issuer.log")).unwrap_or_default()
    }

    /// issuer.toml.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("issuer.toml")
    }

    /// The root CA certificate (PEM).
    pub fn root_pem(&self) -> PathBuf {
        self.dir.path().join("ca/root.crt")
    }

    /// The CRL's URL (plain HTTP).
    pub fn crl_url(&self) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.dir.path().join("state/crl.url"))?
                .trim()
                .to_owned(),
        )
    }

    /// The issuing CA certificate (PEM).
    pub fn issuing_pem(&self) -> PathBuf {
        self.dir.path().join("ca/issuing.crt")
    }

    /// An `issuer` command with `--config` set through the environment.
    pub fn cli(&self) -> Command {
        let mut command = Command::new(bin("issuer"));
        command.env("PLANT_ISSUER_CONFIG", self.config());
        command
    }

    /// One token for `label` bound to `subject`.
    pub fn token(&self, label: &str, subject: Option<&str>) -> Result<String> {
        self.token_with(label, subject, &[])
    }

    /// One token with extra `issuer token create` arguments (`--dns`, `--ip`, `--ttl`).
    pub fn token_with(&self, label: &str, subject: Option<&str>, extra: &[&str]) -> Result<String> {
        let mut command = self.cli();
        command.args(["token", "create", "--label", label, "--format", "plain"]);
        if let Some(s) = subject {
            command.args(["--subject", s]);
        }
        command.args(extra);
        Ok(run_ok(&mut command)?.trim().to_owned())
    }

    /// `issuer revoke` of the certificate in `cert` (PEM) for keyCompromise; returns its serial.
    pub fn revoke(&self, cert: &Path) -> Result<String> {
        let serial = serial_hex(cert)?;
        run_ok(
            self.cli()
                .args(["revoke", &serial, "--reason", "keyCompromise"]),
        )?;
        Ok(serial)
    }

    /// The whole inventory as JSON values.
    pub fn inventory(&self, extra: &[&str]) -> Result<Vec<serde_json::Value>> {
        let mut command = self.cli();
        command.args(["inventory", "--format", "json"]).args(extra);
        Ok(serde_json::from_str(&run_ok(&mut command)?)?)
    }

    /// The root fingerprint.
    pub fn fingerprint(&self) -> Result<String> {
        Ok(run_ok(self.cli().arg("fingerprint"))?.trim().to_owned())
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// An HTTP answer seen by curl.
#[derive(Debug)]
pub struct CurlAnswer {
    /// Status code.
    pub status: u16,
    /// The raw header block, exactly as sent (to check header name case).
    pub headers: String,
    /// The body.
    pub body: Vec<u8>,
}

impl CurlAnswer {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// A header's value by exact name.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|line| {
            line.strip_prefix(name)
                .and_then(|rest| rest.strip_prefix(':'))
                .map(|v| v.trim().to_owned())
        })
    }
}

/// Runs curl against the issuer with its root as trust anchor; `args` add method, headers,
/// body and the URL path (joined to the issuer URL when it starts with `/.well-known`).
pub fn curl(issuer: &Issuer, args: &[&str]) -> Result<CurlAnswer> {
    let scratch = tempfile::tempdir()?;
    let headers = scratch.path().join("headers");
    let body = scratch.path().join("body");
    let mut command = Command::new("curl");
    command
        .args(["-sS", "--max-time", "30", "--cacert"])
        .arg(issuer.root_pem())
        .arg("-D")
        .arg(&headers)
        .arg("-o")
        .arg(&body)
        .args(["-w", "%{http_code}"]);
    for arg in args {
        if arg.starts_with("/.well-known") {
            command.arg(format!("{}{arg}", issuer.url));
        } else {
            command.arg(arg);
        }
    }
    let out = run(&mut command)?;
    let status_text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() && status_text == "000" {
        bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(CurlAnswer {
        status: status_text.parse().unwrap_or(0),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
        body: std::fs::read(&body).unwrap_or_default(),
    })
}

/// openssl, for keys, CSRs and verification.
pub fn openssl(args: &[&str]) -> Result<String> {
    run_ok(Command::new("openssl").args(args))
}

/// A P-256 key and a CSR made by the openssl CLI: returns (key file, base64 CSR file).
/// `extra` goes to `openssl req` (e.g. `-addext subjectAltName=DNS:x`).
pub fn openssl_csr(
    dir: &Path,
    name: &str,
    subject: &str,
    extra: &[&str],
) -> Result<(PathBuf, PathBuf)> {
    let key = dir.join(format!("{name}.key"));
    let der = dir.join(format!("{name}.csr.der"));
    let b64 = dir.join(format!("{name}.csr.b64"));
    let mut args = vec![
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    let key_s = key.to_string_lossy().into_owned();
    let der_s = der.to_string_lossy().into_owned();
    let subj = format!("/CN={subject}");
    args.extend([
        "-keyout", &key_s, "-subj", &subj, "-outform", "DER", "-out", &der_s,
    ]);
    args.extend(extra);
    openssl(&args)?;
    base64_file(&der, &b64)?;
    Ok((key, b64))
}

/// Writes base64 of `der_file` to `out` (76-column lines, as `openssl base64` does).
pub fn base64_file(der_file: &Path, out: &Path) -> Result<()> {
    openssl(&[
        "base64",
        "-in",
        &der_file.to_string_lossy(),
        "-out",
        &out.to_string_lossy(),
    ])?;
    Ok(())
}

/// Decodes a base64 body with `openssl base64 -d` (not our decoder) into `dir/name`.
pub fn der_from_base64(body: &[u8], dir: &Path, name: &str) -> Result<PathBuf> {
    let b64 = dir.join(format!("{name}.b64"));
    let der = dir.join(name);
    std::fs::write(&b64, body)?;
    openssl(&[
        "base64",
        "-d",
        "-in",
        &b64.to_string_lossy(),
        "-out",
        &der.to_string_lossy(),
    ])?;
    Ok(der)
}

/// Decodes a base64 certs-only body with openssl and writes the certificates as PEM.
pub fn certs_from_pkcs7(body: &[u8], dir: &Path, name: &str) -> Result<PathBuf> {
    let der = der_from_base64(body, dir, &format!("{name}.p7.der"))?;
    let pem = dir.join(format!("{name}.pem"));
    openssl(&[
        "pkcs7",
        "-inform",
        "DER",
        "-in",
        &der.to_string_lossy(),
        "-print_certs",
        "-out",
        &pem.to_string_lossy(),
    ])?;
    Ok(pem)
}

/// Enrolls `name` under `label` the way a third-party client would: an openssl-made key and
/// CSR, POSTed with curl with the curl arguments `auth` (e.g. `-u name:token` or a Bearer
/// header). Checks the 200 answer's media headers; returns (certificate PEM, key PEM).
pub fn enroll_with_curl(
    issuer: &Issuer,
    dir: &Path,
    name: &str,
    label: &str,
    auth: &[&str],
) -> Result<(PathBuf, PathBuf)> {
    let (key, csr) = openssl_csr(dir, name, name, &[])?;
    let body = format!("@{}", csr.display());
    let path = format!("/.well-known/est/{label}/simpleenroll");
    let mut args = vec![
        "-H",
        "Content-Type: application/pkcs10",
        "--data-binary",
        &body,
    ];
    args.extend(auth);
    args.push(&path);
    let answer = curl(issuer, &args)?;
    anyhow::ensure!(
        answer.status == 200,
        "enroll {name}: {} {}",
        answer.status,
        answer.text()
    );
    anyhow::ensure!(
        answer.header("Content-Type").as_deref()
            == Some("application/pkcs7-mime; smime-type=certs-only"),
        "content type: {}",
        answer.headers
    );
    anyhow::ensure!(answer.header("Content-Transfer-Encoding").as_deref() == Some("base64"));
    Ok((certs_from_pkcs7(&answer.body, dir, name)?, key))
}

/// [`enroll_with_curl`] with a fresh one-time token for `label` bound to `subject`, sent as
/// a Bearer token. Returns (certificate PEM, key PEM).
pub fn enroll_with_token(
    issuer: &Issuer,
    dir: &Path,
    subject: &str,
    label: &str,
) -> Result<(PathBuf, PathBuf)> {
    let token = issuer.token(label, Some(subject))?;
    let auth = format!("Authorization: Bearer {token}");
    enroll_with_curl(issuer, dir, subject, label, &["-H", &auth])
}

/// `openssl verify` of `leaf` against the issuer's root, with the intermediates the issuer's
/// `cacerts` serves now (short-lived signing keys, issuing CA).
pub fn verify_chain(issuer: &Issuer, leaf: &Path) -> Result<()> {
    let dir = leaf.parent().unwrap_or(Path::new("."));
    let name = leaf
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cacerts = curl(issuer, &["/.well-known/est/cacerts"])?;
    ensure!(cacerts.status == 200, "cacerts: {}", cacerts.text());
    let untrusted = certs_from_pkcs7(&cacerts.body, dir, &format!("{name}-cacerts"))?;
    verify_against(issuer, leaf, &untrusted)
}

/// `openssl verify` of `leaf` up to the issuer's root, with the intermediates from
/// `untrusted` (a PEM file, e.g. a `cacerts` answer: short-lived signing keys, issuing CA).
pub fn verify_against(issuer: &Issuer, leaf: &Path, untrusted: &Path) -> Result<()> {
    let out = openssl(&[
        "verify",
        "-CAfile",
        &issuer.root_pem().to_string_lossy(),
        "-untrusted",
        &untrusted.to_string_lossy(),
        &leaf.to_string_lossy(),
    ])?;
    if !out.trim().ends_with("OK") {
        bail!("openssl verify: {out}");
    }
    Ok(())
}

/// A SoftHSM2 configuration in `dir` with one initialised token `label` (user PIN `pin`);
/// returns the configuration file, for `SOFTHSM2_CONF`. Fails, never skips, without SoftHSM2.
pub fn softhsm_token(dir: &Path, label: &str, pin: &str) -> Result<PathBuf> {
    ensure!(
        Path::new(hsm::DEFAULT_PKCS11_MODULE).exists(),
        "SoftHSM2 is not installed ({}); run scripts/setup (apt package softhsm2)",
        hsm::DEFAULT_PKCS11_MODULE
    );
    let tokens = dir.join("tokens");
    std::fs::create_dir_all(&tokens)?;
    let conf = dir.join("softhsm2.conf");
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            tokens.display()
        ),
    )?;
    run_ok(
        Command::new("softhsm2-util")
            .args(["--init-token", "--free", "--label", label])
            .args(["--pin", pin, "--so-pin", "0815"])
            .env("SOFTHSM2_CONF", &conf),
    )?;
    Ok(conf)
}

/// An issuer.toml edit for [`Issuer::start_with`]: turns on short-lived signing keys (shown
/// commented out by `issuer init` for a software issuing key).
pub fn enable_short_lived_keys(toml: &Path) -> Result<()> {
    let text = std::fs::read_to_string(toml)?;
    let commented = "# [ca.signing_key]\n# lifetime = \"24h\"\n# overlap = \"1h\"\n";
    ensure!(
        text.contains(commented),
        "no [ca.signing_key] template in {text}"
    );
    std::fs::write(
        toml,
        text.replace(
            commented,
            "[ca.signing_key]\nlifetime = \"24h\"\noverlap = \"1h\"\n",
        ),
    )?;
    Ok(())
}

/// An issuer.toml edit: adds the profile `direct` (label `direct`), whose certificates the
/// issuing key signs itself, never a short-lived key.
pub fn add_direct_profile(toml: &Path) -> Result<()> {
    let mut text = std::fs::read_to_string(toml)?;
    text.push_str(
        "\n[profiles.direct]\ndescription = \"signed by the issuing key itself\"\n\
         lifetime = \"30d\"\nkey_usage = [\"digitalSignature\"]\n\
         extended_key_usage = [\"clientAuth\"]\nsan = []\nsign_with = \"issuing-key\"\n",
    );
    std::fs::write(toml, text)?;
    Ok(())
}

/// Lets several valid certificates of profile `label` share a subject (`shared_subjects`),
/// for tests that enroll one CSR many times to measure signing, not identity.
pub fn share_subjects(toml: &Path, label: &str) -> Result<()> {
    let text = std::fs::read_to_string(toml)?;
    let header = format!("[profiles.{label}]\n");
    anyhow::ensure!(text.contains(&header), "{} has no {header}", toml.display());
    let text = text.replacen(&header, &format!("{header}shared_subjects = true\n"), 1);
    std::fs::write(toml, text)?;
    Ok(())
}

/// `simplereenroll` with `cert` as the TLS client certificate and a CSR for `subject` made
/// with `csr_key` (the key being renewed, or another); `name` keeps the files apart.
pub fn reenroll_with(
    issuer: &Issuer,
    dir: &Path,
    (cert, key): (&Path, &Path),
    csr_key: &Path,
    subject: &str,
    name: &str,
) -> Result<CurlAnswer> {
    let der = dir.join(format!("{name}.csr.der"));
    openssl(&[
        "req",
        "-new",
        "-key",
        &csr_key.to_string_lossy(),
        "-subj",
        &format!("/CN={subject}"),
        "-outform",
        "DER",
        "-out",
        &der.to_string_lossy(),
    ])?;
    let b64 = dir.join(format!("{name}.csr.b64"));
    base64_file(&der, &b64)?;
    let body = format!("@{}", b64.display());
    curl(
        issuer,
        &[
            "--cert",
            &cert.to_string_lossy(),
            "--key",
            &key.to_string_lossy(),
            "-H",
            "Content-Type: application/pkcs10",
            "--data-binary",
            &body,
            "/.well-known/est/simplereenroll",
        ],
    )
}

/// POSTs the CSR in `csr` (base64) to `label`'s simpleenroll with a Bearer token.
pub fn enroll_bearer(issuer: &Issuer, csr: &Path, label: &str, token: &str) -> Result<CurlAnswer> {
    let body = format!("@{}", csr.display());
    let auth = format!("Authorization: Bearer {token}");
    curl(
        issuer,
        &[
            "-H",
            "Content-Type: application/pkcs10",
            "-H",
            &auth,
            "--data-binary",
            &body,
            &format!("/.well-known/est/{label}/simpleenroll"),
        ],
    )
}

/// `n` fresh tokens for `label`, not bound to a subject.
pub fn tokens(issuer: &Issuer, label: &str, n: usize) -> Result<Vec<String>> {
    let out = run_ok(issuer.cli().args([
        "token",
        "create",
        "--label",
        label,
        "--count",
        &n.to_string(),
        "--format",
        "plain",
    ]))?;
    Ok(out.lines().map(str::to_owned).collect())
}

/// The certificate's authorityKeyIdentifier: which key signed it.
pub fn authority_key_id(cert: &Path) -> Result<String> {
    extension_value(cert, "authorityKeyIdentifier")
}

pub fn subject_key_id(cert: &Path) -> Result<String> {
    extension_value(cert, "subjectKeyIdentifier")
}

/// The key identifier in an extension, as openssl prints it (`AB:CD:…`, with or without a
/// `keyid:` prefix depending on the version).
fn extension_value(cert: &Path, extension: &str) -> Result<String> {
    let text = openssl(&[
        "x509",
        "-in",
        &cert.to_string_lossy(),
        "-noout",
        "-ext",
        extension,
    ])?;
    text.lines()
        .skip(1)
        .map(|l| l.trim().trim_start_matches("keyid:"))
        .find(|l| l.len() > 20)
        .map(str::to_owned)
        .ok_or_else(|| anyhow::anyhow!("no {extension} in {text}"))
}

/// The certificate's serial as the inventory writes it: lower-case hex.
pub fn serial_hex(cert: &Path) -> Result<String> {
    Ok(x509_field(cert, "-serial")?
        .trim_start_matches("serial=")
        .to_ascii_lowercase())
}

/// A field of `openssl x509 -noout -<field>`.
pub fn x509_field(cert: &Path, field: &str) -> Result<String> {
    Ok(
        openssl(&["x509", "-in", &cert.to_string_lossy(), "-noout", field])?
            .trim()
            .to_owned(),
    )
}

// --- The agent API (issuer side): URL, join tokens, entries, and a gRPC client over TLS. ---

impl Issuer {
    /// The agent API's URL, `https://127.0.0.1:PORT` (written before est.url).
    pub fn agent_api_url(&self) -> Result<String> {
        Ok(
            std::fs::read_to_string(self.dir.path().join("state/agent_api.url"))?
                .trim()
                .to_owned(),
        )
    }

    /// The EST listener's address, for raw TCP/TLS clients.
    pub fn est_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self
            .url
            .strip_prefix("https://")
            .context("EST URL is not https")?
            .parse()?)
    }

    /// The agent API's address, for raw TCP/TLS clients.
    pub fn agent_api_addr(&self) -> Result<std::net::SocketAddr> {
        Ok(self
            .agent_api_url()?
            .strip_prefix("https://")
            .context("agent API URL is not https")?
            .parse()?)
    }

    /// One join token (`issuer token create --kind join`).
    pub fn join_token(&self) -> Result<String> {
        Ok(run_ok(
            self.cli()
                .args(["token", "create", "--kind", "join", "--format", "plain"]),
        )?
        .trim()
        .to_owned())
    }

    /// `issuer entry create`; returns the entry id. `extra`: `--ttl`, `--dns`, `--hint`, …
    pub fn create_entry(
        &self,
        spiffe_id: &str,
        parent: &str,
        selectors: &[&str],
        extra: &[&str],
    ) -> Result<String> {
        let mut command = self.cli();
        command.args([
            "entry",
            "create",
            "--spiffe-id",
            spiffe_id,
            "--parent",
            parent,
        ]);
        for s in selectors {
            command.args(["--selector", s]);
        }
        command.args(extra);
        Ok(run_ok(&mut command)?.trim().to_owned())
    }
}

/// A rustls client configuration trusting the issuer's root, offering ALPN `alpn`; with
/// `identity`, (certificate chain DER leaf first, PKCS#8 key DER) as the client certificate.
pub fn tls_client_config(
    issuer: &Issuer,
    identity: Option<(Vec<Vec<u8>>, Vec<u8>)>,
    alpn: &[u8],
) -> Result<std::sync::Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let mut roots = rustls::RootCertStore::empty();
    let root_pem = std::fs::read_to_string(issuer.root_pem())?;
    for der in pem_blocks(&root_pem, "CERTIFICATE") {
        roots.add(CertificateDer::from(der))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((chain, key)) => builder.with_client_auth_cert(
            chain.into_iter().map(CertificateDer::from).collect(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key)),
        )?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(std::sync::Arc::new(config))
}

/// A gRPC channel to the issuer's agent API over real TLS (rustls, ALPN h2), trusting the
/// issuer's root; with `client`, (certificate chain DER leaf first, PKCS#8 key DER) as the
/// TLS client certificate.
pub async fn agent_api_channel(
    issuer: &Issuer,
    client: Option<(Vec<Vec<u8>>, Vec<u8>)>,
) -> Result<tonic::transport::Channel> {
    use rustls::pki_types::ServerName;
    let url = issuer.agent_api_url()?;
    let addr = url
        .strip_prefix("https://")
        .context("agent_api.url is not https")?
        .to_owned();
    let connector = tokio_rustls::TlsConnector::from(tls_client_config(issuer, client, b"h2")?);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let (connector, addr) = (connector.clone(), addr.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect(&addr).await?;
                let name = ServerName::try_from("127.0.0.1")
                    .map_err(|e| std::io::Error::other(e.to_string()))?
                    .to_owned();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await?;
    Ok(channel)
}

/// The DER contents of every PEM block labelled `label` in `pem`.
/// The first message of a join-token attestation: `token` and a CSR for a fresh P-256 key,
/// with that key (the node SVID's).
pub fn join_token_evidence(token: String) -> Result<(proto::agent::AttestRequest, rcgen::KeyPair)> {
    use proto::agent::{attest_request, evidence, AttestRequest, Evidence, JoinTokenEvidence};
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
        .serialize_request(&key)?
        .der()
        .to_vec();
    let request = AttestRequest {
        step: Some(attest_request::Step::Evidence(Evidence {
            csr,
            method: Some(evidence::Method::JoinToken(JoinTokenEvidence { token })),
        })),
    };
    Ok((request, key))
}

pub fn pem_blocks(pem: &str, label: &str) -> Vec<Vec<u8>> {
    use base64::Engine;
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    pem.split(&begin)
        .skip(1)
        .filter_map(|rest| rest.split(&end).next())
        .filter_map(|body| {
            let text: String = body.chars().filter(|c| !c.is_whitespace()).collect();
            base64::engine::general_purpose::STANDARD.decode(text).ok()
        })
        .collect()
}

/// DER certificates as one PEM file at `path` (for openssl and pkilint).
pub fn write_pem(path: &Path, ders: &[Vec<u8>]) -> Result<()> {
    use base64::Engine;
    let mut out = String::new();
    for der in ders {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let text = base64::engine::general_purpose::STANDARD.encode(der);
        for chunk in text.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(chunk));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    std::fs::write(path, out)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The agent daemon (`agent run`) and the Workload API.

/// The value of the sample `series` (name and labels, as written) in a metrics text.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// libfaketime's preload library from Debian's `faketime` package.
pub fn libfaketime() -> Result<String> {
    let out = run_ok(Command::new("dpkg").args(["-L", "libfaketime"]))
        .context("libfaketime is not installed (scripts/setup installs faketime)")?;
    out.lines()
        .find(|l| l.ends_with("/libfaketime.so.1"))
        .map(str::to_owned)
        .context("libfaketime.so.1 not found in the libfaketime package")
}

/// Environment that runs a process `offset` (libfaketime syntax: `+4m`, `-3y`) off this
/// machine's clock; CLOCK_MONOTONIC stays real, as it does when a wall clock is wrong.
pub fn shifted_clock(offset: &str) -> Result<Vec<(String, String)>> {
    Ok(vec![
        ("LD_PRELOAD".to_owned(), libfaketime()?),
        ("FAKETIME".to_owned(), offset.to_owned()),
        ("FAKETIME_DONT_FAKE_MONOTONIC".to_owned(), "1".to_owned()),
    ])
}

/// A running `agent run` with its agent.toml, state directory and Workload API socket in a
/// temp folder.
#[derive(Debug)]
pub struct Agent {
    /// agent.toml, state/, sock/workload.sock, agent.log.
    pub dir: tempfile::TempDir,
    /// The Workload API socket.
    pub socket: PathBuf,
    child: Option<Child>,
    /// Extra environment for `agent run` (e.g. libfaketime's), kept across restarts.
    env: Vec<(String, String)>,
    /// A command `agent run` is started through (e.g. `prlimit --nofile=…`), kept across
    /// restarts; empty for none.
    launcher: Vec<String>,
}

impl Agent {
    /// An agent of `issuer` attesting with a join token.
    pub fn start_with_join_token(issuer: &Issuer, token: &str) -> Result<Self> {
        Self::start(issuer, JOIN_TOKEN_ATTESTATION, &[("join.token", token)])
    }

    /// An agent of `issuer` with `attestation` as the body of its `[attestation]` table and
    /// `files` written beside agent.toml first.
    pub fn start(issuer: &Issuer, attestation: &str, files: &[(&str, &str)]) -> Result<Self> {
        Self::start_with_config(issuer, attestation, files, "")
    }

    /// Like [`Agent::start`], with `extra` appended to agent.toml (e.g. `[[proxy.inbound]]`
    /// tables; use `listen = "127.0.0.1:0"` and [`Agent::proxy_address`]).
    pub fn start_with_config(
        issuer: &Issuer,
        attestation: &str,
        files: &[(&str, &str)],
        extra: &str,
    ) -> Result<Self> {
        Self::start_through(issuer, attestation, files, extra, &[])
    }

    /// Like [`Agent::start_with_config`], with `agent run` started through `launcher` (a
    /// command and its arguments, e.g. `prlimit --nofile=1024:4096 --`): how a test gives the
    /// daemon process limits without changing its own.
    pub fn start_through(
        issuer: &Issuer,
        attestation: &str,
        files: &[(&str, &str)],
        extra: &str,
        launcher: &[&str],
    ) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        // Workloads of other users must reach the socket's directory.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text)?;
        }
        let socket = dir.path().join("sock/workload.sock");
        let config = format!(
            "server = \"{server}\"\ntrust_bundle = \"{bundle}\"\ntrust_domain = \"plant.example\"\nstate_dir = \"state\"\nsocket = \"{socket}\"\nsync_interval = \"1s\"\nmetrics_listen = \"127.0.0.1:0\"\n\n[attestation]\n{attestation}\n{extra}",
            server = issuer.agent_api_url()?,
            bundle = issuer.root_pem().display(),
            socket = socket.display(),
        );
        std::fs::write(dir.path().join("agent.toml"), config)?;
        let mut agent = Self {
            dir,
            socket,
            child: None,
            env: Vec::new(),
            launcher: launcher.iter().map(|s| (*s).to_owned()).collect(),
        };
        agent.run()?;
        Ok(agent)
    }

    /// agent.toml.
    pub fn config(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    /// The running daemon's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts (or restarts) `agent run` and waits until its socket is there.
    pub fn run(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))?;
        let mut command = match self.launcher.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(bin("agent"));
                command
            }
            None => Command::new(bin("agent")),
        };
        let child = command
            .args(["run", "--config"])
            .arg(self.config())
            .env("RUST_LOG", "info")
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting agent run")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.socket.exists() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("agent run exited with {status}:\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "agent did not bind its socket within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops the agent and runs it again with `env` added (kept for later restarts), e.g.
    /// libfaketime's variables for clock-fault tests.
    pub fn restart_with_env(&mut self, env: &[(&str, &str)]) -> Result<()> {
        self.stop()?;
        self.env = owned_env(env);
        self.run()
    }

    /// The address a proxy of legacy device `device` listens on (from `state/proxies.json`,
    /// written once every proxy listener is bound).
    pub fn proxy_address(&self, device: &str) -> Result<std::net::SocketAddr> {
        let path = self.dir.path().join("state/proxies.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(&path) {
                let proxies: serde_json::Value = serde_json::from_str(&text)?;
                let listen = proxies[device]["listen"]
                    .as_str()
                    .with_context(|| format!("no proxy for {device} in {text}"))?;
                return Ok(listen.parse()?);
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not appear within 30 s:\n{}",
                path.display(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The agent's `/metrics` text (its address from `state/metrics.url`), by curl.
    pub fn metrics(&self) -> Result<String> {
        let url = std::fs::read_to_string(self.dir.path().join("state/metrics.url"))?;
        run_ok(Command::new("curl").args(["-sSf", "--max-time", "10", url.trim()]))
    }

    /// Waits until the agent has attested and returns its node SPIFFE ID (from status.json).
    pub fn node_id(&mut self) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(self.dir.path().join("state/status.json")) {
                let status: serde_json::Value = serde_json::from_str(&text)?;
                if let Some(id) = status["node"]["spiffe_id"].as_str() {
                    return Ok(id.to_owned());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("agent run exited with {status}:\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "agent did not attest within 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until status.json shows an X509-SVID for `spiffe_id` and returns its
    /// `expires_at`.
    pub fn wait_for_svid(&mut self, spiffe_id: &str) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = std::fs::read_to_string(self.dir.path().join("state/status.json")) {
                let status: serde_json::Value = serde_json::from_str(&text)?;
                let entries = status["entries"].as_array().cloned().unwrap_or_default();
                if let Some(expires) = entries
                    .iter()
                    .filter(|e| e["spiffe_id"] == spiffe_id)
                    .find_map(|e| e["svid"]["expires_at"].as_str())
                {
                    return Ok(expires.to_owned());
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("agent run exited with {status}:\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "agent holds no SVID for {spiffe_id} after 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `agent status` output.
    pub fn status(&self) -> Result<String> {
        run_ok(
            Command::new(bin("agent"))
                .args(["status", "--config"])
                .arg(self.config()),
        )
    }

    /// SIGKILL, as a power cut would: nothing is saved on the way out. The socket file is
    /// removed as a reboot would (it lives on /run, a tmpfs), so [`Agent::run`] waits for
    /// the new daemon's socket and not the dead one's.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        match std::fs::remove_file(&self.socket) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// SIGTERM, then waits for a clean exit; returns whether it exited successfully.
    pub fn stop(&mut self) -> Result<bool> {
        let Some(mut child) = self.child.take() else {
            return Ok(true);
        };
        run_ok(Command::new("kill").args(["-TERM", &child.id().to_string()]))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status.success());
            }
            if Instant::now() > deadline {
                child.kill()?;
                child.wait()?;
                bail!("agent did not stop within 20 s of SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The node's `expires_at` and the last error in status.json.
    pub fn node_status(&self) -> Result<(Option<String>, Option<String>)> {
        let text = std::fs::read_to_string(self.dir.path().join("state/status.json"))?;
        let status: serde_json::Value = serde_json::from_str(&text)?;
        Ok((
            status["node"]["expires_at"].as_str().map(str::to_owned),
            status["last_error"].as_str().map(str::to_owned),
        ))
    }

    /// Polls `check` on [`Agent::node_status`] until it holds (up to 50 s).
    pub fn wait_status(
        &self,
        what: &str,
        check: impl Fn(&(Option<String>, Option<String>)) -> bool,
    ) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(50);
        loop {
            if self.node_status().is_ok_and(|s| check(&s)) {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{what}: not seen in status.json:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The agent's stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// pkilint's findings at WARNING or above for the one certificate in the PEM file `cert`, as
/// JSON objects with `severity`, `code` and `message`. pkilint is `PLANT_PKILINT`.
pub fn pkilint_findings(cert: &Path) -> Result<Vec<serde_json::Value>> {
    let pkilint = std::env::var("PLANT_PKILINT").context(
        "PLANT_PKILINT must point at pkilint's lint_pkix_cert (scripts/test sets it up)",
    )?;
    let out = run(Command::new(&pkilint)
        .args(["lint", "-s", "WARNING", "-f", "JSON"])
        .arg(cert))?;
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("pkilint output: {}", String::from_utf8_lossy(&out.stderr)))?;
    Ok(report["results"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|r| {
            r["finding_descriptions"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .collect())
}

/// The effective uid of this process, which the kernel reports for its connections (tests
/// create entries selecting it).
pub fn own_uid() -> Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|id| id.parse().ok())
        .context("no Uid line in /proc/self/status")
}

/// A raw tonic Workload API client on `socket`, for what the `spiffe` crate won't do (e.g.
/// leave out the security header).
pub async fn workload_client(
    socket: &Path,
) -> Result<
    proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel>,
> {
    let channel = unix_channel(socket)
        .await
        .context("connecting to the Workload API socket")?;
    Ok(proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel))
}

/// A FetchX509SVID request, with or without the security header.
pub fn x509_request(with_header: bool) -> tonic::Request<proto::workload::X509svidRequest> {
    let mut request = tonic::Request::new(proto::workload::X509svidRequest {});
    if with_header {
        request.metadata_mut().insert(
            proto::workload::SECURITY_HEADER,
            tonic::metadata::MetadataValue::from_static("true"),
        );
    }
    request
}

/// A P-256 CSR (DER) with common name `name`, made in-process (for load and fault tests that
/// enroll thousands of times through `est::client`).
pub fn p256_csr(name: &str) -> Result<Vec<u8>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    Ok(params.serialize_request(&key)?.der().to_vec())
}

/// A certificate's serial as the inventory writes it: 16 bytes, hex.
pub fn inventory_serial(der: &[u8]) -> Result<String> {
    use der::Decode;
    let cert = x509_cert::Certificate::from_der(der)?;
    let bytes = cert.tbs_certificate.serial_number.as_bytes();
    let mut padded = vec![0u8; 16usize.saturating_sub(bytes.len())];
    padded.extend_from_slice(bytes);
    Ok(hex::encode(padded))
}

/// The issuer's root certificate, DER, for `est::client::EstClient`.
pub fn root_der(issuer: &Issuer) -> Result<Vec<u8>> {
    let pem = std::fs::read(issuer.root_pem())?;
    let root = x509_cert::Certificate::load_pem_chain(&pem)?
        .into_iter()
        .next()
        .context("no certificate in root.crt")?;
    Ok(der::Encode::to_der(&root)?)
}

/// A gRPC channel over the Unix socket at `socket` (Workload API, issuer admin socket).
pub async fn unix_channel(socket: &Path) -> Result<tonic::transport::Channel> {
    let socket = socket.to_owned();
    Ok(tonic::transport::Endpoint::try_from("http://localhost")?
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await?)
}

/// `tests/py/modbus_plc.py` (a pymodbus PLC) run by `python` on `port` (0: a free one);
/// returns the process and the port it listens on.
pub fn spawn_modbus_plc(python: &Path, port: u16) -> Result<(Child, u16)> {
    use std::io::BufRead;
    let mut child = Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("py/modbus_plc.py"))
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting modbus_plc.py")?;
    let stdout = child.stdout.take().context("PLC stdout")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let port = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok());
    match port {
        Some(port) => Ok((child, port)),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            bail!("modbus_plc.py printed {line:?}")
        }
    }
}
