//! `<state_dir>/status.json`: what the daemon holds, written atomically on every change, and
//! `agent status`, which reads it. The file carries the daemon's pid and when it was
//! written, so `status` can say when the daemon is not running and the file is stale.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::daemon::cache::Snapshot;
use crate::pem_files::{self, Overwrite};
use crate::Error;

/// The file name in the state directory.
pub const STATUS_FILE: &str = "status.json";

/// The daemon's state for `agent status`. Holds no secret.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// The daemon's process id.
    pub pid: u32,
    /// RFC 3339.
    pub written_at: String,
    /// The trust domain.
    pub trust_domain: String,
    /// The node attestation method.
    pub method: String,
    /// The node identity, once attested.
    pub node: Option<NodeStatus>,
    /// The node's registration entries and their SVIDs.
    pub entries: Vec<EntryStatus>,
    /// The last problem, until things work again.
    pub last_error: Option<String>,
    /// While the daemon serves what it saved before a restart, not having reached the issuer
    /// since: when that was saved (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_cache_saved_at: Option<String>,
}

/// The node identity.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeStatus {
    /// `spiffe://<td>/agent/<method>/<id>`.
    pub spiffe_id: String,
    /// RFC 3339.
    pub expires_at: String,
    /// RFC 3339.
    pub renews_at: String,
}

/// One entry and its X509-SVID.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EntryStatus {
    /// The issuer's entry id.
    pub id: String,
    /// The SPIFFE ID it gives.
    pub spiffe_id: String,
    /// Its selectors.
    pub selectors: Vec<String>,
    /// The SVID served now, if any.
    pub svid: Option<SvidStatus>,
}

/// One X509-SVID's schedule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SvidStatus {
    /// RFC 3339.
    pub expires_at: String,
    /// RFC 3339.
    pub rotates_at: String,
}

impl Status {
    /// The status of this process from a snapshot.
    pub fn new(
        trust_domain: String,
        method: &str,
        node: Option<NodeStatus>,
        snapshot: &Snapshot,
        last_error: Option<String>,
    ) -> Self {
        let entries = snapshot
            .entries
            .iter()
            .map(|entry| EntryStatus {
                id: entry.id.clone(),
                spiffe_id: entry.spiffe_id.to_string(),
                selectors: entry.selectors.iter().map(ToString::to_string).collect(),
                svid: snapshot.svids.get(&entry.id).map(|svid| SvidStatus {
                    expires_at: proto::rfc3339(svid.not_after),
                    rotates_at: proto::rfc3339(svid.rotate_at),
                }),
            })
            .collect();
        Self {
            pid: std::process::id(),
            written_at: proto::rfc3339(SystemTime::now()),
            trust_domain,
            method: method.to_owned(),
            node,
            entries,
            last_error,
            serving_cache_saved_at: None,
        }
    }

    /// Says the daemon serves the cache saved at `saved_at` (when it is `Some`).
    #[must_use]
    pub fn from_cache(mut self, saved_at: Option<SystemTime>) -> Self {
        self.serving_cache_saved_at = saved_at.map(proto::rfc3339);
        self
    }

    /// Writes `<state_dir>/status.json` atomically (readers never see half a file).
    pub fn write(&self, state_dir: &Path) -> Result<(), Error> {
        std::fs::create_dir_all(state_dir).map_err(Error::io(state_dir))?;
        let json = serde_json::to_vec_pretty(self).map_err(|e| Error::Io {
            path: state_dir.join(STATUS_FILE),
            source: std::io::Error::other(e),
        })?;
        pem_files::write_atomically(&state_dir.join(STATUS_FILE), &json, 0o644, Overwrite::Allow)
    }

    /// Reads `<state_dir>/status.json`; `None` when there is none, because no agent has run
    /// with this state directory yet.
    pub fn read(state_dir: &Path) -> Result<Option<Self>, Error> {
        let path: PathBuf = state_dir.join(STATUS_FILE);
        let text = match std::fs::read(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io(&path)(e)),
        };
        serde_json::from_slice(&text).map(Some).map_err(|e| {
            Error::certificate(
                path.display().to_string(),
                format!("not a status file: {e}"),
            )
        })
    }

    /// What `agent status` prints when no agent has run with `state_dir` (it exits 3, not
    /// running, as for a stopped one: a monitor asks "is it running", and it is not).
    pub fn render_never_ran(state_dir: &Path, config: &Path) -> String {
        format!(
            "agent:        NOT RUNNING (no {} yet: no agent has run with this state_dir; start it with `agent run --config {}`)\n",
            state_dir.join(STATUS_FILE).display(),
            config.display()
        )
    }

    /// Whether the process that wrote the file still runs. A pid can be reused, so this is
    /// a hint for people, not a security check.
    pub fn daemon_running(&self) -> bool {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.pid));
        comm.is_ok_and(|name| name.trim() == "agent")
    }

    /// The report `agent status` prints.
    pub fn render(&self) -> String {
        let mut text = String::new();
        let running = if self.daemon_running() {
            format!("running (pid {})", self.pid)
        } else {
            format!(
                "NOT RUNNING (pid {} is gone; this is the state it last wrote)",
                self.pid
            )
        };
        let _ = writeln!(text, "agent:        {running}");
        let _ = writeln!(text, "written at:   {}", self.written_at);
        let _ = writeln!(text, "trust domain: {}", self.trust_domain);
        let _ = writeln!(text, "attestation:  {}", self.method);
        match &self.node {
            Some(node) => {
                let _ = writeln!(text, "node:         {}", node.spiffe_id);
                let _ = writeln!(
                    text,
                    "              expires {}, renews {}",
                    node.expires_at, node.renews_at
                );
            }
            None => {
                let _ = writeln!(text, "node:         not attested");
            }
        }
        if let Some(saved_at) = &self.serving_cache_saved_at {
            let _ = writeln!(
                text,
                "cache:        SERVING THE SAVED CACHE (saved {saved_at}): the issuer has not been reached since the agent started"
            );
        }
        if let Some(error) = &self.last_error {
            let _ = writeln!(text, "last error:   {error}");
        }
        let _ = writeln!(text, "entries:      {}", self.entries.len());
        for entry in &self.entries {
            let _ = writeln!(
                text,
                "  {}  [{}]",
                entry.spiffe_id,
                entry.selectors.join(" ")
            );
            match &entry.svid {
                Some(svid) => {
                    let _ = writeln!(
                        text,
                        "    X509-SVID expires {}, next rotation {}",
                        svid.expires_at, svid.rotates_at
                    );
                }
                None => {
                    let _ = writeln!(text, "    no X509-SVID yet");
                }
            }
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_round_trips_and_says_when_the_daemon_is_gone() {
        let dir = tempfile::tempdir().expect("tempdir");
        let td = proto::TrustDomain::new("plant.example").expect("td");
        let mut status = Status::new(
            td.to_string(),
            "join_token",
            Some(NodeStatus {
                spiffe_id: "spiffe://plant.example/agent/join_token/abc".into(),
                expires_at: "2030-01-01T00:00:00Z".into(),
                renews_at: "2029-12-31T12:00:00Z".into(),
            }),
            &Snapshot::empty(td),
            None,
        );
        status.write(dir.path()).expect("write");
        assert_eq!(
            Status::read(dir.path()).expect("read"),
            Some(status.clone())
        );
        // No process is named agent with a pid this large.
        status.pid = u32::MAX - 1;
        let text = status.render();
        assert!(text.contains("NOT RUNNING"), "{text}");
        assert!(
            text.contains("spiffe://plant.example/agent/join_token/abc"),
            "{text}"
        );
    }

    #[test]
    fn a_missing_status_file_is_no_status_and_says_how_to_start_the_agent() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(Status::read(dir.path()).expect("no file is no error"), None);
        let text = Status::render_never_ran(dir.path(), Path::new("/etc/agent.toml"));
        assert!(text.contains("NOT RUNNING"), "{text}");
        assert!(
            text.contains("agent run --config /etc/agent.toml"),
            "{text}"
        );
    }
}
