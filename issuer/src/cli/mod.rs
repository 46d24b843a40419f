//! The `issuer` command line: one file per command group, each printing through
//! [`render`]; the commands that ask the running issuer do it over the admin socket
//! ([`crate::admin::AdminClient`]).

/// `println!` for the command line's output: never panics on a closed pipe
/// (`issuer token list | head`), see [`render::emit`].
macro_rules! say {
    () => {
        $crate::cli::render::emit(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::render::emit(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// `print!` for the command line's output, see [`say`].
macro_rules! say_raw {
    ($($arg:tt)*) => {
        $crate::cli::render::emit(format_args!($($arg)*))
    };
}

mod agents;
mod audit;
mod entries;
mod init;
mod inventory;
mod render;
mod revoke;
mod status;
mod tokens;

pub use render::output_failure;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::admin::AdminClient;
use crate::config::Config;
use crate::Error;

/// Plant PKI issuer: an EST issuing CA for a plant's devices.
#[derive(Debug, Parser)]
#[command(name = "issuer", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// The issuer's configuration file.
    #[arg(long, env = "PLANT_ISSUER_CONFIG", default_value = "issuer.toml")]
    config: PathBuf,
}

impl ConfigArg {
    /// The configuration it names.
    fn load(&self) -> Result<Config, Error> {
        Config::load(&self.config)
    }

    /// A connection to the admin socket of the issuer it configures.
    async fn admin(&self) -> Result<AdminClient, Error> {
        AdminClient::connect(&self.load()?.admin_socket()).await
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a plant CA (root + issuing CA, P-256), the EST server certificate and issuer.toml.
    Init(init::InitArgs),
    /// Serve EST over HTTPS and the admin socket.
    Serve(ConfigArg),
    /// Create, list and revoke one-time enrollment and join tokens.
    Token {
        #[command(subcommand)]
        command: tokens::TokenCommand,
    },
    /// List issued certificates.
    Inventory(inventory::InventoryArgs),
    /// Revoke a certificate: it can no longer re-enroll.
    Revoke(revoke::RevokeArgs),
    /// Show where the keys live, the CA's validity and counts.
    Status(ConfigArg),
    /// Print the root CA fingerprint to give engineers for `agent enroll --ca-fingerprint`.
    Fingerprint(ConfigArg),
    /// Read the audit log.
    Audit {
        #[command(subcommand)]
        command: audit::AuditCommand,
    },
    /// Manage registration entries: which workloads on which node get which SPIFFE ID.
    Entry {
        #[command(subcommand)]
        command: entries::EntryCommand,
    },
    /// List and evict attested agents (nodes).
    Agent {
        #[command(subcommand)]
        command: agents::AgentCommand,
    },
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    proto::duration::parse(text)
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Init(args) => init::run(args).await,
        Command::Serve(arg) => crate::serve::run(arg.load()?).await,
        Command::Token { command } => tokens::run(command).await,
        Command::Inventory(args) => inventory::run(args).await,
        Command::Revoke(args) => revoke::run(args).await,
        Command::Status(arg) => status::run(&arg).await,
        Command::Fingerprint(arg) => status::fingerprint(&arg),
        Command::Audit { command } => audit::run(command).await,
        Command::Entry { command } => entries::run(command).await,
        Command::Agent { command } => agents::run(command).await,
    }
}
