//! The audit log: append-only, each record numbered and chained to the previous one by
//! SHA-256, so an edited, removed or reordered record breaks the chain (DESIGN §6).

use std::sync::{Arc, Mutex};

use super::journal::{Journal, Write};
use crate::store::{chain_hash, AuditEvent, AuditRecord, Verification};
use crate::Error;

/// The audit table.
#[derive(Debug, Clone)]
pub struct Audit {
    tree: sled::Tree,
    journal: Journal,
    /// (last seq, last hash); appends serialise here so seq order is chain order.
    tail: Arc<Mutex<(u64, [u8; 32])>>,
}

impl Audit {
    pub(in crate::store) fn open(db: &sled::Db, journal: Journal) -> Result<Self, Error> {
        let tree = db.open_tree("audit")?;
        let tail = match tree.last()? {
            Some((_, bytes)) => {
                let record: AuditRecord = serde_json::from_slice(&bytes)
                    .map_err(|e| Error::Store(format!("last audit record: {e}")))?;
                let mut hash = [0u8; 32];
                hex::decode_to_slice(&record.hash, &mut hash)
                    .map_err(|e| Error::Store(format!("last audit record hash: {e}")))?;
                (record.seq, hash)
            }
            None => (0, [0u8; 32]),
        };
        Ok(Self {
            tree,
            journal,
            tail: Arc::new(Mutex::new(tail)),
        })
    }

    /// [`append`](Self::append) as part of `write`: the event is recorded with what it
    /// tells of, or not at all.
    pub(super) fn append_in(
        &self,
        write: &mut Write<'_>,
        event: AuditEvent,
        at_ms: i64,
    ) -> Result<u64, Error> {
        let mut tail = self
            .tail
            .lock()
            .map_err(|_| Error::Store("audit log lock poisoned".into()))?;
        let seq = tail.0 + 1;
        let prev = tail.1;
        let hash = chain_hash(&prev, seq, at_ms, &event)?;
        let record = AuditRecord {
            seq,
            at_ms,
            event,
            prev: hex::encode(prev),
            hash: hex::encode(hash),
        };
        let bytes = serde_json::to_vec(&record).map_err(|e| Error::Store(e.to_string()))?;
        write.insert(&self.tree, seq.to_be_bytes(), bytes)?;
        *tail = (seq, hash);
        Ok(seq)
    }

    /// Raw access for tamper tests.
    #[cfg(test)]
    pub(crate) fn tree(&self) -> &sled::Tree {
        &self.tree
    }
}

impl crate::store::AuditLog for Audit {
    /// Appends an event; the caller commits the store before acting on it.
    fn append(&self, event: AuditEvent, at_ms: i64) -> Result<u64, Error> {
        let mut write = self.journal.begin()?;
        self.append_in(&mut write, event, at_ms)
    }

    /// The newest `count` records, oldest first.
    fn tail(&self, count: usize) -> Result<Vec<AuditRecord>, Error> {
        self.page(None, count)
    }

    /// The newest `count` records numbered below `before` (all of them when `None`), oldest
    /// first: a reader walks the whole log back by passing the first record's `seq` as the
    /// next `before`.
    fn page(&self, before: Option<u64>, count: usize) -> Result<Vec<AuditRecord>, Error> {
        let below = before.unwrap_or(u64::MAX);
        let mut records = self
            .tree
            .range(..below.to_be_bytes())
            .rev()
            .take(count)
            .map(|entry| {
                let (_, bytes) = entry?;
                serde_json::from_slice(&bytes).map_err(|e| Error::Store(e.to_string()))
            })
            .collect::<Result<Vec<AuditRecord>, Error>>()?;
        records.reverse();
        Ok(records)
    }

    /// Walks the whole log: sequence numbers must run 1, 2, 3… with no gap, each record's
    /// `prev` must be its predecessor's `hash`, and each `hash` must match the record's
    /// content. An edited record fails its own hash; a removed one leaves a gap; swapped
    /// ones break the sequence or the chain.
    fn verify(&self) -> Result<Verification, Error> {
        let mut expected_seq = 1u64;
        let mut prev = [0u8; 32];
        for entry in self.tree.iter() {
            let (key, bytes) = entry?;
            let problem = |text: String| {
                Ok(Verification {
                    records: expected_seq - 1,
                    problem: Some(text),
                })
            };
            let record: AuditRecord = match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    return problem(format!(
                        "record at position {expected_seq} does not parse: {e}"
                    ))
                }
            };
            let key_seq = <[u8; 8]>::try_from(key.as_ref())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if record.seq != key_seq {
                return problem(format!(
                    "record stored at position {key_seq} says it is number {}: records were moved or reordered",
                    record.seq
                ));
            }
            if record.seq != expected_seq {
                return problem(format!(
                    "record {expected_seq} is missing: the log jumps from {} to {}",
                    expected_seq - 1,
                    record.seq
                ));
            }
            if record.prev != hex::encode(prev) {
                return problem(format!(
                    "record {} does not follow record {}: its previous-hash does not match (removed, reordered or edited before it)",
                    record.seq,
                    record.seq - 1
                ));
            }
            let hash = chain_hash(&prev, record.seq, record.at_ms, &record.event)?;
            if record.hash != hex::encode(hash) {
                return problem(format!(
                    "record {} was altered: its content does not match its hash",
                    record.seq
                ));
            }
            prev = hash;
            expected_seq += 1;
        }
        let tail = self
            .tail
            .lock()
            .map_err(|_| Error::Store("audit log lock poisoned".into()))?
            .0;
        if expected_seq - 1 < tail {
            return Ok(Verification {
                records: expected_seq - 1,
                problem: Some(format!(
                    "the log ends at record {} but {tail} were written: the newest records were removed",
                    expected_seq - 1
                )),
            });
        }
        Ok(Verification {
            records: expected_seq - 1,
            problem: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuditLog as _;

    fn log_with(count: i64) -> (tempfile::TempDir, sled::Db, Audit) {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("db");
        let log = Audit::open(&db, super::super::journal::Journal::scratch()).expect("open");
        for i in 0..count {
            log.append(
                AuditEvent {
                    kind: "certificate.issued".into(),
                    detail: serde_json::json!({ "serial": format!("{i:032x}") }),
                },
                i,
            )
            .expect("append");
        }
        (dir, db, log)
    }

    fn record(log: &Audit, seq: u64) -> AuditRecord {
        let bytes = log
            .tree()
            .get(seq.to_be_bytes())
            .expect("get")
            .expect("present");
        serde_json::from_slice(&bytes).expect("json")
    }

    fn put(log: &Audit, position: u64, record: &AuditRecord) {
        log.tree()
            .insert(
                position.to_be_bytes(),
                serde_json::to_vec(record).expect("json"),
            )
            .expect("insert");
    }

    #[test]
    fn pages_walk_the_whole_log_back() {
        let (_dir, _db, log) = log_with(25);
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = log.page(before, 10).expect("page");
            let Some(first) = page.first() else { break };
            before = Some(first.seq);
            seen.splice(0..0, page.iter().map(|r| r.seq));
        }
        assert_eq!(seen, (1..=25).collect::<Vec<u64>>());
        assert_eq!(log.tail(3).expect("tail").first().map(|r| r.seq), Some(23));
        assert!(log.page(Some(1), 10).expect("page").is_empty());
    }

    #[test]
    fn a_clean_log_verifies() {
        let (_dir, _db, log) = log_with(10);
        assert_eq!(
            log.verify().expect("verify"),
            Verification {
                records: 10,
                problem: None
            }
        );
    }

    #[test]
    fn an_edited_record_is_named() {
        let (_dir, _db, log) = log_with(10);
        let mut r = record(&log, 4);
        r.event.detail = serde_json::json!({ "serial": "forged" });
        put(&log, 4, &r);
        let problem = log.verify().expect("verify").problem.expect("detected");
        assert!(problem.contains("record 4 was altered"), "{problem}");
    }

    #[test]
    fn an_edit_with_a_recomputed_hash_breaks_the_next_link() {
        let (_dir, _db, log) = log_with(10);
        let mut r = record(&log, 4);
        r.event.detail = serde_json::json!({ "serial": "forged" });
        let mut prev = [0u8; 32];
        hex::decode_to_slice(&r.prev, &mut prev).expect("hex");
        r.hash = hex::encode(chain_hash(&prev, r.seq, r.at_ms, &r.event).expect("hash"));
        put(&log, 4, &r);
        let problem = log.verify().expect("verify").problem.expect("detected");
        assert!(
            problem.contains("record 5 does not follow record 4"),
            "{problem}"
        );
    }

    #[test]
    fn a_deleted_record_is_named() {
        let (_dir, _db, log) = log_with(10);
        log.tree().remove(6u64.to_be_bytes()).expect("remove");
        let problem = log.verify().expect("verify").problem.expect("detected");
        assert!(problem.contains("record 6 is missing"), "{problem}");
        // Removing the newest record leaves no gap, but the writer knows how many it wrote.
        let (_dir2, _db2, log2) = log_with(10);
        log2.tree().remove(10u64.to_be_bytes()).expect("remove");
        let problem = log2.verify().expect("verify").problem.expect("detected");
        assert!(problem.contains("newest records were removed"), "{problem}");
    }

    #[test]
    fn swapped_records_are_detected() {
        let (_dir, _db, log) = log_with(10);
        let (a, b) = (record(&log, 3), record(&log, 7));
        put(&log, 3, &b);
        put(&log, 7, &a);
        let problem = log.verify().expect("verify").problem.expect("detected");
        assert!(problem.contains("reordered"), "{problem}");
        // Swapping content while keeping sequence numbers breaks hashes instead.
        let (_dir2, _db2, log2) = log_with(10);
        let (mut a, mut b) = (record(&log2, 3), record(&log2, 4));
        std::mem::swap(&mut a.event, &mut b.event);
        put(&log2, 3, &a);
        put(&log2, 4, &b);
        let problem = log2.verify().expect("verify").problem.expect("detected");
        assert!(problem.contains("record 3 was altered"), "{problem}");
    }
}
