//! `agent`: enroll devices with the plant's CA and renew their certificates; run the agent
//! daemon (node attestation, SPIFFE Workload API) and report its status.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use agent::commissioning::batch::{self, BatchOptions};
use agent::commissioning::credentials::{AuthScheme, EnrollmentToken, Pkcs12Password, TOKEN_ENV};
use agent::commissioning::enrollment::{self, Device, EnrollOptions, KeyOrigin};
use agent::commissioning::reenrollment::{self, CurrentKey, ReenrollOptions};
use agent::daemon::config::AgentConfig;
use agent::daemon::status::Status;
use agent::pem_files::Overwrite;
use est::Label;

/// EX_USAGE from sysexits.h: the command line or a file it names is wrong.
const EXIT_USAGE: u8 = 64;

/// `agent status` when the daemon is not running, as `systemctl status` and LSB init
/// scripts' `status` ("program is not running").
const EXIT_NOT_RUNNING: u8 = 3;

#[derive(Debug, Parser)]
#[command(
    name = "agent",
    version,
    about = "Plant PKI agent: enroll devices with the plant's CA over EST, renew their certificates, and serve SPIFFE SVIDs to local workloads"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Enroll one device (or a batch from a CSV file) with a one-time token.
    Enroll(EnrollArgs),
    /// Renew a certificate, authenticating with the current certificate and key.
    Reenroll(ReenrollArgs),
    /// Run the agent daemon: attest the node, keep workload SVIDs fresh, serve the Workload API.
    Run(DaemonArgs),
    /// Show the running agent's node identity, entries and SVIDs (from <state_dir>/status.json).
    Status(DaemonArgs),
}

#[derive(Debug, Args)]
struct DaemonArgs {
    /// The agent's configuration file
    #[arg(
        long,
        value_name = "FILE",
        default_value = "/etc/plant-agent/agent.toml"
    )]
    config: PathBuf,
}

#[derive(Debug, Args)]
struct EnrollArgs {
    /// EST server, e.g. https://ca.plant:8443
    #[arg(long, value_name = "URL")]
    server: String,
    /// SHA-256 fingerprint of the plant's root CA, as the PKI operator gave it
    #[arg(long, value_name = "SHA256HEX")]
    ca_fingerprint: String,
    /// Common name of the device's certificate
    #[arg(long, value_name = "NAME", required_unless_present = "batch")]
    subject: Option<String>,
    /// The one-time token (visible in `ps`: prefer --token-file or PLANT_EST_TOKEN)
    #[arg(
        long,
        value_name = "TOKEN",
        conflicts_with = "token_file",
        allow_hyphen_values = true
    )]
    token: Option<String>,
    /// File whose first line is the one-time token
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
    /// Send the token as `Authorization: Bearer` instead of HTTP Basic
    #[arg(long)]
    bearer: bool,
    /// EST label: a certificate profile of the issuer's config, e.g. device, plc, server (those
    /// of a default issuer) [default: the issuer's default_profile]; in a batch, the default
    /// for rows without one
    #[arg(long, value_name = "LABEL")]
    label: Option<Label>,
    /// Directory for key.pem, cert.pem, chain.pem, ca.pem (a batch makes DIR/<subject>/)
    #[arg(long, value_name = "DIR", required_unless_present = "server_keygen")]
    out: Option<PathBuf>,
    /// DNS name for the certificate (repeatable)
    #[arg(long = "dns", value_name = "NAME")]
    dns: Vec<String>,
    /// IP address for the certificate (repeatable)
    #[arg(long = "ip", value_name = "ADDR")]
    ip: Vec<IpAddr>,
    /// Create the device key in a TPM or PKCS#11 token instead of key.pem, e.g.
    /// `tpm:blob=device.tpmkey;tcti=device:/dev/tpmrm0` (a relative blob is relative to
    /// --out); DIR/key.ref then records where it is
    #[arg(long, value_name = "KEYREF", conflicts_with_all = ["batch", "server_keygen"])]
    key: Option<hsm::KeyRef>,
    /// Replace an existing key.pem, key.ref or PKCS#12 file
    #[arg(long)]
    force: bool,
    /// Enroll every device in this CSV (columns subject,token[,label,dns,ip])
    #[arg(
        long,
        value_name = "CSV",
        conflicts_with_all = ["subject", "token", "token_file", "dns", "ip", "server_keygen"]
    )]
    batch: Option<PathBuf>,
    /// Enrollments in flight at once in a batch
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=64))]
    concurrency: u16,
    /// Let the CA generate the key and write it as a PKCS#12 bundle
    #[arg(long, requires_all = ["pkcs12", "password_file"])]
    server_keygen: bool,
    /// The PKCS#12 file to write (with --server-keygen)
    #[arg(long, value_name = "FILE", requires = "server_keygen")]
    pkcs12: Option<PathBuf>,
    /// File whose first line is the PKCS#12 password (with --server-keygen)
    #[arg(long, value_name = "FILE", requires = "server_keygen")]
    password_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct ReenrollArgs {
    /// EST server, e.g. https://ca.plant:8443
    #[arg(long, value_name = "URL")]
    server: String,
    /// The current certificate (cert.pem)
    #[arg(long, value_name = "FILE")]
    cert: PathBuf,
    /// The current private key (key.pem, mode 0600) [default: key.ref or key.pem beside --cert]
    #[arg(long, value_name = "FILE", conflicts_with = "key_ref")]
    key: Option<PathBuf>,
    /// The current key in a TPM or PKCS#11 token: a key reference, or a key.ref file
    #[arg(long, value_name = "FILE_OR_KEYREF")]
    key_ref: Option<String>,
    /// The plant's root CA certificate (ca.pem)
    #[arg(long, value_name = "FILE")]
    ca: PathBuf,
    /// Issuing CA certificates to present with --cert [default: chain.pem beside it]
    #[arg(long, value_name = "FILE")]
    chain: Option<PathBuf>,
    /// EST label (certificate profile)
    #[arg(long, value_name = "LABEL")]
    label: Option<Label>,
    /// Where to write the new files [default: the directory of --cert]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Generate a new software key instead of certifying the current one again
    #[arg(long, conflicts_with = "new_key")]
    rekey: bool,
    /// Create a new key at this reference (tpm:…, pkcs11:…) and renew with it; key.ref then
    /// names it. The current key still authenticates the renewal.
    #[arg(long, value_name = "KEYREF")]
    new_key: Option<hsm::KeyRef>,
}

/// Standard output failed other than by a closed pipe: the command fails once it is done.
static OUTPUT_FAILED: AtomicBool = AtomicBool::new(false);

/// `print!` for the command's output: a reader that has gone (`agent status | head -1`)
/// ends the output quietly, as it does for other Unix tools, instead of the panic `print!`
/// gives; any other failure (a full disk behind `> file`) is reported and fails the command.
macro_rules! say {
    ($($arg:tt)*) => {
        emit(format_args!($($arg)*))
    };
}

fn emit(text: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    if let Err(e) = std::io::stdout().lock().write_fmt(text) {
        if e.kind() != std::io::ErrorKind::BrokenPipe
            && !OUTPUT_FAILED.swap(true, Ordering::Relaxed)
        {
            eprintln!("error: writing the output failed: {e}");
        }
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are not errors; everything else is a usage error.
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // The daemon says what it does; the commissioning commands only what went wrong.
    let default_filter = if matches!(cli.command, Command::Run(_)) {
        "info"
    } else {
        "warn"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colour codes only for people; a journal or log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    let runtime = match runtime() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    // Shut the runtime down before `main` returns and libc's exit handlers run. A task may
    // still hold the device key (a pooled TLS connection keeps its rustls config, and so the
    // key); dropping the runtime drops every task and joins its workers, so the last TPM key
    // goes here and the hsm crate joins the TPM's owner thread before libcrypto's
    // `OPENSSL_cleanup` runs at exit (see `hsm::tpm`'s `Drop for Tpm`).
    drop(runtime);
    match outcome {
        Ok(_) if OUTPUT_FAILED.load(Ordering::Relaxed) => ExitCode::FAILURE,
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if e.is_usage() {
                ExitCode::from(EXIT_USAGE)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn run(cli: Cli) -> Result<ExitCode, agent::Error> {
    match cli.command {
        Command::Enroll(args) => match args.batch.clone() {
            Some(csv) => enroll_batch(args, csv).await,
            None => enroll_one(args).await,
        },
        Command::Reenroll(args) => {
            let key = match (args.key, args.key_ref) {
                (Some(path), _) => CurrentKey::Pem(path),
                (None, Some(text)) => CurrentKey::from_argument(&text)?,
                (None, None) => CurrentKey::BesideCertificate,
            };
            let renewed = reenrollment::reenroll(ReenrollOptions {
                server: args.server,
                cert: args.cert,
                key,
                ca: args.ca,
                chain: args.chain,
                label: args.label,
                out: args.out,
                rekey: args.rekey,
                new_key: args.new_key,
            })
            .await?;
            say!("renewed\n{renewed}\n");
            Ok(ExitCode::SUCCESS)
        }
        Command::Run(args) => {
            let config = AgentConfig::load(&args.config)?;
            agent::daemon::run(config, shutdown_signal()).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Status(args) => {
            let config = AgentConfig::load(&args.config)?;
            let Some(status) = Status::read(&config.state_dir)? else {
                say!(
                    "{}",
                    Status::render_never_ran(&config.state_dir, &args.config)
                );
                return Ok(ExitCode::from(EXIT_NOT_RUNNING));
            };
            say!("{}", status.render());
            say!(
                "{}",
                agent::daemon::proxy::describe(&config.proxy, &config.state_dir)
            );
            Ok(if status.daemon_running() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_RUNNING)
            })
        }
    }
}

/// Resolves on SIGTERM or SIGINT. If the handlers can't be installed the daemon still runs;
/// it then stops only when killed.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler");
                std::future::pending::<()>().await;
            }
        }
    };
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = terminate => {}
        () = interrupt => {}
    }
}

async fn enroll_one(args: EnrollArgs) -> Result<ExitCode, agent::Error> {
    let token = EnrollmentToken::resolve(
        args.token.as_deref(),
        args.token_file.as_deref(),
        std::env::var(TOKEN_ENV).ok().as_deref(),
    )?;
    let device = Device::new(
        args.subject.as_deref().unwrap_or_default(),
        args.label,
        args.dns,
        args.ip,
        token,
    )?;
    let keys = match (args.server_keygen, args.pkcs12, args.password_file) {
        (true, Some(pkcs12), Some(password_file)) => KeyOrigin::Server {
            pkcs12,
            password: Pkcs12Password::from_file(&password_file)?,
        },
        _ => match args.key {
            Some(key_ref) => KeyOrigin::KeyStore(key_ref),
            None => KeyOrigin::Local,
        },
    };
    let enrolled = enrollment::enroll(EnrollOptions {
        server: args.server,
        ca_fingerprint: args.ca_fingerprint,
        device,
        auth: auth_scheme(args.bearer),
        out: args.out,
        overwrite: overwrite(args.force),
        keys,
    })
    .await?;
    say!("enrolled\n{enrolled}\n");
    Ok(ExitCode::SUCCESS)
}

async fn enroll_batch(args: EnrollArgs, csv: PathBuf) -> Result<ExitCode, agent::Error> {
    let out = args.out.ok_or_else(|| {
        agent::Error::Usage("--batch needs --out DIR for the devices' directories".into())
    })?;
    let outcome = batch::enroll_batch(BatchOptions {
        server: args.server,
        ca_fingerprint: args.ca_fingerprint,
        devices_csv: csv,
        out,
        default_label: args.label,
        auth: auth_scheme(args.bearer),
        overwrite: overwrite(args.force),
        concurrency: usize::from(args.concurrency),
    })
    .await?;
    say!("{outcome}\n");
    Ok(if outcome.failed() == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn auth_scheme(bearer: bool) -> AuthScheme {
    if bearer {
        AuthScheme::Bearer
    } else {
        AuthScheme::Basic
    }
}

fn overwrite(force: bool) -> Overwrite {
    if force {
        Overwrite::Allow
    } else {
        Overwrite::Refuse
    }
}
