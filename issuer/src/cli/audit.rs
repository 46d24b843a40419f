//! `issuer audit`: read the audit log and check its hash chain.

use super::ConfigArg;
use crate::admin::{AdminClient, MAX_AUDIT_PAGE};
use crate::store::AuditRecord;
use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub(super) enum AuditCommand {
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

pub(super) async fn run(command: AuditCommand) -> Result<(), Error> {
    match command {
        AuditCommand::Verify { config } => verify(&config).await,
        AuditCommand::Tail {
            config,
            count,
            before,
        } => tail(&config, count, before).await,
    }
}

async fn verify(config: &ConfigArg) -> Result<(), Error> {
    let loaded = config.load()?;
    let asked = match AdminClient::connect(&loaded.admin_socket()).await {
        Ok(client) => client.audit_verify().await,
        Err(unreachable) => Err(unreachable),
    };
    let result = match asked {
        Ok(v) => v,
        // Not running (or a stale socket after a crash): the store is ours to open. If it
        // is locked after all, the admin error is the one worth showing.
        Err(admin_error) => match crate::store::Store::open(&loaded.state_dir().join("store")) {
            Ok(store) => store.audit.verify()?,
            Err(_) => return Err(admin_error),
        },
    };
    match result.problem {
        None => {
            say!(
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

async fn tail(config: &ConfigArg, count: usize, before: Option<u64>) -> Result<(), Error> {
    if count == 0 {
        return Ok(());
    }
    // The socket answers at most MAX_AUDIT_PAGE records at a time: walk back page by page,
    // newest page first, then print oldest first.
    let client = config.admin().await?;
    let mut records: Vec<AuditRecord> = Vec::new();
    let mut below = before;
    while records.len() < count {
        let want = (count - records.len()).min(MAX_AUDIT_PAGE);
        let page = client.audit_page(below, want).await?;
        let Some(first) = page.first() else { break };
        below = Some(first.seq);
        let short = page.len() < want;
        records.splice(0..0, page);
        if short {
            break;
        }
    }
    for r in records {
        say!(
            "{:>8}  {}  {:<20} {}",
            r.seq,
            proto::rfc3339_unix(r.at_ms / 1000),
            r.event.kind,
            r.event.detail
        );
    }
    Ok(())
}
