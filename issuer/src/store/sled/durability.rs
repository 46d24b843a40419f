//! Group commit with a real fsync barrier.
//!
//! sled's `flush()` writes its log with `sync_file_range` on Linux, which neither flushes the
//! drive's cache nor the file's metadata (its new length). So after each flush we
//! `fdatasync` the log file ourselves. One flusher covers every write made before it started:
//! requests that arrive while a flush runs share the next one, so the barrier's cost
//! (~0.2 ms) is paid per batch, not per certificate (DESIGN §3 "Durability").
//!
//! A store error that sled keeps for good (an I/O error writing its log, corruption) can
//! surface on any write, not only on our flush: sled remembers the first such error and
//! fails every later operation with it. So while idle the flusher asks sled every
//! [`HEALTH_PROBE`] whether it holds such an error (a flush with nothing new to write costs an
//! atomic load; with a failed write behind it, it returns the kept error), and reports the
//! store broken either way, which stops the issuer so that it restarts on what is on disk.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

use crate::Error;

/// How often an idle flusher checks whether sled holds an error from a failed write.
pub const HEALTH_PROBE: Duration = Duration::from_millis(500);

/// A flush that takes longer than this is taken as a failed disk.
const FLUSH_DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Default)]
struct Flushed {
    /// Every ticket up to here is on disk.
    durable: u64,
    /// The newest failed batch: tickets in (durable, failed_upto] got this error.
    failed_upto: u64,
    error: Option<String>,
    /// A flush failed, or the idle probe found an error sled kept from a failed write: sled
    /// fails every later write with it, and after a
    /// failed fsync the kernel may have dropped the dirty pages, so nothing written since
    /// the last good flush can be trusted (PostgreSQL's "fsyncgate" lesson). Only a restart
    /// on what is on disk recovers.
    broken: bool,
}

/// Flushes sled's log (then `fdatasync`s it, given `log`) on a blocking thread, bounded by
/// `deadline` ([`FLUSH_DEADLINE`]): sled waits without a timeout for a log buffer whose write failed
/// inside it, and a flush that never returns would hang every request behind it.
async fn flush(db: &sled::Db, log: Option<&Arc<File>>, deadline: Duration) -> Result<(), String> {
    let (db, log) = (db.clone(), log.cloned());
    let flushed = tokio::task::spawn_blocking(move || {
        db.flush().map_err(|e| e.to_string())?;
        match log {
            Some(log) => log.sync_data().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    });
    match tokio::time::timeout(deadline, flushed).await {
        Ok(joined) => joined.unwrap_or_else(|e| Err(e.to_string())),
        Err(_) => Err(format!(
            "a flush of the store did not finish within {} s (is the disk hung?)",
            deadline.as_secs()
        )),
    }
}

impl Flushed {
    /// Tickets up to `upto` failed with `error`, and the store is broken for good.
    fn fail(&mut self, upto: u64, error: String) {
        self.failed_upto = self.failed_upto.max(upto);
        self.error = Some(error);
        self.broken = true;
    }
}

/// Hands out tickets for writes and resolves them once a flush covers them.
#[derive(Debug, Clone)]
pub struct Durability {
    inner: Arc<Inner>,
    owner: Arc<Owner>,
}

#[derive(Debug)]
struct Inner {
    written: AtomicU64,
    kick: Notify,
    state: watch::Sender<Flushed>,
    closed: AtomicBool,
}

/// Dropped with the last `Durability` handle: tells the flusher to flush once more and stop,
/// releasing its handle on the database (and sled's file lock).
#[derive(Debug)]
struct Owner {
    inner: Arc<Inner>,
    flusher: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Owner {
    fn stop(&self) {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.kick.notify_one();
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Durability {
    /// Starts the flusher for `db`, whose log file lives in `dir`.
    pub fn start(db: sled::Db, dir: &Path) -> Result<Self, Error> {
        Self::start_with_deadline(db, dir, FLUSH_DEADLINE)
    }

    /// [`Durability::start`] with a deadline other than [`FLUSH_DEADLINE`] (tests).
    pub fn start_with_deadline(
        db: sled::Db,
        dir: &Path,
        flush_deadline: Duration,
    ) -> Result<Self, Error> {
        let log_path = dir.join("db");
        let log = File::open(&log_path).map_err(Error::io(&log_path))?;
        // Make the store's files themselves durable once (their directory entries).
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io(dir))?;
        let (state, _) = watch::channel(Flushed::default());
        let inner = Arc::new(Inner {
            written: AtomicU64::new(0),
            kick: Notify::new(),
            state,
            closed: AtomicBool::new(false),
        });
        let log = Arc::new(log);
        let flusher = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let kicked = tokio::time::timeout(HEALTH_PROBE, flusher.kick.notified()).await;
                if flusher.closed.load(Ordering::Acquire) {
                    let _ = flush(&db, None, flush_deadline).await;
                    return;
                }
                if kicked.is_err() {
                    // Idle: nothing of ours waits, but a write may have failed inside sled.
                    if flusher.state.borrow().broken {
                        continue;
                    }
                    if let Err(e) = flush(&db, None, flush_deadline).await {
                        tracing::error!(error = %e, "the store holds a write error");
                        let written = flusher.written.load(Ordering::Acquire);
                        flusher.state.send_modify(|s| s.fail(written, e));
                    }
                    continue;
                }
                loop {
                    let target = flusher.written.load(Ordering::Acquire);
                    if target <= flusher.state.borrow().durable {
                        break;
                    }
                    let outcome = flush(&db, Some(&log), flush_deadline).await;
                    flusher.state.send_modify(|s| match outcome {
                        Ok(()) => s.durable = target,
                        Err(e) => {
                            tracing::error!(error = %e, "store flush failed");
                            s.fail(target, e);
                        }
                    });
                    if flusher.state.borrow().failed_upto >= target {
                        // Don't spin on a failing disk; the next write kicks again.
                        break;
                    }
                }
            }
        });
        Ok(Self {
            owner: Arc::new(Owner {
                inner: inner.clone(),
                flusher: std::sync::Mutex::new(Some(task)),
            }),
            inner,
        })
    }

    /// Flushes one last time and waits for the flusher to stop (shutdown, tests).
    pub async fn close(&self) {
        self.owner.stop();
        let task = self.owner.flusher.lock().ok().and_then(|mut t| t.take());
        if let Some(task) = task {
            let _ = task.await;
        }
    }

    /// Resolves once a flush has failed, with the error: the store can't be written again
    /// by this process (see [`Flushed::broken`]).
    pub async fn broken(&self) -> String {
        let mut rx = self.inner.state.subscribe();
        let error = rx
            .wait_for(|s| s.broken)
            .await
            .map(|state| state.error.clone().unwrap_or_default());
        match error {
            Ok(error) => error,
            // The flusher is gone (shutdown): never "broken" from here on.
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits until every write this task made before calling is on disk.
    pub async fn commit(&self) -> Result<(), Error> {
        let mut rx = self.inner.state.subscribe();
        let ticket = self.inner.written.fetch_add(1, Ordering::AcqRel) + 1;
        self.inner.kick.notify_one();
        let result = rx
            .wait_for(|s| s.durable >= ticket || s.failed_upto >= ticket)
            .await
            .map_err(|_| Error::Store("the store flusher stopped".into()))?;
        if result.durable >= ticket {
            Ok(())
        } else {
            Err(Error::Store(format!(
                "writing to disk failed: {}",
                result.error.clone().unwrap_or_default()
            )))
        }
    }
}
