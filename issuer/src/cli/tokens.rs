//! `issuer token`: create, list and revoke one-time enrollment and join tokens.

use std::net::IpAddr;
use std::time::Duration;

use proto::admin::{ListTokensRequest, RevokeTokenRequest, Token, TokenState};

use super::render::{self, ListFormat, Rows};
use super::{parse_duration, ConfigArg};
use crate::admin::client::from_status;
use crate::store::TokenKind;
use crate::tokens::{CreatedToken, TokenRequest};
use crate::Error;
use proto::rfc3339_unix as rfc3339;

#[derive(Debug, clap::Subcommand)]
pub(super) enum TokenCommand {
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
        ttl: Option<Duration>,
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

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub(super) enum TokenFormat {
    Text,
    Plain,
    Json,
}

pub(super) async fn run(command: TokenCommand) -> Result<(), Error> {
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
            let tokens = config.admin().await?.create_tokens(&request).await?;
            print_created(&tokens, format);
            Ok(())
        }
        TokenCommand::List { config, format } => {
            let list = config
                .admin()
                .await?
                .tokens()
                .list(ListTokensRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            say_raw!("{}", render_list(&list.tokens, format));
            Ok(())
        }
        TokenCommand::Revoke { config, id } => {
            let revoked = config
                .admin()
                .await?
                .tokens()
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
                match TokenKind::from(t.kind()) {
                    TokenKind::Join => {
                        say!("revoked join token {}; it can no longer join", t.id);
                    }
                    TokenKind::Enrollment => say!(
                        "revoked token {} (label {}{bound}); it can no longer enroll",
                        t.id,
                        t.label
                    ),
                }
            }
            Ok(())
        }
    }
}

fn state(t: &Token) -> &'static str {
    match t.state() {
        TokenState::Unused => "unused",
        TokenState::Spent => "spent",
        TokenState::Expired => "expired",
        TokenState::Revoked => "revoked",
        TokenState::Unspecified => "unknown",
    }
}

/// `enrollment` or `join`, as the JSON says it.
fn kind_text(t: &Token) -> String {
    match TokenKind::from(t.kind()) {
        TokenKind::Enrollment => "enrollment",
        TokenKind::Join => "join",
    }
    .to_owned()
}

fn render_list(tokens: &[Token], format: ListFormat) -> String {
    match format {
        ListFormat::Json => {
            let rows: Vec<serde_json::Value> = tokens
                .iter()
                .map(|t| {
                    serde_json::json!({
                        "id": t.id, "kind": TokenKind::from(t.kind()), "label": t.label,
                        "subject": (!t.subject.is_empty()).then_some(&t.subject),
                        "dns_names": t.dns_names, "ip_addresses": t.ip_addresses,
                        "created_at": t.created_at, "expires_at": t.expires_at,
                        "state": state(t),
                        "used_at": (t.used_at != 0).then_some(t.used_at),
                        "revoked_at": (t.revoked_at != 0).then_some(t.revoked_at),
                    })
                })
                .collect();
            render::json(&rows)
        }
        ListFormat::Table => {
            let dash = |s: &str| if s.is_empty() { "-" } else { s }.to_owned();
            let mut rows = Rows::new(&["ID", "KIND", "LABEL", "SUBJECT", "EXPIRES", "STATE"]);
            for t in tokens {
                rows.push(vec![
                    t.id.clone(),
                    kind_text(t),
                    dash(&t.label),
                    dash(&t.subject),
                    rfc3339(t.expires_at),
                    state(t).to_owned(),
                ]);
            }
            rows.table()
        }
    }
}

fn print_created(tokens: &[CreatedToken], format: TokenFormat) {
    match format {
        TokenFormat::Plain => {
            for t in tokens {
                say!("{}", t.token);
            }
        }
        TokenFormat::Json => say_raw!("{}", render::json(tokens)),
        TokenFormat::Text => {
            for t in tokens {
                say!("token    {}", t.token);
                say!("id       {}", t.id);
                match t.kind {
                    TokenKind::Enrollment => say!("label    {}", t.label),
                    TokenKind::Join => say!("kind     join"),
                }
                if let Some(s) = &t.subject {
                    say!("subject  {s}");
                }
                say!("expires  {}", rfc3339(t.expires_at));
                say!();
            }
            eprintln!("The token is shown once; the issuer keeps only its hash. It works once.");
        }
    }
}
