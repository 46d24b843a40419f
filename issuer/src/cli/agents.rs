//! `issuer agent`: list, evict, ban and unban attested agents (nodes).

use proto::admin::{
    AttestedAgent, BanAgentRequest, EvictAgentRequest, ListAgentsRequest, UnbanAgentRequest,
};

use super::render::{self, ListFormat, Rows};
use super::ConfigArg;
use crate::admin::client::from_status;
use crate::Error;
use proto::rfc3339_unix as rfc3339;

#[derive(Debug, clap::Subcommand)]
pub(super) enum AgentCommand {
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

pub(super) async fn run(command: AgentCommand) -> Result<(), Error> {
    match command {
        AgentCommand::List { config, format } => {
            let list = config
                .admin()
                .await?
                .agents()
                .list(ListAgentsRequest {})
                .await
                .map_err(from_status)?
                .into_inner();
            say_raw!("{}", render_list(&list.agents, format));
        }
        AgentCommand::Evict {
            config,
            ban,
            spiffe_id,
        } => {
            config
                .admin()
                .await?
                .agents()
                .evict(EvictAgentRequest {
                    spiffe_id: spiffe_id.clone(),
                    ban,
                })
                .await
                .map_err(from_status)?;
            if ban {
                say!(
                    "evicted and banned {spiffe_id}; its node SVID is revoked and it can't \
                     attest again until `issuer agent unban {spiffe_id}`"
                );
            } else {
                say!("evicted {spiffe_id}; its node SVID is revoked");
            }
        }
        AgentCommand::Ban { config, spiffe_id } => {
            config
                .admin()
                .await?
                .agents()
                .ban(BanAgentRequest {
                    spiffe_id: spiffe_id.clone(),
                })
                .await
                .map_err(from_status)?;
            say!(
                "banned {spiffe_id}; its node SVID is revoked and it can't attest again until \
                 `issuer agent unban {spiffe_id}`"
            );
        }
        AgentCommand::Unban { config, spiffe_id } => {
            config
                .admin()
                .await?
                .agents()
                .unban(UnbanAgentRequest {
                    spiffe_id: spiffe_id.clone(),
                })
                .await
                .map_err(from_status)?;
            say!("unbanned {spiffe_id}; it may attest again");
        }
    }
    Ok(())
}

fn render_list(agents: &[AttestedAgent], format: ListFormat) -> String {
    match format {
        ListFormat::Json => {
            let rows: Vec<serde_json::Value> = agents
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
            render::json(&rows)
        }
        ListFormat::Table => {
            let mut rows = Rows::new(&[
                "SPIFFE ID",
                "METHOD",
                "ATTESTED",
                "NODE SVID EXPIRES",
                "STATUS",
            ]);
            for a in agents {
                let status = if a.banned {
                    "banned"
                } else if a.evicted {
                    "evicted"
                } else {
                    "attested"
                };
                rows.push(vec![
                    a.spiffe_id.clone(),
                    a.method.clone(),
                    rfc3339(a.attested_at),
                    rfc3339(a.node_svid_expires_at),
                    status.to_owned(),
                ]);
            }
            rows.table()
        }
    }
}
