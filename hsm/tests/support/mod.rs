//! Test fixtures that run the real thing: a software TPM on free loopback ports.

#![allow(dead_code)] // each test binary uses part of it

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use hsm::Tcti;

/// A `swtpm socket --tpm2` process on 127.0.0.1, killed on drop. Its state lives in a
/// temporary folder that outlives restarts, like a TPM's NV memory outlives reboots.
#[derive(Debug)]
pub struct Swtpm {
    child: Option<Child>,
    state: tempfile::TempDir,
    port: u16,
}

impl Swtpm {
    /// Starts a fresh TPM (new endorsement and owner seeds) on two free consecutive ports.
    /// Panics, failing the test, when swtpm is not installed: tests never skip silently.
    pub fn start() -> Self {
        let mut tpm = Self {
            child: None,
            state: tempfile::tempdir().expect("swtpm state dir"),
            port: 0,
        };
        let mut last_error = String::new();
        for _ in 0..10 {
            tpm.port = free_port_pair();
            match tpm.spawn() {
                Ok(()) => return tpm,
                Err(e) => last_error = e,
            }
        }
        panic!("swtpm did not start: {last_error}");
    }

    /// Starts a TPM as it leaves a manufacturer: `swtpm_setup --create-ek-cert
    /// --create-platform-cert` derives its EKs and stores their certificates in NV (the RSA
    /// 2048 one at 0x01c00002), signed by a local CA of its own made by `swtpm_localca`: a
    /// root `swtpm-localca-rootca` and an intermediate `swtpm-localca` that signs the EK
    /// certificates. All of it (configuration, CA keys, TPM state) lives in this TPM's temp
    /// folder, never in /etc or /var. Each call makes a new CA: two such TPMs come from two
    /// different "manufacturers".
    pub fn start_manufactured() -> Self {
        let mut tpm = Self {
            child: None,
            state: tempfile::tempdir().expect("swtpm state dir"),
            port: 0,
        };
        tpm.manufacture();
        let mut last_error = String::new();
        for _ in 0..10 {
            tpm.port = free_port_pair();
            match tpm.spawn() {
                Ok(()) => return tpm,
                Err(e) => last_error = e,
            }
        }
        panic!("swtpm did not start: {last_error}");
    }

    /// The manufacturer CA an issuer must trust for this TPM's EK certificate (PEM): the
    /// local CA's intermediate, which signed it. Only for [`Swtpm::start_manufactured`].
    pub fn ek_ca_certificate(&self) -> PathBuf {
        let path = self.ek_ca_dir().join("issuercert.pem");
        assert!(
            path.exists(),
            "not a manufactured swtpm (start_manufactured)"
        );
        path
    }

    /// The local CA's root, which signed [`Swtpm::ek_ca_certificate`] (PEM).
    pub fn ek_root_certificate(&self) -> PathBuf {
        let path = self.ek_ca_dir().join("swtpm-localca-rootca-cert.pem");
        assert!(
            path.exists(),
            "not a manufactured swtpm (start_manufactured)"
        );
        path
    }

    fn ek_ca_dir(&self) -> PathBuf {
        self.state.path().join("ek-ca")
    }

    /// Runs `swtpm_setup` on this TPM's state with its own `swtpm_localca` configuration.
    fn manufacture(&self) {
        let dir = self.state.path();
        let ca = self.ek_ca_dir();
        let state = dir.join("tpm");
        std::fs::create_dir_all(&ca).expect("EK CA dir");
        std::fs::create_dir_all(&state).expect("swtpm state dir");
        let localca_conf = dir.join("swtpm-localca.conf");
        let localca_options = dir.join("swtpm-localca.options");
        let setup_conf = dir.join("swtpm_setup.conf");
        let write = |path: &Path, text: String| std::fs::write(path, text).expect("write config");
        write(
            &localca_conf,
            format!(
                "statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n\
                 certserial = {ca}/certserial\n",
                ca = ca.display()
            ),
        );
        write(
            &localca_options,
            "--platform-manufacturer Plant\n--platform-version 2.1\n--platform-model swtpm\n"
                .into(),
        );
        write(
            &setup_conf,
            format!(
                "create_certs_tool = swtpm_localca\ncreate_certs_tool_config = {}\n\
                 create_certs_tool_options = {}\nactive_pcr_banks = sha256\n",
                localca_conf.display(),
                localca_options.display()
            ),
        );
        let log = dir.join("swtpm_setup.log");
        let output = Command::new("swtpm_setup")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(&state)
            .args(["--create-ek-cert", "--create-platform-cert"])
            .arg("--config")
            .arg(&setup_conf)
            .arg("--logfile")
            .arg(&log)
            // swtpm_localca would otherwise look for a user configuration in $HOME.
            .env("XDG_CONFIG_HOME", dir)
            .stdin(Stdio::null())
            .output();
        let output = match output {
            Ok(output) => output,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "swtpm_setup is not installed; run scripts/setup (apt package swtpm-tools) \
                 — the TPM attestation tests need a real EK certificate and never skip"
            ),
            Err(e) => panic!("running swtpm_setup: {e}"),
        };
        assert!(
            output.status.success(),
            "swtpm_setup failed ({}): {}{}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// How the backend reaches this TPM.
    pub fn tcti(&self) -> Tcti {
        Tcti::Swtpm {
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    /// The TPM command port (the control channel is the next one).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The TCTI string, for key references.
    pub fn tcti_string(&self) -> String {
        self.tcti().to_string()
    }

    /// A folder for key files next to this TPM's state.
    pub fn dir(&self) -> &Path {
        self.state.path()
    }

    /// Kills the TPM process at once (SIGKILL), as a crash or power loss would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the TPM again on the same ports with the same state.
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match self.spawn() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => panic!("swtpm did not restart: {e}"),
                Err(_) => thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Freezes the TPM process (SIGSTOP): it accepts connections but answers nothing, like
    /// a wedged chip.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Lets a frozen TPM run again (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let child = self.child.as_ref().expect("swtpm is running");
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} failed");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let state = self.state.path().join("tpm");
        std::fs::create_dir_all(&state).map_err(|e| e.to_string())?;
        let log = self.state.path().join("swtpm.log");
        let child = Command::new("swtpm")
            .arg("socket")
            .arg("--tpm2")
            .arg("--tpmstate")
            .arg(format!("dir={}", state.display()))
            .arg("--server")
            .arg(format!("type=tcp,port={}", self.port))
            .arg("--ctrl")
            .arg(format!("type=tcp,port={}", self.port + 1))
            .arg("--flags")
            .arg("not-need-init,startup-clear")
            .arg("--log")
            .arg(format!("file={},level=1", log.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let mut child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "swtpm is not installed; run scripts/setup (apt packages swtpm and swtpm-tools) \
                 — the TPM tests need a real software TPM and never skip"
            ),
            Err(e) => return Err(format!("spawning swtpm: {e}")),
        };
        // Ready when the control channel accepts; the command channel serves one client at
        // a time, so leave it to the code under test.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                let mut stderr = String::new();
                if let Some(mut err) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
                }
                return Err(format!("swtpm exited with {status}: {stderr}"));
            }
            if TcpStream::connect(("127.0.0.1", self.port + 1)).is_ok() {
                self.child = Some(child);
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err("swtpm did not accept connections within 10 s".into());
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Swtpm {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // A frozen process still dies of SIGKILL, but thaw it to be safe.
            let _ = Command::new("kill")
                .args(["-CONT", &child.id().to_string()])
                .status();
        }
        self.kill();
    }
}

/// Two consecutive free ports (swtpm's control channel is the command port + 1).
fn free_port_pair() -> u16 {
    loop {
        let first = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = first.local_addr().expect("addr").port();
        if port < 65534 && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// A slow link in front of a TPM: every command waits `delay` before it is passed on, as on
/// a discrete chip that takes 42–74 ms per P-256 signature (DESIGN §3). It listens on two
/// consecutive ports of its own like swtpm: commands, and the control channel, which passes
/// straight through. Stops accepting when dropped.
#[derive(Debug)]
pub struct SlowLink {
    port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl SlowLink {
    /// Puts a link with `delay` per command in front of `tpm`.
    pub fn start(tpm: &Swtpm, delay: Duration) -> Self {
        let (commands, control) = loop {
            let commands = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = commands.local_addr().expect("addr").port();
            if port < 65534 {
                if let Ok(control) = TcpListener::bind(("127.0.0.1", port + 1)) {
                    break (commands, control);
                }
            }
        };
        let port = commands.local_addr().expect("addr").port();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let upstream = tpm.port();
        Self::accept(commands, upstream, Some(delay), stop.clone());
        Self::accept(control, upstream + 1, None, stop.clone());
        Self { port, stop }
    }

    /// How the backend reaches the TPM through this link.
    pub fn tcti(&self) -> Tcti {
        Tcti::Swtpm {
            host: "127.0.0.1".into(),
            port: self.port,
        }
    }

    /// The TCTI string, for key references.
    pub fn tcti_string(&self) -> String {
        self.tcti().to_string()
    }

    fn accept(
        listener: TcpListener,
        upstream: u16,
        delay: Option<Duration>,
        stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ) {
        listener.set_nonblocking(true).expect("nonblocking");
        thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((client, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = client.set_nonblocking(false);
                // A TPM that is down closes the client's connection, as swtpm's would.
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                match delay {
                    Some(delay) => {
                        thread::spawn(move || Self::relay_commands(client, server, delay));
                    }
                    None => Self::pipe(client, server),
                }
            }
        });
    }

    /// One TPM command at a time: read it whole, wait, pass it on, pass the answer back.
    fn relay_commands(mut client: TcpStream, mut server: TcpStream, delay: Duration) {
        use std::io::{Read, Write};
        let message = |from: &mut TcpStream| -> std::io::Result<Vec<u8>> {
            // TPM 2.0 command and response header: tag (2), size (4, big-endian), code (4).
            let mut bytes = vec![0u8; 10];
            from.read_exact(&mut bytes)?;
            let size = u32::from_be_bytes([bytes[2], bytes[3], bytes[4], bytes[5]]) as usize;
            if !(10..=65_536).contains(&size) {
                return Err(std::io::Error::other("not a TPM message"));
            }
            bytes.resize(size, 0);
            from.read_exact(&mut bytes[10..])?;
            Ok(bytes)
        };
        while let Ok(command) = message(&mut client) {
            thread::sleep(delay);
            if server.write_all(&command).is_err() {
                return;
            }
            let Ok(response) = message(&mut server) else {
                return;
            };
            if client.write_all(&response).is_err() {
                return;
            }
        }
    }

    fn pipe(client: TcpStream, server: TcpStream) {
        let (Ok(mut client_read), Ok(mut server_read)) = (client.try_clone(), server.try_clone())
        else {
            return;
        };
        let (mut client_write, mut server_write) = (client, server);
        thread::spawn(move || {
            let _ = std::io::copy(&mut client_read, &mut server_write);
            let _ = server_write.shutdown(std::net::Shutdown::Both);
        });
        thread::spawn(move || {
            let _ = std::io::copy(&mut server_read, &mut client_write);
            let _ = client_write.shutdown(std::net::Shutdown::Both);
        });
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
