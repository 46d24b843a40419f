//! `issuer entry`: registration entries, which workloads on which node get which SPIFFE ID.

use std::time::Duration;

use proto::admin::{CreateEntryRequest, DeleteEntryRequest, Entry, ListEntriesRequest};

use super::render::{self, ListFormat, Rows};
use super::{parse_duration, ConfigArg};
use crate::admin::client::from_status;
use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub(super) enum EntryCommand {
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
        ttl: Option<Duration>,
        /// JWT-SVID lifetime (default: agent_api.jwt_svid_ttl, 5m).
        #[arg(long, value_parser = parse_duration)]
        jwt_ttl: Option<Duration>,
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

pub(super) async fn run(command: EntryCommand) -> Result<(), Error> {
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
            let entry = config
                .admin()
                .await?
                .entries()
                .create(request)
                .await
                .map_err(from_status)?
                .into_inner();
            say!("{}", entry.id);
            Ok(())
        }
        EntryCommand::List {
            config,
            parent,
            format,
        } => {
            let list = config
                .admin()
                .await?
                .entries()
                .list(ListEntriesRequest {
                    parent_id: parent.unwrap_or_default(),
                })
                .await
                .map_err(from_status)?
                .into_inner();
            say_raw!("{}", render_list(&list.entries, format));
            Ok(())
        }
        EntryCommand::Delete { config, id } => {
            config
                .admin()
                .await?
                .entries()
                .delete(DeleteEntryRequest { id: id.clone() })
                .await
                .map_err(from_status)?;
            say!("deleted entry {id}");
            Ok(())
        }
    }
}

fn ttl_secs(ttl: Option<Duration>, flag: &str) -> Result<u32, Error> {
    match ttl {
        None => Ok(0),
        Some(t) if t.as_secs() == 0 => Err(Error::Admin(format!("{flag} must be at least 1s"))),
        Some(t) => u32::try_from(t.as_secs())
            .map_err(|_| Error::Admin(format!("{flag} is longer than 136 years"))),
    }
}

fn render_list(entries: &[Entry], format: ListFormat) -> String {
    match format {
        ListFormat::Json => {
            let rows: Vec<serde_json::Value> = entries
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
            render::json(&rows)
        }
        ListFormat::Table => {
            let mut rows = Rows::new(&["ID", "SPIFFE ID", "PARENT", "SELECTORS", "TTL"]);
            for e in entries {
                rows.push(vec![
                    e.id.clone(),
                    e.spiffe_id.clone(),
                    e.parent_id.clone(),
                    e.selectors.join(" "),
                    match e.x509_svid_ttl_seconds {
                        0 => "default".to_owned(),
                        s => proto::duration::format(Duration::from_secs(s.into())),
                    },
                ]);
            }
            rows.table()
        }
    }
}
