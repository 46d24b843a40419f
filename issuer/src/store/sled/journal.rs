//! The store's write-ahead journal: how one fsync commits many requests.
//!
//! Every write to the store is applied to sled in memory and, in the same step, appended to
//! the journal as one record: the keys and values it wrote, in the order it wrote them.
//! Writes are serialised ([`Journal::begin`] holds a lock while a write applies), so journal
//! order is the order sled saw. A request is answered only once its record is on disk
//! ([`Journal::wait`]). The first request to wait while no commit runs leads one: on its own
//! thread it appends every queued record and makes them durable with one `fdatasync`.
//! Requests that wait meanwhile queue behind it; when it is done, it wakes those it made
//! durable and hands the lead to the first still waiting (group commit, with no thread of
//! its own: a committer thread cost two wake-ups and as many context switches per request).
//! Records nobody waits for (refusals' audit records) reach the disk with the next commit
//! or checkpoint.
//!
//! sled's own log reaches the disk only at checkpoints ([`Journal::checkpoint`]), off the
//! request path: sled's `flush()` writes its log buffers with `sync_file_range` from its
//! I/O thread pool, which does not make them durable (DESIGN §3) and, done per request, cost
//! more CPU than the issuance itself. A checkpoint writes the journal's last sequence number
//! into sled, flushes and `fdatasync`s sled, and deletes the journal segments it covers.
//! On open, [`recover`] applies the records after sled's checkpoint, in order: each record
//! sets keys to the values they had after the write, so applying one again is harmless.
//! A record torn by a crash or a full disk was never answered and is dropped.
//!
//! A segment grows in zero-filled steps ([`PREALLOCATE`]) and records are written in place
//! into that space: the file's size then changes once a step, not once a commit, so the
//! `fdatasync` that commits a group writes only its data blocks, without the inode (on ext4
//! half the I/O, and a third less time per commit). Recovery reads zeros after the last
//! record as the segment's end.
//!
//! Record: `len u32 LE ‖ crc32(body) u32 LE ‖ body`, body: `seq u64 LE ‖ ops u32 LE ‖ op*`,
//! op: `kind u8 (1 insert, 2 remove) ‖ tree name (u16 LE length) ‖ key (u32 LE length)
//! ‖ value (u32 LE length, inserts only)`.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::{oneshot, watch};

use crate::Error;

/// sled tree holding the checkpoint: the last journal record whose writes sled has on disk.
const CHECKPOINT_TREE: &str = "journal";
const CHECKPOINT_KEY: &str = "checkpoint";
const INSERT: u8 = 1;
const REMOVE: u8 = 2;
/// A record longer than this is not one the issuer wrote (a corrupt length).
const MAX_RECORD: usize = 256 * 1024 * 1024;
/// How far ahead of its records a segment is zero-filled.
const PREALLOCATE: u64 = 1024 * 1024;

/// The journal: hands out record numbers, queues records, and makes them durable on the
/// thread of a request that waits for them (group commit without a committer thread).
#[derive(Debug, Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Serialises writers: held while a write applies to sled and until its record is queued.
    order: Mutex<()>,
    queue: Mutex<Queue>,
    /// The segment records are written to. Whoever holds it is writing and syncing: the
    /// leading request, a checkpoint rotating segments, or the close. Lock order: `tail`,
    /// then `order`, then `queue`; a writer holds `order` and `queue` only while it applies
    /// and queues its record, never while waiting for the disk.
    tail: Mutex<Tail>,
    /// Set once a write or fsync of the journal (or a checkpoint of sled) failed: after a
    /// failed fsync the kernel may have dropped the dirty pages, so nothing written since
    /// the last good one can be trusted (PostgreSQL's "fsyncgate" lesson), and sled keeps a
    /// failed write's error for good. Only a restart on what is on disk recovers. It changes
    /// once; waiting requests hear of their own record from the commit that wrote it
    /// ([`Queue::waiters`]), so nothing watching this wakes at every commit.
    broken: watch::Sender<Option<String>>,
    dir: PathBuf,
}

/// The journal's end on disk.
#[derive(Debug)]
struct Tail {
    segment: Segment,
    /// Records up to here are written to the segment.
    written: u64,
}

#[derive(Debug, Default)]
struct Queue {
    /// The newest record number handed out.
    assigned: u64,
    /// Records not yet written to the segment.
    pending: Vec<u8>,
    /// Every record up to here is on disk.
    durable: u64,
    /// A request is writing and syncing for everyone; the others wait in `waiters`.
    leading: bool,
    /// Requests waiting for their record, in record order, with the record number each
    /// needs on disk.
    waiters: VecDeque<(u64, Waiter)>,
    broken: bool,
}

/// What a waiting request is told, once.
#[derive(Debug)]
enum Told {
    /// Its record is on disk.
    Durable,
    /// The leader is done and the request's record is not on disk yet: it leads next.
    Lead,
    /// The store broke; nothing more is made durable.
    Broken(String),
}

type Waiter = oneshot::Sender<Told>;

/// A request waiting for its record. Dropped with leadership handed to it and not taken up
/// (the request was cancelled: its client went away), it hands leadership on, so the
/// requests behind it are not left without a leader.
struct Waiting<'a> {
    shared: &'a Shared,
    told: oneshot::Receiver<Told>,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Ok(Told::Lead) = self.told.try_recv() {
            self.shared.lead();
        }
    }
}

/// One write in progress: applies each operation to sled at once and journals them all as
/// one record when dropped. Holding it keeps every other writer out.
pub struct Write<'a> {
    _order: MutexGuard<'a, ()>,
    shared: &'a Shared,
    ops: Vec<u8>,
    count: u32,
}

impl std::fmt::Debug for Write<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Write").field("ops", &self.count).finish()
    }
}

impl Write<'_> {
    /// Sets `key` to `value` in `tree`; returns the previous value.
    pub fn insert(
        &mut self,
        tree: &sled::Tree,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<sled::IVec>, Error> {
        let (key, value) = (key.as_ref(), value.as_ref());
        let old = tree.insert(key, value).map_err(|e| self.shared.broke(e))?;
        self.op(INSERT, tree, key, Some(value));
        Ok(old)
    }

    /// Removes `key` from `tree`; returns the previous value.
    pub fn remove(
        &mut self,
        tree: &sled::Tree,
        key: impl AsRef<[u8]>,
    ) -> Result<Option<sled::IVec>, Error> {
        let key = key.as_ref();
        let old = tree.remove(key).map_err(|e| self.shared.broke(e))?;
        if old.is_some() {
            self.op(REMOVE, tree, key, None);
        }
        Ok(old)
    }

    fn op(&mut self, kind: u8, tree: &sled::Tree, key: &[u8], value: Option<&[u8]>) {
        let name = tree.name();
        self.ops.push(kind);
        self.ops
            .extend_from_slice(&(name.len() as u16).to_le_bytes());
        self.ops.extend_from_slice(&name);
        self.ops
            .extend_from_slice(&(key.len() as u32).to_le_bytes());
        self.ops.extend_from_slice(key);
        if let Some(value) = value {
            self.ops
                .extend_from_slice(&(value.len() as u32).to_le_bytes());
            self.ops.extend_from_slice(value);
        }
        self.count += 1;
    }
}

impl Drop for Write<'_> {
    /// Queues whatever was applied as one record, even on an early return: sled has it in
    /// memory, so the journal must too.
    fn drop(&mut self) {
        if self.count == 0 {
            return;
        }
        let Ok(mut queue) = self.shared.queue.lock() else {
            return;
        };
        queue.assigned += 1;
        let seq = queue.assigned;
        let mut body = Vec::with_capacity(12 + self.ops.len());
        body.extend_from_slice(&seq.to_le_bytes());
        body.extend_from_slice(&self.count.to_le_bytes());
        body.extend_from_slice(&self.ops);
        queue
            .pending
            .extend_from_slice(&(body.len() as u32).to_le_bytes());
        queue
            .pending
            .extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        queue.pending.extend_from_slice(&body);
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.journal"))
}

/// The journal's segment files, oldest first, with the first record number each holds.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(Error::io(dir))? {
        let path = entry.map_err(Error::io(dir))?.path();
        let first = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".journal"))
            .and_then(|n| n.parse::<u64>().ok());
        if let Some(first) = first {
            found.push((first, path));
        }
    }
    found.sort();
    Ok(found)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(dir))
}

/// sled's checkpoint: the last record whose writes are in sled on disk.
fn checkpoint_of(db: &sled::Db) -> Result<u64, Error> {
    let tree = db.open_tree(CHECKPOINT_TREE)?;
    Ok(tree
        .get(CHECKPOINT_KEY)?
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Flushes sled and `fdatasync`s its log file (sled's own flush does not, DESIGN §3).
fn flush_sled(db: &sled::Db, log: &File) -> Result<(), String> {
    db.flush().map_err(|e| e.to_string())?;
    log.sync_data().map_err(|e| e.to_string())
}

/// Applies the journal's records that sled's checkpoint does not cover, makes sled durable
/// and empties the journal. Returns the last record number, from which the journal goes on.
pub fn recover(db: &sled::Db, store_dir: &Path) -> Result<u64, Error> {
    let dir = store_dir.join("journal");
    std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
    let checkpoint = checkpoint_of(db)?;
    let mut last = checkpoint;
    let mut applied = 0usize;
    let mut trees: HashMap<Vec<u8>, sled::Tree> = HashMap::new();
    let found = segments(&dir)?;
    'segments: for (_, path) in &found {
        let bytes = std::fs::read(path).map_err(Error::io(path))?;
        let mut at = 0usize;
        while at < bytes.len() {
            let Some(record) = record_at(&bytes, at) else {
                if bytes[at..].iter().all(|&b| b == 0) {
                    // The zero-filled space after the segment's last record.
                    continue 'segments;
                }
                // A torn tail: the write a crash or a full disk cut short, never answered.
                tracing::warn!(
                    journal = %path.display(),
                    offset = at,
                    dropped = bytes.len() - at,
                    "the store's journal ends with an incomplete record; it was never \
                     answered and is dropped"
                );
                break 'segments;
            };
            at = record.end;
            if record.seq <= last {
                continue;
            }
            apply(db, &mut trees, record.ops).map_err(|e| {
                Error::Store(format!(
                    "journal record {} in {}: {e}",
                    record.seq,
                    path.display()
                ))
            })?;
            last = record.seq;
            applied += 1;
        }
    }
    if applied > 0 {
        tracing::info!(
            records = applied,
            "applied the store's journal written since sled's last checkpoint"
        );
    }
    db.open_tree(CHECKPOINT_TREE)?
        .insert(CHECKPOINT_KEY, &last.to_be_bytes())?;
    let log_path = store_dir.join("db");
    let log = File::open(&log_path).map_err(Error::io(&log_path))?;
    flush_sled(db, &log).map_err(|e| Error::Store(format!("checkpointing the store: {e}")))?;
    for (_, path) in &found {
        std::fs::remove_file(path).map_err(Error::io(path))?;
    }
    sync_dir(&dir)?;
    Ok(last)
}

struct Record<'a> {
    seq: u64,
    ops: &'a [u8],
    end: usize,
}

fn record_at(bytes: &[u8], at: usize) -> Option<Record<'_>> {
    let header = bytes.get(at..at + 8)?;
    let len = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().ok()?);
    if !(12..=MAX_RECORD).contains(&len) {
        return None;
    }
    let body = bytes.get(at + 8..at + 8 + len)?;
    if crc32fast::hash(body) != crc {
        return None;
    }
    Some(Record {
        seq: u64::from_le_bytes(body[..8].try_into().ok()?),
        ops: &body[8..],
        end: at + 8 + len,
    })
}

fn apply(
    db: &sled::Db,
    trees: &mut HashMap<Vec<u8>, sled::Tree>,
    ops: &[u8],
) -> Result<(), String> {
    let mut cursor = Cursor(ops);
    let count = u32::from_le_bytes(cursor.take(4)?.try_into().map_err(|_| "count")?);
    for _ in 0..count {
        let kind = cursor.take(1)?[0];
        let name_len = u16::from_le_bytes(cursor.take(2)?.try_into().map_err(|_| "name")?);
        let name = cursor.take(name_len.into())?;
        let key = cursor.take_sized()?;
        let tree = match trees.get(name) {
            Some(tree) => tree,
            None => {
                let tree = db.open_tree(name).map_err(|e| e.to_string())?;
                trees.entry(name.to_vec()).or_insert(tree)
            }
        };
        match kind {
            INSERT => {
                let value = cursor.take_sized()?;
                tree.insert(key, value).map_err(|e| e.to_string())?;
            }
            REMOVE => {
                tree.remove(key).map_err(|e| e.to_string())?;
            }
            other => return Err(format!("unknown operation {other}")),
        }
    }
    Ok(())
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("record ends early".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn take_sized(&mut self) -> Result<&'a [u8], String> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().map_err(|_| "length")?);
        self.take(len as usize)
    }
}

impl Journal {
    /// Starts a new segment after record `last` ([`recover`]'s answer).
    pub fn start(store_dir: &Path, last: u64) -> Result<Self, Error> {
        let dir = store_dir.join("journal");
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        let path = segment_path(&dir, last + 1);
        let segment = Segment::create(&path).map_err(Error::io(&path))?;
        sync_dir(&dir)?;
        let (broken, _) = watch::channel(None);
        let shared = Arc::new(Shared {
            order: Mutex::new(()),
            queue: Mutex::new(Queue {
                assigned: last,
                durable: last,
                ..Queue::default()
            }),
            tail: Mutex::new(Tail {
                segment,
                written: last,
            }),
            broken,
            dir,
        });
        Ok(Self { shared })
    }

    /// A journal in a folder of its own that outlives the test (unit tests of one table).
    #[cfg(test)]
    pub fn scratch() -> Self {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        Self::start(&dir, 0).expect("journal")
    }

    /// Begins a write; every other writer waits until it is dropped.
    pub fn begin(&self) -> Result<Write<'_>, Error> {
        let order = self
            .shared
            .order
            .lock()
            .map_err(|_| Error::Store("the store's write lock is poisoned".into()))?;
        if let Some(error) = &*self.shared.broken.borrow() {
            return Err(Error::Store(format!("writing to disk failed: {error}")));
        }
        Ok(Write {
            _order: order,
            shared: &self.shared,
            ops: Vec::new(),
            count: 0,
        })
    }

    /// Waits until every record handed out before the call is on disk, at most `deadline`
    /// (a hung disk then breaks the store rather than every request behind it).
    pub async fn wait(&self, deadline: Duration) -> Result<(), Error> {
        let (target, told) = {
            let mut queue = self.queue()?;
            if queue.broken {
                return Err(self.broken_error());
            }
            let target = queue.assigned;
            if queue.durable >= target {
                return Ok(());
            }
            if queue.leading {
                let (waiter, told) = oneshot::channel();
                queue.waiters.push_back((target, waiter));
                (target, Some(told))
            } else {
                queue.leading = true;
                (target, None)
            }
        };
        if let Some(told) = told {
            let mut waiting = Waiting {
                shared: &self.shared,
                told,
            };
            match tokio::time::timeout(deadline, &mut waiting.told).await {
                Ok(Ok(Told::Durable)) => return Ok(()),
                Ok(Ok(Told::Broken(error))) => {
                    return Err(Error::Store(format!("writing to disk failed: {error}")))
                }
                Ok(Ok(Told::Lead)) => {}
                Ok(Err(_)) => return Err(Error::Store("the store's journal stopped".into())),
                Err(_) => {
                    let error = format!(
                        "a write to the store did not reach the disk within {} s (is the disk \
                         hung?)",
                        deadline.as_secs()
                    );
                    self.fail(error.clone());
                    return Err(Error::Store(error));
                }
            }
        }
        // This request leads: it writes and syncs every queued record, its own among them,
        // on its own thread. An `fdatasync` blocks this worker for its duration (a few
        // hundred µs); handing it to a thread of its own instead cost more CPU in wake-ups
        // and context switches than the sync itself.
        self.shared.lead();
        let queue = self.queue()?;
        if queue.durable >= target {
            Ok(())
        } else {
            Err(self.broken_error())
        }
    }

    fn broken_error(&self) -> Error {
        Error::Store(format!(
            "writing to disk failed: {}",
            self.shared
                .broken
                .borrow()
                .clone()
                .unwrap_or_else(|| "the store is broken".into())
        ))
    }

    /// Marks the store broken with `error` (see [`Shared::broken`]).
    pub fn fail(&self, error: String) {
        self.shared.fail(error);
    }

    /// Why the store is broken, once it is (see [`Shared::broken`]).
    pub fn broken(&self) -> watch::Receiver<Option<String>> {
        self.shared.broken.subscribe()
    }

    /// Records handed out so far, and how many are on disk.
    pub fn progress(&self) -> (u64, u64) {
        self.queue().map_or((0, 0), |q| (q.assigned, q.durable))
    }

    fn queue(&self) -> Result<MutexGuard<'_, Queue>, Error> {
        self.shared
            .queue
            .lock()
            .map_err(|_| Error::Store("the store's journal lock is poisoned".into()))
    }

    /// Makes sled durable up to the newest record and deletes the journal segments that
    /// held only older ones. Blocking: run it off the async workers. `log` is sled's log
    /// file.
    pub fn checkpoint(&self, db: &sled::Db, log: &File) -> Result<(), String> {
        let upto = {
            // The segment first, then the write lock: a sync that hangs on a failed disk
            // then holds up this checkpoint, not every writer behind it.
            let mut tail = self
                .shared
                .tail
                .lock()
                .map_err(|_| "the journal's segment lock is poisoned")?;
            // Under the write lock every record up to `upto` is applied and none after it:
            // the checkpoint key lands in sled's log after all of them.
            let order = self
                .shared
                .order
                .lock()
                .map_err(|_| "write lock poisoned")?;
            let (before, upto) = {
                let mut queue = self.queue().map_err(|e| e.to_string())?;
                if queue.broken {
                    return Err("the store is broken".into());
                }
                (std::mem::take(&mut queue.pending), queue.assigned)
            };
            db.open_tree(CHECKPOINT_TREE)
                .and_then(|t| t.insert(CHECKPOINT_KEY, &upto.to_be_bytes()))
                .map_err(|e| e.to_string())?;
            drop(order);
            // Records up to `upto` go to the old segment, everything later to a new one.
            let rotated = (|| -> Result<(), String> {
                tail.segment
                    .append(&before)
                    .and_then(|()| tail.segment.file.sync_data())
                    .map_err(|e| format!("writing the store's journal: {e}"))?;
                tail.written = upto;
                let path = segment_path(&self.shared.dir, upto + 1);
                tail.segment = Segment::create(&path)
                    .map_err(|e| format!("opening {}: {e}", path.display()))?;
                File::open(&self.shared.dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| format!("syncing {}: {e}", self.shared.dir.display()))
            })();
            match rotated {
                Ok(()) => self.shared.made_durable(upto),
                Err(e) => {
                    self.shared.fail(e.clone());
                    return Err(e);
                }
            }
            upto
        };
        flush_sled(db, log)?;
        let current = segment_path(&self.shared.dir, upto + 1);
        for (_, path) in segments(&self.shared.dir).map_err(|e| e.to_string())? {
            if path != current {
                std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Writes and syncs what is queued (shutdown).
    pub fn close(&self) {
        if let Ok(mut tail) = self.shared.tail.lock() {
            self.shared.commit(&mut tail);
        }
    }
}

/// A journal segment: records in place, into space zero-filled ahead.
#[derive(Debug)]
struct Segment {
    file: File,
    /// Where the next record goes.
    end: u64,
    /// The file's size: zeros from `end` to here.
    allocated: u64,
}

impl Segment {
    /// A new, empty segment at `path` (recovery has emptied the journal before this).
    fn create(path: &Path) -> std::io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        Ok(Self {
            file,
            end: 0,
            allocated: 0,
        })
    }

    /// Writes `bytes` after the last record, zero-filling the next [`PREALLOCATE`] bytes
    /// first when they don't fit. The fill goes to disk with the records' own
    /// `fdatasync`. A disk too full for the fill takes the records without it.
    fn append(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        let needed = self.end + bytes.len() as u64;
        if needed > self.allocated {
            let target = needed + PREALLOCATE;
            match self.fill_zeros(target) {
                Ok(()) => self.allocated = target,
                Err(e) => {
                    tracing::debug!(error = %e, "no room to zero-fill the journal ahead");
                    // Back to what was there, so no half-written fill remains.
                    self.file.set_len(self.allocated.max(self.end))?;
                }
            }
        }
        self.file.write_all_at(bytes, self.end)?;
        self.end = needed;
        self.allocated = self.allocated.max(needed);
        Ok(())
    }

    fn fill_zeros(&self, target: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];
        let mut at = self.allocated.max(self.end);
        while at < target {
            let n = (target - at).min(ZEROS.len() as u64) as usize;
            self.file.write_all_at(&ZEROS[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }
}

impl Shared {
    fn fail(&self, error: String) {
        self.broken.send_modify(|broken| {
            broken.get_or_insert(error);
        });
        if let Ok(mut queue) = self.queue.lock() {
            queue.broken = true;
            let error = self.broken.borrow().clone().unwrap_or_default();
            for (_, waiter) in queue.waiters.drain(..) {
                let _ = waiter.send(Told::Broken(error.clone()));
            }
        }
    }

    /// Publishes that every record up to `synced` is on disk and tells the requests that
    /// waited for them.
    fn made_durable(&self, synced: u64) {
        let Ok(mut queue) = self.queue.lock() else {
            return;
        };
        if synced <= queue.durable {
            return;
        }
        queue.durable = synced;
        while queue
            .waiters
            .front()
            .is_some_and(|(target, _)| *target <= synced)
        {
            if let Some((_, waiter)) = queue.waiters.pop_front() {
                let _ = waiter.send(Told::Durable);
            }
        }
    }

    /// A sled write refused: sled keeps such an error for good, so the store is broken.
    fn broke(&self, error: sled::Error) -> Error {
        let error = Error::from(error);
        self.fail(error.to_string());
        error
    }

    /// Writes every queued record and syncs them: one `fdatasync` for all the requests
    /// whose records were queued by now.
    fn commit(&self, tail: &mut Tail) {
        let (bytes, upto) = match self.queue.lock() {
            // Everything written is on disk already (a checkpoint took it): no sync to make.
            Ok(queue) if queue.pending.is_empty() && queue.durable >= tail.written => return,
            Ok(mut queue) if !queue.broken => (std::mem::take(&mut queue.pending), queue.assigned),
            _ => return,
        };
        let written = (|| -> Result<(), String> {
            if !bytes.is_empty() {
                tail.segment
                    .append(&bytes)
                    .map_err(|e| format!("writing the store's journal: {e}"))?;
                tail.written = upto;
            }
            tail.segment
                .file
                .sync_data()
                .map_err(|e| format!("syncing the store's journal: {e}"))
        })();
        match written {
            Ok(()) => self.made_durable(tail.written),
            Err(e) => {
                tracing::error!(error = %e, "the store's journal failed");
                self.fail(e);
            }
        }
    }

    /// Leads one group commit, then hands leadership to the first request whose record is
    /// still not on disk (it arrived during this sync), or gives it up.
    fn lead(&self) {
        match self.tail.lock() {
            Ok(mut tail) => self.commit(&mut tail),
            Err(_) => self.fail("the journal's segment lock is poisoned".into()),
        }
        let Ok(mut queue) = self.queue.lock() else {
            return;
        };
        while let Some((_, waiter)) = queue.waiters.pop_front() {
            if waiter.send(Told::Lead).is_ok() {
                return;
            }
        }
        queue.leading = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(tree: &sled::Tree) -> Vec<(Vec<u8>, Vec<u8>)> {
        tree.iter()
            .map(|e| e.map(|(k, v)| (k.to_vec(), v.to_vec())).expect("entry"))
            .collect()
    }

    #[tokio::test]
    async fn recovery_applies_the_whole_records_after_the_checkpoint_and_drops_a_torn_tail() {
        // Writes journaled against one database are recovered into another that never saw
        // them, as after a crash that lost sled's unflushed log.
        let written = tempfile::tempdir().expect("tempdir");
        let db = sled::open(written.path().join("sled")).expect("sled");
        let tree = db.open_tree("table").expect("tree");
        let journal = Journal::start(written.path(), 0).expect("journal");
        {
            let mut write = journal.begin().expect("begin");
            write.insert(&tree, "a", "1").expect("insert");
            write.insert(&tree, "b", "2").expect("insert");
        }
        {
            let mut write = journal.begin().expect("begin");
            write.remove(&tree, "a").expect("remove");
            write.insert(&tree, "c", "3").expect("insert");
        }
        journal
            .wait(Duration::from_secs(30))
            .await
            .expect("durable");
        assert_eq!(journal.progress(), (2, 2));

        let crashed = tempfile::tempdir().expect("tempdir");
        let recovered = sled::open(crashed.path()).expect("sled");
        std::fs::create_dir_all(crashed.path().join("journal")).expect("dir");
        let (_, segment) = segments(&written.path().join("journal"))
            .expect("segments")
            .pop()
            .expect("a segment");
        let mut bytes = std::fs::read(&segment).expect("read");
        assert!(
            bytes.len() as u64 >= PREALLOCATE,
            "the segment is zero-filled ahead"
        );
        bytes.truncate(records_end(&bytes));
        // A third record cut short by the crash: never answered, so dropped.
        let whole = bytes.len();
        bytes.extend_from_within(..whole / 3);
        std::fs::write(
            crashed
                .path()
                .join("journal")
                .join(segment.file_name().expect("name")),
            &bytes,
        )
        .expect("copy");

        assert_eq!(recover(&recovered, crashed.path()).expect("recover"), 2);
        let table = recovered.open_tree("table").expect("tree");
        assert_eq!(
            entries(&table),
            entries(&tree),
            "the recovered table differs"
        );
        assert_eq!(checkpoint_of(&recovered).expect("checkpoint"), 2);
        assert!(
            segments(&crashed.path().join("journal"))
                .expect("segments")
                .is_empty(),
            "recovery leaves no journal behind"
        );
        // Recovering again finds nothing to do and changes nothing.
        assert_eq!(recover(&recovered, crashed.path()).expect("again"), 2);
        assert_eq!(entries(&table), entries(&tree));
        journal.close();
    }

    /// Where the records in a segment's bytes end (the zero-filled space begins).
    fn records_end(bytes: &[u8]) -> usize {
        let mut at = 0;
        while let Some(record) = record_at(bytes, at) {
            at = record.end;
        }
        at
    }

    #[tokio::test]
    async fn recovery_reads_past_a_segments_zero_filled_space_into_the_next_segment() {
        // Two segments as a crash between a checkpoint's rotation and its deletion of the
        // old segment leaves them: records 1-2 in the first, 3 in the second, each followed
        // by the zeros written ahead.
        let first = tempfile::tempdir().expect("tempdir");
        let second = tempfile::tempdir().expect("tempdir");
        let db = sled::open(first.path().join("sled")).expect("sled");
        let tree = db.open_tree("table").expect("tree");
        let journal = Journal::start(first.path(), 0).expect("journal");
        for (key, value) in [("a", "1"), ("b", "2")] {
            journal
                .begin()
                .expect("begin")
                .insert(&tree, key, value)
                .expect("insert");
        }
        journal
            .wait(Duration::from_secs(30))
            .await
            .expect("durable");
        let next = Journal::start(second.path(), 2).expect("journal");
        next.begin()
            .expect("begin")
            .insert(&tree, "c", "3")
            .expect("insert");
        next.wait(Duration::from_secs(30)).await.expect("durable");

        let crashed = tempfile::tempdir().expect("tempdir");
        let journal_dir = crashed.path().join("journal");
        std::fs::create_dir_all(&journal_dir).expect("dir");
        for from in [first.path(), second.path()] {
            for (_, segment) in segments(&from.join("journal")).expect("segments") {
                let bytes = std::fs::read(&segment).expect("read");
                assert!(
                    records_end(&bytes) < bytes.len(),
                    "no zeros after the records"
                );
                std::fs::copy(
                    &segment,
                    journal_dir.join(segment.file_name().expect("name")),
                )
                .expect("copy");
            }
        }
        let recovered = sled::open(crashed.path()).expect("sled");
        assert_eq!(recover(&recovered, crashed.path()).expect("recover"), 3);
        assert_eq!(
            entries(&recovered.open_tree("table").expect("tree")),
            entries(&tree),
            "the recovered table differs"
        );
        journal.close();
        next.close();
    }

    #[tokio::test]
    async fn records_the_checkpoint_covers_are_not_applied_again() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = sled::open(dir.path()).expect("sled");
        let tree = db.open_tree("table").expect("tree");
        let journal = Journal::start(dir.path(), 0).expect("journal");
        journal
            .begin()
            .expect("begin")
            .insert(&tree, "k", "old")
            .expect("insert");
        let log = File::open(dir.path().join("db")).expect("log");
        let (j, d) = (journal.clone(), db.clone());
        tokio::task::spawn_blocking(move || j.checkpoint(&d, &log))
            .await
            .expect("join")
            .expect("checkpoint");
        assert_eq!(checkpoint_of(&db).expect("checkpoint"), 1);
        assert_eq!(
            segments(&dir.path().join("journal"))
                .expect("segments")
                .len(),
            1
        );
        // Written to sled after the checkpoint but not through the journal (as a later
        // record's effect that sled already holds): recovery must not roll it back.
        tree.insert("k", "new").expect("insert");
        journal.close();
        assert_eq!(recover(&db, dir.path()).expect("recover"), 1);
        assert_eq!(tree.get("k").expect("get").as_deref(), Some(&b"new"[..]));
    }

    /// Polls `future` once; true when it is still pending.
    async fn pending_after_one_poll<F: std::future::Future + Unpin>(future: &mut F) -> bool {
        tokio::select! {
            biased;
            _ = future => false,
            () = std::future::ready(()) => true,
        }
    }

    #[tokio::test]
    async fn a_waiter_cancelled_after_being_handed_the_lead_passes_it_on() {
        // A request handed the lead whose client goes away before it runs again must not
        // leave the requests behind it without a leader: they would wait until the deadline
        // and then break the store.
        let journal = Journal::scratch();
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("table").expect("tree");
        // A commit is running: waits from here on queue behind it.
        journal.queue().expect("queue").leading = true;
        journal
            .begin()
            .expect("begin")
            .insert(&tree, "a", "1")
            .expect("insert");
        let mut cancelled = Box::pin(journal.wait(Duration::from_secs(30)));
        assert!(pending_after_one_poll(&mut cancelled).await);
        journal
            .begin()
            .expect("begin")
            .insert(&tree, "b", "2")
            .expect("insert");
        let mut behind = Box::pin(journal.wait(Duration::from_secs(30)));
        assert!(pending_after_one_poll(&mut behind).await);
        // The running commit ends without covering either record and hands the lead on.
        let first = journal.queue().expect("queue").waiters.pop_front();
        let (_, waiter) = first.expect("the first request waits");
        assert!(waiter.send(Told::Lead).is_ok());
        drop(cancelled);
        tokio::time::timeout(Duration::from_secs(5), behind)
            .await
            .expect("the request behind the cancelled one was left without a leader")
            .expect("durable");
        let queue = journal.queue().expect("queue");
        assert_eq!((queue.durable, queue.assigned), (2, 2));
        assert!(!queue.leading && queue.waiters.is_empty());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_writers_are_all_made_durable_in_groups() {
        let journal = Journal::scratch();
        let db = sled::Config::new().temporary(true).open().expect("sled");
        let tree = db.open_tree("table").expect("tree");
        let writers = (0..16).map(|w| {
            let (journal, tree) = (journal.clone(), tree.clone());
            tokio::spawn(async move {
                for i in 0..50 {
                    journal
                        .begin()
                        .expect("begin")
                        .insert(&tree, format!("{w}-{i}"), "v")
                        .expect("insert");
                    journal
                        .wait(Duration::from_secs(30))
                        .await
                        .expect("durable");
                }
            })
        });
        for writer in writers.collect::<Vec<_>>() {
            writer.await.expect("writer");
        }
        let queue = journal.queue().expect("queue");
        assert_eq!((queue.durable, queue.assigned), (800, 800));
        assert!(!queue.leading && queue.waiters.is_empty());
    }
}
