//! Durable before the answer, with group commit.
//!
//! Every store write is journaled ([`super::journal`]); [`Journaled::commit`] waits until
//! the journal holds every write made before the call, which one `fdatasync` does for all
//! the requests that arrived while the previous one ran. A checkpoint task makes sled itself
//! durable in the background (every [`CHECKPOINT_INTERVAL`] while writes come in, and at
//! close) so the journal stays short and a restart replays little.
//!
//! A store error that sled keeps for good (an I/O error writing its log) surfaces at the
//! next checkpoint; a failed journal write or sync at once. Either way the store is broken
//! ([`Journaled::broken`]) and the issuer stops, to restart on what is on disk. A checkpoint
//! is skipped while the state folder is full or read-only ([`Journaled::watch_volume`]):
//! sled must not meet such a disk, and the journal alone keeps answered writes safe.

use std::fs::File;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

use super::journal::Journal;
use crate::state_volume::StateVolume;
use crate::store::{Durability, StoreFuture};
use crate::Error;

/// How often, while writes come in, sled is made durable and the journal emptied.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(2);

/// A write or checkpoint that takes longer than this is taken as a failed disk.
const FLUSH_DEADLINE: Duration = Duration::from_secs(30);

/// The embedded store's [`Durability`]: commits through the journal, checkpoints sled.
#[derive(Debug, Clone)]
pub struct Journaled {
    journal: Journal,
    owner: Arc<Owner>,
    checkpointer: Checkpointer,
}

/// Dropped with the last handle: stops the checkpoint task, which checkpoints once more,
/// closes the journal and releases the database (and sled's file lock).
#[derive(Debug)]
struct Owner {
    stop: Arc<Notify>,
    volume: Arc<OnceLock<StateVolume>>,
    task: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop.notify_one();
    }
}

impl Journaled {
    /// Applies the journal in `dir` to `db` (whose log file lives in `dir`), then starts
    /// the journal and the checkpoint task. Must run inside a tokio runtime.
    pub fn start(db: sled::Db, dir: &Path) -> Result<Self, Error> {
        Self::start_with_deadline(db, dir, FLUSH_DEADLINE)
    }

    /// [`Journaled::start`] with a deadline other than [`FLUSH_DEADLINE`] (tests).
    pub fn start_with_deadline(
        db: sled::Db,
        dir: &Path,
        deadline: Duration,
    ) -> Result<Self, Error> {
        let last = super::journal::recover(&db, dir)?;
        let journal = Journal::start(dir, last)?;
        let log_path = dir.join("db");
        let log = Arc::new(File::open(&log_path).map_err(Error::io(&log_path))?);
        let owner = Arc::new(Owner {
            stop: Arc::new(Notify::new()),
            volume: Arc::new(OnceLock::new()),
            task: std::sync::Mutex::new(None),
        });
        let checkpointer = Checkpointer {
            db,
            log,
            journal: journal.clone(),
            volume: owner.volume.clone(),
            deadline,
        };
        let task = tokio::spawn(checkpoints(checkpointer.clone(), owner.stop.clone()));
        if let Ok(mut slot) = owner.task.lock() {
            *slot = Some(task);
        }
        Ok(Self {
            journal,
            owner,
            checkpointer,
        })
    }

    /// The journal every write of this store goes through.
    pub(in crate::store) fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Checkpoints only while `volume` takes writes.
    pub fn watch_volume(&self, volume: StateVolume) {
        let _ = self.owner.volume.set(volume);
    }

    /// Waits until every write this task made before calling is on disk. Fails once the
    /// store is broken: nothing is claimed durable after a failed write.
    pub async fn commit(&self) -> Result<(), Error> {
        let (assigned, durable) = self.journal.progress();
        if assigned > durable {
            return self.journal.wait(self.checkpointer.deadline).await;
        }
        // Nothing journaled waits: ask sled whether it can still write (a flush with nothing
        // new costs an atomic load; with a failed write behind it, it returns the error).
        self.checkpointer.probe().await;
        self.journal.wait(self.checkpointer.deadline).await
    }

    /// Resolves once the store is broken, with the error: the store can't be written again
    /// by this process (see [`Journal::broken`]).
    pub async fn broken(&self) -> String {
        let mut rx = self.journal.broken();
        let error = rx
            .wait_for(Option::is_some)
            .await
            .map(|broken| broken.clone().unwrap_or_default());
        match error {
            Ok(error) => error,
            // The journal is gone (shutdown): never "broken" from here on.
            Err(_) => std::future::pending().await,
        }
    }

    /// Checkpoints one last time and stops (shutdown, tests).
    pub async fn close(&self) {
        self.owner.stop.notify_one();
        let task = self.owner.task.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }
}

impl Durability for Journaled {
    fn commit(&self) -> StoreFuture<'_, Result<(), Error>> {
        Box::pin(Journaled::commit(self))
    }

    fn broken(&self) -> StoreFuture<'_, String> {
        Box::pin(Journaled::broken(self))
    }

    fn close(&self) -> StoreFuture<'_, ()> {
        Box::pin(Journaled::close(self))
    }

    fn watch_volume(&self, volume: StateVolume) {
        Journaled::watch_volume(self, volume);
    }
}

/// What the checkpoint task works on.
#[derive(Debug, Clone)]
struct Checkpointer {
    db: sled::Db,
    log: Arc<File>,
    journal: Journal,
    volume: Arc<OnceLock<StateVolume>>,
    deadline: Duration,
}

impl Checkpointer {
    /// Makes sled durable up to the newest write, unless the volume can't take writes now
    /// or the store is broken; a failure breaks the store.
    /// A sled flush bounded by the deadline, run when nothing journaled is left to
    /// checkpoint: it writes nothing, but returns an error sled kept from a failed write.
    async fn probe(&self) {
        if self.journal.broken().borrow().is_some() {
            return;
        }
        let db = self.db.clone();
        let flushed = tokio::task::spawn_blocking(move || db.flush().map(drop));
        let outcome = match tokio::time::timeout(self.deadline, flushed).await {
            Ok(Ok(Ok(()))) => return,
            Ok(Ok(Err(e))) => e.to_string(),
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "a flush of the store did not finish within {} s (is the disk hung?)",
                self.deadline.as_secs()
            ),
        };
        tracing::error!(error = %outcome, "the store holds a write error");
        self.journal.fail(outcome);
    }

    async fn run(&self) -> bool {
        let writable = self.volume.get().is_none_or(|v| v.probe().is_ok());
        if !writable || self.journal.broken().borrow().is_some() {
            return false;
        }
        let (db, log, journal) = (self.db.clone(), self.log.clone(), self.journal.clone());
        let done = tokio::task::spawn_blocking(move || journal.checkpoint(&db, &log));
        let outcome = match tokio::time::timeout(self.deadline, done).await {
            Ok(joined) => joined.unwrap_or_else(|e| Err(e.to_string())),
            Err(_) => Err(format!(
                "a checkpoint of the store did not finish within {} s (is the disk hung?)",
                self.deadline.as_secs()
            )),
        };
        match outcome {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "checkpointing the store failed");
                self.journal.fail(e);
                false
            }
        }
    }
}

/// The checkpoint task: checkpoints while writes come in, and once more when told to stop;
/// then closes the journal.
async fn checkpoints(checkpointer: Checkpointer, stop: Arc<Notify>) {
    let mut checkpointed = checkpointer.journal.progress().0;
    loop {
        let stopping = tokio::select! {
            () = stop.notified() => true,
            () = tokio::time::sleep(CHECKPOINT_INTERVAL) => false,
        };
        let (assigned, _) = checkpointer.journal.progress();
        if assigned > checkpointed {
            if checkpointer.run().await {
                checkpointed = assigned;
            }
        } else {
            checkpointer.probe().await;
        }
        if stopping {
            break;
        }
    }
    checkpointer.journal.close();
}
