//! The `issuer` command line.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};

use crate::admin::AdminClient;
use crate::authority::{CreatedToken, RevocationReason, RevokeRequest, StatusReport, TokenRequest};
use crate::config::Config;
use crate::inventory::{self, Format};
use crate::store::{AuditRecord, InventoryPage, InventoryQuery, Status, TokenKind};
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

#[derive(Debug, Subcommand)]
enum Command {
    /// Create a plant CA (root + issuing CA, P-256), the EST server certificate and issuer.toml.
    Init {
        /// Folder to create the CA in.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain, e.g. plant.example.
        #[arg(long)]
        trust_domain: String,
        /// Organization name in the CA certificates.
        #[arg(long, default_value = "Plant")]
        organization: String,
        /// EST listen address (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: SocketAddr,
        /// Where to create the issuing CA key: soft:path=FILE, tpm:blob=FILE;tcti=…,
        /// tpm:handle=0x81…;tcti=…, or pkcs11:token=…;object=…;pin-file=…. A TPM or HSM key
        /// is created inside the device and never exists outside it.
        #[arg(long, default_value = "soft:path=ca/issuing.key")]
        ca_key: String,
        /// Plain-HTTP address serving the CRL (port 0: any free port).
        #[arg(long, default_value = "127.0.0.1:8080")]
        crl_listen: SocketAddr,
        /// Agent API (gRPC over TLS) listen address; default: the EST address's IP with port
        /// 8444, or port 0 when the EST port is 0.
        #[arg(long)]
        agent_api_listen: Option<SocketAddr>,
        /// DNS name of the EST server (repeatable; default localhost).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP address of the EST server (repeatable; default 127.0.0.1 and ::1).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
    },
    /// Serve EST over HTTPS and the admin socket.
    Serve(ConfigArg),
    /// Create, list and revoke one-time enrollment and join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// List issued certificates.
    Inventory {
        #[command(flatten)]
        config: ConfigArg,
        /// Only certificates expiring within this long (e.g. 30d, 12h).
        #[arg(long, value_parser = parse_duration)]
        expiring_within: Option<std::time::Duration>,
        /// Only this label.
        #[arg(long)]
        label: Option<String>,
        /// Only this status (valid, expired, revoked, superseded).
        #[arg(long)]
        status: Option<Status>,
        /// Only this owner, e.g. token:3fa9c2d1.
        #[arg(long)]
        owner: Option<String>,
        /// Only subjects containing this text.
        #[arg(long)]
        subject: Option<String>,
        /// Only certificates whose SPIFFE ID (URI SAN) starts with this prefix.
        #[arg(long)]
        spiffe_prefix: Option<String>,
        /// For cron and monitoring: list the valid certificates that expire within this long
        /// (with the other filters) and exit 1 if any do. Superseded and revoked
        /// certificates never count.
        #[arg(long, value_parser = parse_duration)]
        fail_if_expiring_within: Option<std::time::Duration>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Stop after this many rows.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Revoke a certificate: it can no longer re-enroll.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// The certificate's serial (hex, as `issuer inventory` shows it).
        serial: String,
        /// Why.
        #[arg(long, value_enum, default_value_t = RevocationReason::Unspecified)]
        reason: RevocationReason,
    },
    /// Show where the keys live, the CA's validity and counts.
    Status(ConfigArg),
    /// Print the root CA fingerprint to give engineers for `agent enroll --ca-fingerprint`.
    Fingerprint(ConfigArg),
    /// Read the audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Manage registration entries: which workloads on which node get which SPIFFE ID.
    Entry {
        #[command(subcommand)]
        command: EntryCommand,
    },
    /// List and evict attested agents (nodes).
    Agent {
        #[command(subcommand)]
        command: AgentCommand,
    },
}

#[derive(Debug, Subcommand)]
enum EntryCommand {
    /// Create an entry; prints its id.
    Create {
        #[command(flatten)]
        config: ConfigArg,
        /// The workload's SPIFFE ID, e.g. spiffe://plant.example/historian.
        #[arg(long)]
        spiffe_id: String,
        /// The node that serves it, e.g. spiffe://plant.example/agent/x509pop/gw-1.
        #[arg(long)]
        parent: String,
        /// A selector the workload must match, e.g. unix:uid:1000 (repeatable; all must
        /// match).
        #[arg(long = "selector", required = true)]
        selectors: Vec<String>,
        /// X509-SVID lifetime (default: agent_api.x509_svid_ttl, 1h).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
        /// JWT-SVID lifetime (default: agent_api.jwt_svid_ttl, 5m).
        #[arg(long, value_parser = parse_duration)]
        jwt_ttl: Option<std::time::Duration>,
        /// DNS name the X509-SVID carries (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Hint for workloads holding several SVIDs.
        #[arg(long, default_value = "")]
        hint: String,
    },
    /// List entries.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only entries of this node.
        #[arg(long)]
        parent: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
    },
    /// Delete an entry by id.
    Delete {
        #[command(flatten)]
        config: ConfigArg,
        /// The entry id (from `entry create` or `entry list`).
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AgentCommand {
    /// List attested agents.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
    },
    /// Evict an agent: its node SVID is revoked and the agent API refuses it. An x509pop or
    /// tpm node may attest again (with any certificate of the same name: use this when a
    /// device was re-commissioned); a join-token node needs a new token.
    Evict {
        #[command(flatten)]
        config: ConfigArg,
        /// Also ban it: it can't attest again until `issuer agent unban`.
        #[arg(long)]
        ban: bool,
        /// The agent's SPIFFE ID (spiffe://<td>/agent/<method>/<id>).
        spiffe_id: String,
    },
    /// Ban an agent: evicted, and every attestation of it refused until `issuer agent
    /// unban`, by node id and by what it attested with (device certificate lineage and key,
    /// TPM EK, join token).
    Ban {
        #[command(flatten)]
        config: ConfigArg,
        /// The agent's SPIFFE ID (spiffe://<td>/agent/<method>/<id>).
        spiffe_id: String,
    },
    /// Lift a ban; the agent may attest again (it stays evicted until it does).
    Unban {
        #[command(flatten)]
        config: ConfigArg,
        /// The agent's SPIFFE ID (spiffe://<td>/agent/<method>/<id>).
        spiffe_id: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum ListFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Create one-time tokens (shown once; the issuer keeps only their hashes).
    Create {
        #[command(flatten)]
        config: ConfigArg,
        /// enrollment: one EST enrollment; join: one agent node attestation (the node becomes
        /// spiffe://<trust domain>/agent/join_token/<token id>).
        #[arg(long, value_enum, default_value_t = TokenKind::Enrollment)]
        kind: TokenKind,
        /// Label (profile) the token enrolls under; default: the default profile.
        #[arg(long)]
        label: Option<String>,
        /// Subject (device name) the token is bound to.
        #[arg(long)]
        subject: Option<String>,
        /// Lifetime, e.g. 8h (default from tokens.default_ttl).
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<std::time::Duration>,
        /// DNS name the certificate may carry (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// IP address the certificate may carry (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        /// How many tokens.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Output: text for people, plain (one token per line) or json for scripts.
        #[arg(long, value_enum, default_value_t = TokenFormat::Text)]
        format: TokenFormat,
    },
    /// List tokens: id, kind, label, bound subject, expiry and state (unused, spent, expired,
    /// revoked). Secrets are never shown: the issuer does not keep them.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Output format.
        #[arg(long, value_enum, default_value_t = ListFormat::Table)]
        format: ListFormat,
    },
    /// Revoke an unused token by its id: it can no longer enroll a device or join an agent.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// The token's id (from `token create` or `token list`), not its secret.
        id: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Check the hash chain of the whole audit log; exits 1 and names the first broken
    /// record if one was edited, removed or reordered. Works with the issuer running (through
    /// the admin socket) or stopped (reading the store directly).
    Verify {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Show the newest audit records.
    Tail {
        #[command(flatten)]
        config: ConfigArg,
        /// How many records (fetched in pages of at most 1000).
        #[arg(short = 'n', long, default_value_t = 20)]
        count: usize,
        /// Only records numbered below this one (to read further back).
        #[arg(long)]
        before: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum TokenFormat {
    Text,
    Plain,
    Json,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    proto::duration::parse(text)
}

fn admin(config: &Path) -> Result<AdminClient, Error> {
    Ok(AdminClient::new(&Config::load(config)?.admin_socket()))
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Init {
            dir,
            trust_domain,
            organization,
            listen,
            crl_listen,
            agent_api_listen,
            ca_key,
            mut dns,
            mut ips,
        } => {
            if dns.is_empty() {
                dns.push("localhost".into());
            }
            if ips.is_empty() {
                ips = vec![
                    IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
                    IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
                ];
            }
            let report = crate::init::run(&crate::init::InitOptions {
                dir,
                trust_domain,
                organization,
                listen,
                crl_listen,
                agent_api_listen: agent_api_listen.unwrap_or_else(|| {
                    let port = if listen.port() == 0 {
                        0
                    } else {
                        crate::config::DEFAULT_AGENT_API_PORT
                    };
                    SocketAddr::new(listen.ip(), port)
                }),
                ca_key,
                dns,
                ips,
            })
            .await?;
            println!("created {}", report.config.display());
            println!("root CA fingerprint (SHA-256): {}", report.root_fingerprint);
            println!(
                "start it with: issuer serve --config {}",
                report.config.display()
            );
            Ok(())
        }
        Command::Serve(arg) => crate::serve::run(Config::load(&arg.config)?).await,
        Command::Token { command } => run_token(command).await,
        Command::Inventory {
            config,
            expiring_within,
            label,
            status,
            owner,
            subject,
            spiffe_prefix,
            fail_if_expiring_within,
            format,
            limit,
        } => {
            // The alarm is about certificates devices still use: a superseded certificate has
            // a renewed successor and a revoked one is dead, so neither keeps it ringing
            // (the metrics gauges count the same way).
            let status = match (fail_if_expiring_within, status) {
                (Some(_), None | Some(Status::Valid)) => Some(Status::Valid),
                (Some(_), Some(other)) => {
                    return Err(Error::Config(format!(
                        "--fail-if-expiring-within counts only valid certificates; drop \
                         --status {}, or list those with --expiring-within instead",
                        status_text(other)
                    )))
                }
                (None, status) => status,
            };
            let client = admin(&config.config)?;
            let mut query = InventoryQuery {
                expiring_within_secs: fail_if_expiring_within
                    .or(expiring_within)
                    .map(|d| d.as_secs()),
                label,
                status,
                owner,
                subject,
                spiffe_prefix,
                after: None,
                limit: Some(1000),
                skip_total: false,
            };
            let mut rows = Vec::new();
            let total = loop {
                let page: InventoryPage = client
                    .get(&format!("/v1/inventory?{}", query_string(&query)))
                    .await?;
                let total = page.total.unwrap_or_default();
                rows.extend(page.certificates);
                if let Some(l) = limit.filter(|l| rows.len() >= *l) {
                    rows.truncate(l);
                    break total;
                }
                match page.next {
                    Some(next) => query.after = Some(next),
                    None => break total,
                }
            };
            print!("{}", inventory::render(&rows, format));
            if format == Format::Table {
                eprintln!("{} of {total} certificates shown", rows.len());
            }
            match fail_if_expiring_within {
                Some(window) if total > 0 => Err(Error::Expiring(format!(
                    "{total} certificate(s) expire within {}",
                    proto::duration::format(window)
                ))),
                _ => Ok(()),
            }
        }
        Command::Revoke {
            config,
            serial,
            reason,
        } => {
            let record: crate::store::CertificateRecord = admin(&config.config)?
                .post("/v1/revocations", &RevokeRequest { serial, reason })
                .await?;
            println!("revoked {} ({})", record.serial, record.subject);
            Ok(())
        }
        Command::Status(arg) => {
            let report: StatusReport = admin(&arg.config)?.get("/v1/status").await?;
            println!("trust domain        {}", report.trust_domain);
            println!("root fingerprint    {}", report.root_fingerprint);
            println!("root key            {}", report.root_key);
            println!("issuing key         {}", report.issuing_key);
            if let Some((waiting, capacity)) = report.issuing_key_queue {
                println!("  queue             {waiting} waiting (at most {capacity})");
            }
            println!("issuing CA expires  {}", report.issuing_ca_not_after);
            if report.signing_keys.is_empty() {
                println!("signing key         the issuing key signs every certificate");
            }
            for key in &report.signing_keys {
                let phase = match key.phase {
                    crate::signing_key::Phase::Next => "next",
                    crate::signing_key::Phase::Signing => "signing",
                    crate::signing_key::Phase::Retired => "retired",
                };
                println!(
                    "signing key         {phase:<8} in memory, serial {}, signs {} to {}, certificate valid to {}",
                    key.serial, key.signs_from, key.signs_until, key.not_after
                );
            }
            if !report.signing_keys.is_empty() && !report.issuing_key_labels.is_empty() {
                println!(
                    "issuing key signs   {} (sign_with = \"issuing-key\")",
                    report.issuing_key_labels.join(", ")
                );
            }
            println!("labels              {}", report.labels.join(", "));
            println!("certificates        {}", report.certificates);
            if let Some(url) = &report.crl_url {
                println!("CRL                 {url}");
            }
            Ok(())
        }
        Command::Fingerprint(arg) => {
            let config = Config::load(&arg.config)?;
            let root =
                crate::ca::read_pem_certificate(&config.resolve(&config.ca.root_certificate))?;
            println!("{}", est::fingerprint(&root));
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { config },
        } => {
            let loaded = Config::load(&config.config)?;
            let client = AdminClient::new(&loaded.admin_socket());
            let result: crate::store::Verification = match client.get("/v1/audit/verify").await {
                Ok(v) => v,
                // Not running (or a stale socket after a crash): the store is ours to open.
                // If it is locked after all, the admin error is the one worth showing.
                Err(admin_error) => {
                    match crate::store::Store::open(&loaded.state_dir().join("store")) {
                        Ok(store) => store.audit.verify()?,
                        Err(_) => return Err(admin_error),
                    }
                }
            };
            match result.problem {
                None => {
                    println!(
                        "audit log intact: {} records, hash chain verified",
                        result.records
                    );
                    Ok(())
                }
                Some(problem) => Err(Error::AuditBroken(format!(
                    "{problem} ({} records verified before it)",
                    result.records
                ))),
            }
        }
        Command::Entry { command } => run_entry(command).await,
        Command::Agent { command } => run_agent(command).await,
        Command::Audit {
            command:
                AuditCommand::Tail {
                    config,
                    count,
                    before,
                },
        } => {
            // The API answers at most MAX_AUDIT_PAGE records at a time: walk back page by
            // page, newest page first, then print oldest first.
            let client = admin(&config.config)?;
            let mut records: Vec<AuditRecord> = Vec::new();
            let mut below = before;
            while records.len() < count {
                let want = (count - records.len()).min(crate::admin::MAX_AUDIT_PAGE);
                let query = match below {
                    Some(seq) => format!("/v1/audit?count={want}&before={seq}"),
                    None => format!("/v1/audit?count={want}"),
                };
                let page: Vec<AuditRecord> = client.get(&query).await?;
                let Some(first) = page.first() else { break };
                below = Some(first.seq);
                let short = page.len() < want;
                records.splice(0..0, page);
                if short {
                    break;
                }
            }
            for r in records {
                println!(
                    "{:>8}  {}  {:<20} {}",
                    r.seq,
                    proto::rfc3339_unix(r.at_ms / 1000),
                    r.event.kind,
                    r.event.detail
                );
            }
            Ok(())
        }
    }
}

fn ttl_secs(ttl: Option<std::time::Duration>, flag: &str) -> Result<u32, Error> {
    match ttl {
        None => Ok(0),
        Some(t) if t.as_secs() == 0 => Err(Error::Admin(format!("{flag} must be at least 1s"))),
        Some(t) => u32::try_from(t.as_secs())
            .map_err(|_| Error::Admin(format!("{flag} is longer than 136 years"))),
    }
}

async fn run_token(command: TokenCommand) -> Result<(), Error> {
    use crate::admin_grpc::{from_status, tokens};
    use proto::admin::{ListTokensRequest, RevokeTokenRequest, TokenState};
    match command {
        TokenCommand::Create {
            config,
            kind,
            label,
            subject,
            ttl,
            dns,
            ips,
            count,
            format,
        } => {
            let request = TokenRequest {
                kind,
                label,
                subject,
                ttl_secs: ttl.map(|t| t.as_secs()),
                dns,
                ips,
                count: Some(count),
            };
            let tokens: Vec<CreatedToken> =
                admin(&config.config)?.post("/v1/tokens", &request).await?;
            print_tokens(&tokens, format);
            Ok(())
        }
        TokenCommand::List { config, format } => {
            let socket = Config::load(&config.config)?.admin_socket();
            let list = tokens(&socket)
                .await?
                .list(ListTokensRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            let state = |t: &proto::admin::Token| match t.state() {
                TokenState::Unused => "unused",
                TokenState::Spent => "spent",
                TokenState::Expired => "expired",
                TokenState::Revoked => "revoked",
                TokenState::Unspecified => "unknown",
            };
            match format {
                ListFormat::Json => {
                    let rows: Vec<serde_json::Value> = list
                        .tokens
                        .iter()
                        .map(|t| {
                            serde_json::json!({
                                "id": t.id, "kind": t.kind, "label": t.label,
                                "subject": (!t.subject.is_empty()).then_some(&t.subject),
                                "dns_names": t.dns_names, "ip_addresses": t.ip_addresses,
                                "created_at": t.created_at, "expires_at": t.expires_at,
                                "state": state(t),
                                "used_at": (t.used_at != 0).then_some(t.used_at),
                                "revoked_at": (t.revoked_at != 0).then_some(t.revoked_at),
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&rows).unwrap_or_default()
                    );
                }
                ListFormat::Table => {
                    let dash = |s: &str| if s.is_empty() { "-" } else { s }.to_owned();
                    print!(
                        "{}",
                        table(
                            &["ID", "KIND", "LABEL", "SUBJECT", "EXPIRES", "STATE"],
                            list.tokens
                                .iter()
                                .map(|t| {
                                    vec![
                                        t.id.clone(),
                                        t.kind.clone(),
                                        dash(&t.label),
                                        dash(&t.subject),
                                        proto::rfc3339_unix(t.expires_at),
                                        state(t).to_owned(),
                                    ]
                                })
                                .collect(),
                        )
                    );
                }
            }
            Ok(())
        }
        TokenCommand::Revoke { config, id } => {
            let socket = Config::load(&config.config)?.admin_socket();
            let revoked = tokens(&socket)
                .await?
                .revoke(RevokeTokenRequest { id })
                .await
                .map_err(from_status)?
                .into_inner()
                .revoked;
            for t in &revoked {
                let bound = if t.subject.is_empty() {
                    String::new()
                } else {
                    format!(", subject {}", t.subject)
                };
                match t.kind.as_str() {
                    "join" => println!("revoked join token {}; it can no longer join", t.id),
                    _ => println!(
                        "revoked token {} (label {}{bound}); it can no longer enroll",
                        t.id, t.label
                    ),
                }
            }
            Ok(())
        }
    }
}

async fn run_entry(command: EntryCommand) -> Result<(), Error> {
    use crate::admin_grpc::{entries, from_status};
    use proto::admin::{CreateEntryRequest, DeleteEntryRequest, ListEntriesRequest};
    match command {
        EntryCommand::Create {
            config,
            spiffe_id,
            parent,
            selectors,
            ttl,
            jwt_ttl,
            dns,
            hint,
        } => {
            let request = CreateEntryRequest {
                spiffe_id,
                parent_id: parent,
                selectors,
                x509_svid_ttl_seconds: ttl_secs(ttl, "--ttl")?,
                jwt_svid_ttl_seconds: ttl_secs(jwt_ttl, "--jwt-ttl")?,
                dns_names: dns,
                hint,
            };
            let socket = Config::load(&config.config)?.admin_socket();
            let entry = entries(&socket)
                .await?
                .create(request)
                .await
                .map_err(from_status)?
                .into_inner();
            println!("{}", entry.id);
            Ok(())
        }
        EntryCommand::List {
            config,
            parent,
            format,
        } => {
            let socket = Config::load(&config.config)?.admin_socket();
            let list = entries(&socket)
                .await?
                .list(ListEntriesRequest {
                    parent_id: parent.unwrap_or_default(),
                })
                .await
                .map_err(from_status)?
                .into_inner();
            let rows: Vec<serde_json::Value> = list
                .entries
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "id": e.id, "spiffe_id": e.spiffe_id, "parent_id": e.parent_id,
                        "selectors": e.selectors, "x509_svid_ttl_seconds": e.x509_svid_ttl_seconds,
                        "jwt_svid_ttl_seconds": e.jwt_svid_ttl_seconds, "dns_names": e.dns_names,
                        "hint": e.hint, "revision": e.revision, "created_at": e.created_at,
                    })
                })
                .collect();
            match format {
                ListFormat::Json => println!(
                    "{}",
                    serde_json::to_string_pretty(&rows).unwrap_or_default()
                ),
                ListFormat::Table => print!(
                    "{}",
                    table(
                        &["ID", "SPIFFE ID", "PARENT", "SELECTORS", "TTL"],
                        list.entries
                            .iter()
                            .map(|e| {
                                vec![
                                    e.id.clone(),
                                    e.spiffe_id.clone(),
                                    e.parent_id.clone(),
                                    e.selectors.join(" "),
                                    match e.x509_svid_ttl_seconds {
                                        0 => "default".to_owned(),
                                        s => proto::duration::format(
                                            std::time::Duration::from_secs(s.into()),
                                        ),
                                    },
                                ]
                            })
                            .collect(),
                    )
                ),
            }
            Ok(())
        }
        EntryCommand::Delete { config, id } => {
            let socket = Config::load(&config.config)?.admin_socket();
            entries(&socket)
                .await?
                .delete(DeleteEntryRequest { id: id.clone() })
                .await
                .map_err(from_status)?;
            println!("deleted entry {id}");
            Ok(())
        }
    }
}

async fn run_agent(command: AgentCommand) -> Result<(), Error> {
    use crate::admin_grpc::{agents, from_status};
    use proto::admin::{BanAgentRequest, EvictAgentRequest, ListAgentsRequest, UnbanAgentRequest};
    match command {
        AgentCommand::List { config, format } => {
            let socket = Config::load(&config.config)?.admin_socket();
            let list = agents(&socket)
                .await?
                .list(ListAgentsRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            match format {
                ListFormat::Json => {
                    let rows: Vec<serde_json::Value> = list
                        .agents
                        .iter()
                        .map(|a| {
                            serde_json::json!({
                                "spiffe_id": a.spiffe_id, "method": a.method,
                                "attested_at": a.attested_at,
                                "node_svid_expires_at": a.node_svid_expires_at,
                                "node_svid_serial": a.node_svid_serial, "evicted": a.evicted,
                                "banned": a.banned,
                                "lineage": (!a.lineage.is_empty()).then_some(&a.lineage),
                                "certificate_serial": (!a.certificate_serial.is_empty())
                                    .then_some(&a.certificate_serial),
                            })
                        })
                        .collect();
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&rows).unwrap_or_default()
                    );
                }
                ListFormat::Table => print!(
                    "{}",
                    table(
                        &[
                            "SPIFFE ID",
                            "METHOD",
                            "ATTESTED",
                            "NODE SVID EXPIRES",
                            "STATUS"
                        ],
                        list.agents
                            .iter()
                            .map(|a| {
                                vec![
                                    a.spiffe_id.clone(),
                                    a.method.clone(),
                                    proto::rfc3339_unix(a.attested_at),
                                    proto::rfc3339_unix(a.node_svid_expires_at),
                                    if a.banned {
                                        "banned"
                                    } else if a.evicted {
                                        "evicted"
                                    } else {
                                        "attested"
                                    }
                                    .to_owned(),
                                ]
                            })
                            .collect(),
                    )
                ),
            }
            Ok(())
        }
        AgentCommand::Evict {
            config,
            ban,
            spiffe_id,
        } => {
            let socket = Config::load(&config.config)?.admin_socket();
            agents(&socket)
                .await?
                .evict(EvictAgentRequest {
                    spiffe_id: spiffe_id.clone(),
                    ban,
                })
                .await
                .map_err(from_status)?;
            if ban {
                println!(
                    "evicted and banned {spiffe_id}; its node SVID is revoked and it can't \
                     attest again until `issuer agent unban {spiffe_id}`"
                );
            } else {
                println!("evicted {spiffe_id}; its node SVID is revoked");
            }
            Ok(())
        }
        AgentCommand::Ban { config, spiffe_id } => {
            let socket = Config::load(&config.config)?.admin_socket();
            agents(&socket)
                .await?
                .ban(BanAgentRequest {
                    spiffe_id: spiffe_id.clone(),
                })
                .await
                .map_err(from_status)?;
            println!(
                "banned {spiffe_id}; its node SVID is revoked and it can't attest again until \
                 `issuer agent unban {spiffe_id}`"
            );
            Ok(())
        }
        AgentCommand::Unban { config, spiffe_id } => {
            let socket = Config::load(&config.config)?.admin_socket();
            agents(&socket)
                .await?
                .unban(UnbanAgentRequest {
                    spiffe_id: spiffe_id.clone(),
                })
                .await
                .map_err(from_status)?;
            println!("unbanned {spiffe_id}; it may attest again");
            Ok(())
        }
    }
}

/// Aligned columns for a terminal.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
            + "\n"
    };
    let mut out = line(headers.iter().map(|h| (*h).to_owned()).collect());
    for row in rows {
        out.push_str(&line(row));
    }
    out
}

fn query_string(query: &InventoryQuery) -> String {
    let mut parts = Vec::new();
    if let Some(s) = query.expiring_within_secs {
        parts.push(format!("expiring_within_secs={s}"));
    }
    if let Some(l) = &query.label {
        parts.push(format!("label={}", url_escape(l)));
    }
    for (name, value) in [
        ("owner", &query.owner),
        ("subject", &query.subject),
        ("spiffe_prefix", &query.spiffe_prefix),
    ] {
        if let Some(v) = value {
            parts.push(format!("{name}={}", url_escape(v)));
        }
    }
    if let Some(s) = query.status {
        parts.push(format!("status={}", status_text(s)));
    }
    if let Some(a) = &query.after {
        parts.push(format!("after={a}"));
    }
    if let Some(l) = query.limit {
        parts.push(format!("limit={l}"));
    }
    parts.join("&")
}

/// A status as the inventory writes it (`valid`, `superseded`, …).
fn status_text(status: Status) -> String {
    serde_json::to_value(status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn url_escape(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn print_tokens(tokens: &[CreatedToken], format: TokenFormat) {
    match format {
        TokenFormat::Plain => {
            for t in tokens {
                println!("{}", t.token);
            }
        }
        TokenFormat::Json => {
            println!(
                "{}",
                serde_json::to_string_pretty(tokens).unwrap_or_default()
            );
        }
        TokenFormat::Text => {
            for t in tokens {
                println!("token    {}", t.token);
                println!("id       {}", t.id);
                match t.kind {
                    TokenKind::Enrollment => println!("label    {}", t.label),
                    TokenKind::Join => println!("kind     join"),
                }
                if let Some(s) = &t.subject {
                    println!("subject  {s}");
                }
                println!("expires  {}", proto::rfc3339_unix(t.expires_at));
                println!();
            }
            eprintln!("The token is shown once; the issuer keeps only its hash. It works once.");
        }
    }
}
