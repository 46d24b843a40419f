//! Registration entries as the agent uses them: which workloads get which SPIFFE ID.

use proto::agent::RegistrationEntry;
use proto::{Selector, SpiffeId};

/// One registration entry whose parent is this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The issuer's id for it.
    pub id: String,
    /// The identity it gives.
    pub spiffe_id: SpiffeId,
    /// What a workload must show, all of them.
    pub selectors: Vec<Selector>,
    /// Workload API `hint`.
    pub hint: String,
    /// Bumped by the issuer on every change.
    pub revision: u64,
}

impl Entry {
    /// Parses an entry from the issuer; refuses one with no selectors, which would match
    /// every process on the machine.
    pub fn from_wire(entry: RegistrationEntry) -> Result<Self, String> {
        let spiffe_id = SpiffeId::new(&entry.spiffe_id)
            .map_err(|e| format!("entry {}: SPIFFE ID: {e}", entry.id))?;
        if entry.selectors.is_empty() {
            return Err(format!("entry {}: no selectors", entry.id));
        }
        let selectors = entry
            .selectors
            .iter()
            .map(|s| {
                Selector::new(s).map_err(|e| format!("entry {}: selector {s:?}: {e}", entry.id))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            id: entry.id,
            spiffe_id,
            selectors,
            hint: entry.hint,
            revision: entry.revision,
        })
    }

    /// Whether a workload with `workload` selectors gets this entry: every selector of the
    /// entry must be among the workload's (SPIRE's semantics). Extra workload selectors do
    /// not matter.
    pub fn matches(&self, workload: &[Selector]) -> bool {
        !self.selectors.is_empty() && self.selectors.iter().all(|s| workload.contains(s))
    }

    /// Whether the entry names who runs the process (`unix:uid`, `unix:gid`, `unix:user` or
    /// `unix:group`). The Workload API serves no entry that does not: `unix:path` and
    /// `unix:sha256` alone match any local user who runs (or, in a namespace of their own,
    /// mounts over) that executable.
    pub fn names_a_user(&self) -> bool {
        self.selectors.iter().any(|s| {
            s.kind() == "unix"
                && s.value()
                    .split_once(':')
                    .is_some_and(|(key, _)| matches!(key, "uid" | "gid" | "user" | "group"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(selectors: &[&str]) -> Entry {
        Entry::from_wire(RegistrationEntry {
            id: "e1".into(),
            spiffe_id: "spiffe://plant.example/historian".into(),
            parent_id: "spiffe://plant.example/agent/join_token/x".into(),
            selectors: selectors.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        })
        .expect("valid entry")
    }

    fn workload(selectors: &[&str]) -> Vec<Selector> {
        selectors
            .iter()
            .map(|s| Selector::new(s).expect(s))
            .collect()
    }

    #[test]
    fn an_entry_matches_when_all_its_selectors_are_the_workloads() {
        let historian = workload(&[
            "unix:uid:1000",
            "unix:gid:1000",
            "unix:user:historian",
            "unix:path:/usr/bin/historian",
        ]);
        let table: [(&[&str], bool); 6] = [
            (&["unix:uid:1000"], true),
            (&["unix:uid:1000", "unix:path:/usr/bin/historian"], true),
            (&["unix:user:historian", "unix:gid:1000"], true),
            (&["unix:uid:1000", "unix:path:/usr/bin/other"], false),
            (&["unix:uid:1001"], false),
            (&["unix:uid:1000", "unix:group:plant"], false),
        ];
        for (selectors, expected) in table {
            assert_eq!(
                entry(selectors).matches(&historian),
                expected,
                "{selectors:?}"
            );
        }
        assert!(!entry(&["unix:uid:1000"]).matches(&[]));
    }

    #[test]
    fn an_entry_names_a_user_by_uid_gid_user_or_group_only() {
        for selectors in [
            &["unix:uid:1000"][..],
            &["unix:gid:50", "unix:path:/usr/bin/historian"],
            &["unix:user:historian"],
            &[
                "unix:group:plant",
                "unix:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            ],
        ] {
            assert!(entry(selectors).names_a_user(), "{selectors:?}");
        }
        for selectors in [
            &["unix:path:/usr/bin/historian"][..],
            &["unix:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"],
            &["legacy:device:press-7"],
        ] {
            assert!(!entry(selectors).names_a_user(), "{selectors:?}");
        }
    }

    #[test]
    fn entries_without_selectors_or_with_bad_ones_are_refused() {
        let bad = |selectors: Vec<String>, id: &str| {
            Entry::from_wire(RegistrationEntry {
                id: "e".into(),
                spiffe_id: id.into(),
                selectors,
                ..Default::default()
            })
        };
        assert!(bad(vec![], "spiffe://td/x").is_err());
        assert!(bad(vec!["unix:uid:x".into()], "spiffe://td/x").is_err());
        assert!(bad(vec!["unix:uid:1".into()], "https://td/x").is_err());
    }
}
