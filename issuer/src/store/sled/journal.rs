//! The store's write-ahead journal: how one fsync commits many requests.
//!
//! Every write to the store is applied to sled in memory and, in the same step, appended to
//! the journal as one record: the keys and values it wrote, in the order it wrote them.
//! Writes are serialised ([`Journal::begin`] holds a lock while a write applies), so journal
//! order is the order sled saw. One committer thread appends the records of every request
//! that arrived while it was busy and makes them durable with one `fdatasync` (group
//! commit); a request is answered only once its record is on disk ([`Journal::wait`]).
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

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
/// The longest a group commit waits for writes announced as coming ([`Journal::incoming`]).
const GATHER: Duration = Duration::from_micros(500);

/// Where durability stands. Receivers are notified only when the store breaks: a waiting
/// request is told of its own record by the committer ([`Queue::waiters`]), so a commit wakes
/// exactly the requests it made durable, and nothing else (the serve loop watching for a
/// broken store would otherwise wake at every commit).
#[derive(Debug, Clone, Default)]
pub struct Flushed {
    /// Every record up to here is on disk.
    pub durable: u64,
    /// Set once a write or fsync of the journal (or a checkpoint of sled) failed: after a
    /// failed fsync the kernel may have dropped the dirty pages, so nothing written since
    /// the last good one can be trusted (PostgreSQL's "fsyncgate" lesson), and sled keeps a
    /// failed write's error for good. Only a restart on what is on disk recovers.
    pub broken: Option<String>,
}

/// The journal: hands out record numbers, queues records for the committer thread, and
/// tells waiters when their record is on disk.
#[derive(Debug, Clone)]
pub struct Journal {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    /// Serialises writers: held while a write applies to sled and until its record is queued.
    order: Mutex<()>,
    queue: Mutex<Queue>,
    wake: Condvar,
    state: watch::Sender<Flushed>,
    dir: PathBuf,
    /// Writes announced and not yet queued ([`Incoming`]).
    incoming: AtomicUsize,
}

/// A write on its way (a certificate being signed): while any is, a group commit waits up
/// to [`GATHER`] for it, so one `fdatasync` covers it too instead of the next one. A lone
/// request never waits: by the time it asks for its commit, its own announcement is gone.
#[derive(Debug)]
pub struct Incoming(Arc<Shared>);

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.0.incoming.fetch_sub(1, Ordering::AcqRel) == 1 {
            // Under the queue's lock, so a committer about to wait can't miss it.
            drop(self.0.queue.lock());
            self.0.wake.notify_one();
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    /// The newest record number handed out.
    assigned: u64,
    /// Records not yet taken by the committer.
    pending: Vec<u8>,
    /// Some waiter needs every record up to here on disk.
    sync_upto: u64,
    /// Every record up to here is on disk (as [`Flushed::durable`]).
    durable: u64,
    /// Requests waiting for their record, with the record number each needs on disk.
    waiters: Vec<(u64, Waiter)>,
    rotation: Option<Rotation>,
    closed: bool,
    broken: bool,
}

/// Told once whether a waiting request's record is on disk, or why it never will be.
type Waiter = oneshot::Sender<Result<(), String>>;

/// A checkpoint's request for a new segment: `before` (records up to `upto`) goes to the
/// old segment, everything later to the new one.
#[derive(Debug)]
struct Rotation {
    before: Vec<u8>,
    upto: u64,
    done: std::sync::mpsc::Sender<Result<(), String>>,
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
        drop(queue);
        self.shared.wake.notify_one();
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
    /// Starts the committer thread on a new segment after record `last` ([`recover`]'s
    /// answer).
    pub fn start(store_dir: &Path, last: u64) -> Result<Self, Error> {
        let dir = store_dir.join("journal");
        std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
        let path = segment_path(&dir, last + 1);
        let segment = Segment::create(&path).map_err(Error::io(&path))?;
        sync_dir(&dir)?;
        let (state, _) = watch::channel(Flushed {
            durable: last,
            broken: None,
        });
        let shared = Arc::new(Shared {
            order: Mutex::new(()),
            queue: Mutex::new(Queue {
                assigned: last,
                sync_upto: last,
                durable: last,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            state,
            dir,
            incoming: AtomicUsize::new(0),
        });
        let committer = shared.clone();
        std::thread::Builder::new()
            .name("store-journal".into())
            .spawn(move || committer.commit_loop(segment, last))
            .map_err(|e| Error::Store(format!("cannot start the journal's committer: {e}")))?;
        Ok(Self { shared })
    }

    /// A journal in a folder of its own that outlives the test (unit tests of one table).
    #[cfg(test)]
    pub fn scratch() -> Self {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        Self::start(&dir, 0).expect("journal")
    }

    /// Announces a write about to be made; drop the answer once it is made (or given up).
    pub fn incoming(&self) -> Incoming {
        self.shared.incoming.fetch_add(1, Ordering::AcqRel);
        Incoming(self.shared.clone())
    }

    /// Begins a write; every other writer waits until it is dropped.
    pub fn begin(&self) -> Result<Write<'_>, Error> {
        let order = self
            .shared
            .order
            .lock()
            .map_err(|_| Error::Store("the store's write lock is poisoned".into()))?;
        if let Some(error) = &self.shared.state.borrow().broken {
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
        let told = {
            let mut queue = self.queue()?;
            if queue.broken {
                return Err(Error::Store(format!(
                    "writing to disk failed: {}",
                    self.shared
                        .state
                        .borrow()
                        .broken
                        .clone()
                        .unwrap_or_default()
                )));
            }
            let target = queue.assigned;
            if queue.durable >= target {
                return Ok(());
            }
            queue.sync_upto = queue.sync_upto.max(target);
            let (waiter, told) = oneshot::channel();
            queue.waiters.push((target, waiter));
            told
        };
        self.shared.wake.notify_one();
        match tokio::time::timeout(deadline, told).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(Error::Store(format!("writing to disk failed: {error}"))),
            Ok(Err(_)) => Err(Error::Store("the store's journal stopped".into())),
            Err(_) => {
                let error = format!(
                    "a write to the store did not reach the disk within {} s (is the disk hung?)",
                    deadline.as_secs()
                );
                self.fail(error.clone());
                Err(Error::Store(error))
            }
        }
    }

    /// Marks the store broken with `error` (see [`Flushed::broken`]).
    pub fn fail(&self, error: String) {
        self.shared.fail(error);
    }

    /// A receiver of the durability state.
    pub fn state(&self) -> watch::Receiver<Flushed> {
        self.shared.state.subscribe()
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
        let (done, finished) = std::sync::mpsc::channel();
        let upto = {
            // Under the write lock every record up to `upto` is applied and none after it:
            // the checkpoint key lands in sled's log after all of them.
            let _order = self
                .shared
                .order
                .lock()
                .map_err(|_| "write lock poisoned")?;
            let mut queue = self.queue().map_err(|e| e.to_string())?;
            let upto = queue.assigned;
            db.open_tree(CHECKPOINT_TREE)
                .and_then(|t| t.insert(CHECKPOINT_KEY, &upto.to_be_bytes()))
                .map_err(|e| e.to_string())?;
            let before = std::mem::take(&mut queue.pending);
            queue.rotation = Some(Rotation { before, upto, done });
            upto
        };
        self.shared.wake.notify_one();
        finished
            .recv()
            .map_err(|_| "the journal's committer stopped".to_owned())??;
        flush_sled(db, log)?;
        let current = segment_path(&self.shared.dir, upto + 1);
        for (_, path) in segments(&self.shared.dir).map_err(|e| e.to_string())? {
            if path != current {
                std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            }
        }
        Ok(())
    }

    /// Writes and syncs what is queued, then stops the committer.
    pub fn close(&self) {
        if let Ok(mut queue) = self.shared.queue.lock() {
            queue.closed = true;
        }
        self.shared.wake.notify_one();
    }
}

/// The segment the committer writes: records in place, into space zero-filled ahead.
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
        self.state.send_modify(|s| {
            s.broken.get_or_insert(error);
        });
        if let Ok(mut queue) = self.queue.lock() {
            queue.broken = true;
            let error = self.state.borrow().broken.clone().unwrap_or_default();
            for (_, waiter) in queue.waiters.drain(..) {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        self.wake.notify_one();
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
        // Without notifying: see [`Flushed`].
        self.state.send_if_modified(|s| {
            s.durable = s.durable.max(synced);
            false
        });
        // Waiters queue in record order, so the durable ones are a prefix.
        let done = queue
            .waiters
            .partition_point(|(target, _)| *target <= synced);
        for (_, waiter) in queue.waiters.drain(..done) {
            let _ = waiter.send(Ok(()));
        }
    }

    /// A write sled refused: it keeps such an error for good, so the store is broken.
    fn broke(&self, error: sled::Error) -> Error {
        let error = Error::from(error);
        self.fail(error.to_string());
        error
    }

    /// The committer: takes every queued record, appends them, and syncs once for all the
    /// waiters among them. Records nobody waits for (refusals' audit records) are written
    /// but synced only with the next record someone waits for.
    fn commit_loop(&self, mut segment: Segment, last: u64) {
        let (mut written, mut synced) = (last, last);
        loop {
            let Ok(mut queue) = self.queue.lock() else {
                return;
            };
            while !(queue.closed
                || queue.rotation.is_some()
                || (!queue.broken && (!queue.pending.is_empty() || queue.sync_upto > synced)))
            {
                queue = match self.wake.wait(queue) {
                    Ok(queue) => queue,
                    Err(_) => return,
                };
            }
            // Group commit: a sync is wanted and other writes are on their way; gather them
            // into this sync, for at most GATHER.
            if queue.sync_upto > synced && !queue.closed && queue.rotation.is_none() {
                let until = Instant::now() + GATHER;
                while self.incoming.load(Ordering::Acquire) > 0 {
                    let Some(left) = until.checked_duration_since(Instant::now()) else {
                        break;
                    };
                    queue = match self.wake.wait_timeout(queue, left) {
                        Ok((queue, _)) => queue,
                        Err(_) => return,
                    };
                }
            }
            let bytes = std::mem::take(&mut queue.pending);
            let upto = queue.assigned;
            let rotation = queue.rotation.take();
            let want_sync = queue.sync_upto;
            let (closed, broken) = (queue.closed, queue.broken);
            drop(queue);
            if broken {
                if let Some(rotation) = rotation {
                    let _ = rotation.done.send(Err("the store is broken".into()));
                }
                if closed {
                    return;
                }
                continue;
            }
            let mut step = || -> Result<(), String> {
                if let Some(rotation) = &rotation {
                    segment
                        .append(&rotation.before)
                        .and_then(|()| segment.file.sync_data())
                        .map_err(|e| format!("writing the store's journal: {e}"))?;
                    (written, synced) = (rotation.upto, rotation.upto);
                    let path = segment_path(&self.dir, rotation.upto + 1);
                    segment = Segment::create(&path)
                        .map_err(|e| format!("opening {}: {e}", path.display()))?;
                    File::open(&self.dir)
                        .and_then(|d| d.sync_all())
                        .map_err(|e| format!("syncing {}: {e}", self.dir.display()))?;
                }
                if !bytes.is_empty() {
                    segment
                        .append(&bytes)
                        .map_err(|e| format!("writing the store's journal: {e}"))?;
                    written = upto;
                }
                if (want_sync > synced || closed) && written > synced {
                    segment
                        .file
                        .sync_data()
                        .map_err(|e| format!("syncing the store's journal: {e}"))?;
                    synced = written;
                }
                Ok(())
            };
            let outcome = step();
            match &outcome {
                Ok(()) => self.made_durable(synced),
                Err(e) => {
                    tracing::error!(error = %e, "the store's journal failed");
                    self.fail(e.clone());
                }
            }
            if let Some(rotation) = rotation {
                let _ = rotation.done.send(outcome);
            }
            if closed {
                // Everything queued is on disk; a request still waiting wrote after the
                // close, and hears that the journal stopped.
                if let Ok(mut queue) = self.queue.lock() {
                    queue.waiters.clear();
                }
                return;
            }
        }
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
}
