//! TPM 2.0 keys (tss-esapi), driven by one owner thread per TPM.
//!
//! A TPM runs one command at a time and a discrete one takes 42–74 ms per P-256 signature
//! (DESIGN §8), so callers never talk to it directly: [`TpmKey::sign`] hashes the message,
//! puts the digest on the TPM's bounded queue and waits for the answer up to a deadline. A
//! full queue answers [`Error::Busy`] at once; a TPM that does not answer in time, or cannot
//! be reached, answers [`Error::Unavailable`] — never a hang. When the connection breaks (the
//! TPM reset, swtpm restarted, the resource manager went away) the owner thread drops the
//! ESAPI context and builds a new one on the next request, reloading each key and checking
//! that its public key is still the one it was opened with.
//!
//! All keys of one TPM (one TCTI) in a process share its owner thread and queue: swtpm and a
//! TPM without a resource manager serve one connection at a time, and the issuer holds its
//! root and issuing keys at once. The queue capacity is set by the first key opened on a TPM;
//! each key keeps its own deadline.
//!
//! The key never leaves the TPM: it is created with fixedTPM, fixedParent and
//! sensitiveDataOrigin under the owner hierarchy's storage primary, and either made
//! persistent at a handle or kept as a blob whose private area only that TPM can decrypt.

mod attestation;
mod blob;
mod device;
mod sealing;

pub use attestation::{CredentialActivation, EndorsementEvidence};
pub use blob::KeyBlob;
pub use sealing::Sealer;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, Weak};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tss_esapi::handles::KeyHandle;
use tss_esapi::Context;

use crate::key_ref::{Tcti, TpmKeyRef, TpmObject};
use crate::{Error, PublicKey, Queue, Signer, TpmOptions};

/// A P-256 key inside a TPM 2.0.
pub struct TpmKey {
    tpm: Arc<Tpm>,
    object: TpmObject,
    public: PublicKey,
    location: String,
    deadline: Duration,
}

/// One TPM as this process sees it: the queue to its owner thread.
struct Tpm {
    name: String,
    requests: Mutex<Option<SyncSender<Job>>>,
    capacity: usize,
    activity: Arc<Activity>,
    stopped: Mutex<Receiver<()>>,
    /// Joined on drop once `stopped` says the thread is done with the TPM.
    owner: Option<JoinHandle<()>>,
    close_wait: Duration,
}

/// Work for the owner thread.
enum Job {
    /// Create or open `object`; answers with its public key.
    Setup {
        setup: Setup,
        object: TpmObject,
        deadline: Instant,
        reply: SyncSender<Result<PublicKey, Error>>,
    },
    /// Sign a digest with `object`, which was set up before.
    Sign {
        object: TpmObject,
        digest: [u8; 32],
        deadline: Instant,
        reply: SyncSender<Result<Vec<u8>, Error>>,
    },
    /// A `TpmKey` for `object` was dropped.
    Release { object: TpmObject },
    /// Commands other than a key's (credential activation), run with the connection. The
    /// work sends its own answer and says whether the connection broke.
    Session {
        work: SessionWork,
        deadline: Instant,
    },
}

/// Work for [`Job::Session`]: given the connection (or why there is none) and the TPM's
/// name, returns true when the connection must be dropped.
type SessionWork = Box<dyn FnOnce(Result<&mut Context, Error>, &str) -> bool + Send>;

/// When the owner thread started the TPM command it is waiting on, if any: a caller that
/// sees one outstanding for longer than its deadline fails at once instead of queueing
/// behind a TPM that has stopped answering.
#[derive(Default)]
struct Activity {
    busy_since: Mutex<Option<Instant>>,
    /// Jobs queued and not yet taken by the owner thread (`issuer status` shows it).
    waiting: AtomicUsize,
}

impl Activity {
    fn begin(&self) -> ActivityGuard<'_> {
        *self
            .busy_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        ActivityGuard(self)
    }

    fn busy_since(&self) -> Option<Instant> {
        *self
            .busy_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

struct ActivityGuard<'a>(&'a Activity);

impl Drop for ActivityGuard<'_> {
    fn drop(&mut self) {
        *self
            .0
            .busy_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = None;
    }
}

#[derive(Clone, Copy, Debug)]
enum Setup {
    Create,
    Open,
}

impl TpmKey {
    /// Creates a new key where `key_ref` says (refusing an occupied handle or an existing
    /// blob file) with default options.
    pub fn create(key_ref: &TpmKeyRef) -> Result<Self, Error> {
        Self::start(key_ref, Setup::Create, TpmOptions::default())
    }

    /// Opens the existing key at `key_ref` with default options.
    pub fn open(key_ref: &TpmKeyRef) -> Result<Self, Error> {
        Self::start(key_ref, Setup::Open, TpmOptions::default())
    }

    /// [`TpmKey::create`] with explicit options.
    pub fn create_with(key_ref: &TpmKeyRef, options: TpmOptions) -> Result<Self, Error> {
        Self::start(key_ref, Setup::Create, options)
    }

    /// [`TpmKey::open`] with explicit options.
    pub fn open_with(key_ref: &TpmKeyRef, options: TpmOptions) -> Result<Self, Error> {
        Self::start(key_ref, Setup::Open, options)
    }

    /// The TPM this key lives in, e.g. `TPM at device:/dev/tpmrm0`.
    pub fn device(&self) -> &str {
        &self.tpm.name
    }

    fn start(key_ref: &TpmKeyRef, setup: Setup, options: TpmOptions) -> Result<Self, Error> {
        let tcti = match &key_ref.tcti {
            Some(tcti) => tcti.clone(),
            None => Tcti::from_env()?,
        };
        let tpm = Tpm::shared(&tcti, options)?;
        let location = match &key_ref.object {
            TpmObject::Persistent(handle) => {
                format!("TPM key at persistent handle {handle:#010x} ({})", tpm.name)
            }
            TpmObject::Blob(path) => format!("TPM key blob {} ({})", path.display(), tpm.name),
        };
        let (reply, answer) = mpsc::sync_channel(1);
        let deadline = Instant::now() + options.deadline;
        tpm.submit(
            Job::Setup {
                setup,
                object: key_ref.object.clone(),
                deadline,
                reply,
            },
            options.deadline,
        )?;
        let public = tpm.answer(&answer, deadline, options.deadline)?;
        Ok(Self {
            tpm,
            object: key_ref.object.clone(),
            public,
            location,
            deadline: options.deadline,
        })
    }
}

impl Signer for TpmKey {
    fn public_key(&self) -> &PublicKey {
        &self.public
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, Error> {
        let deadline = Instant::now() + self.deadline;
        let mut digest = [0u8; 32];
        digest.copy_from_slice(
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message).as_ref(),
        );
        let (reply, answer) = mpsc::sync_channel(1);
        self.tpm.submit(
            Job::Sign {
                object: self.object.clone(),
                digest,
                deadline,
                reply,
            },
            self.deadline,
        )?;
        self.tpm.answer(&answer, deadline, self.deadline)
    }

    fn location(&self) -> String {
        self.location.clone()
    }

    fn queue(&self) -> Option<Queue> {
        Some(Queue {
            waiting: self.tpm.activity.waiting.load(Ordering::Relaxed),
            capacity: self.tpm.capacity,
        })
    }
}

impl Drop for TpmKey {
    fn drop(&mut self) {
        // Best effort: if the queue is full the key stays loaded until the TPM is released.
        if let Some(requests) = self.tpm.sender() {
            let waiting = &self.tpm.activity.waiting;
            waiting.fetch_add(1, Ordering::Relaxed);
            let released = requests.try_send(Job::Release {
                object: self.object.clone(),
            });
            if released.is_err() {
                waiting.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }
}

impl std::fmt::Debug for TpmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TpmKey")
            .field("location", &self.location)
            .field("public", &self.public)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Tpm {
    /// The TPM at `tcti` for this process: the running owner thread if a key of it is open,
    /// else a new one.
    fn shared(tcti: &Tcti, options: TpmOptions) -> Result<Arc<Self>, Error> {
        /// The TPMs with open keys, by TCTI.
        type Registry = Mutex<Vec<(Tcti, Weak<Tpm>)>>;
        static TPMS: OnceLock<Registry> = OnceLock::new();
        let mut tpms = TPMS
            .get_or_init(Mutex::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        tpms.retain(|(_, tpm)| tpm.strong_count() > 0);
        if let Some(tpm) = tpms
            .iter()
            .find(|(known, _)| known == tcti)
            .and_then(|(_, tpm)| tpm.upgrade())
        {
            return Ok(tpm);
        }
        let tpm = Arc::new(Self::start(tcti, options)?);
        tpms.push((tcti.clone(), Arc::downgrade(&tpm)));
        Ok(tpm)
    }

    fn start(tcti: &Tcti, options: TpmOptions) -> Result<Self, Error> {
        let name = device::device_name(tcti);
        let capacity = options.queue_capacity.max(1);
        let (requests, queue) = mpsc::sync_channel(capacity);
        let (stopped_tx, stopped) = mpsc::sync_channel(1);
        let activity = Arc::new(Activity::default());
        let owner = Owner {
            tcti: tcti.clone(),
            name: name.clone(),
            activity: Arc::clone(&activity),
            context: None,
            keys: Vec::new(),
        };
        let owner = thread::Builder::new()
            .name("tpm-owner".into())
            .spawn(move || owner.run(&queue, &stopped_tx))
            .map_err(|e| Error::Unavailable {
                device: name.clone(),
                reason: format!("cannot be served: starting its owner thread failed: {e}"),
            })?;
        Ok(Self {
            name,
            requests: Mutex::new(Some(requests)),
            capacity,
            activity,
            stopped: Mutex::new(stopped),
            owner: Some(owner),
            close_wait: options.deadline,
        })
    }

    fn sender(&self) -> Option<SyncSender<Job>> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn unavailable(&self, reason: String) -> Error {
        Error::Unavailable {
            device: self.name.clone(),
            reason,
        }
    }

    /// Queues a job, or says at once why not.
    fn submit(&self, job: Job, deadline: Duration) -> Result<(), Error> {
        if let Some(since) = self.activity.busy_since() {
            let waited = since.elapsed();
            if waited >= deadline {
                return Err(self.unavailable(format!(
                    "has not answered a command for {}",
                    seconds(waited)
                )));
            }
        }
        let requests = self
            .sender()
            .ok_or_else(|| self.unavailable("is closed".into()))?;
        self.activity.waiting.fetch_add(1, Ordering::Relaxed);
        let sent = requests.try_send(job);
        if sent.is_err() {
            self.activity.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        match sent {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => Err(Error::Busy {
                device: self.name.clone(),
                queued: self.capacity,
            }),
            Err(TrySendError::Disconnected(_)) => {
                Err(self.unavailable("cannot be served: its owner thread stopped".into()))
            }
        }
    }

    /// Runs `work` on the owner thread with the connection, up to `allowed`. `work` must
    /// leave no objects or sessions loaded and the sessions as it found them (password).
    fn session<T: Send + 'static>(
        &self,
        allowed: Duration,
        work: impl FnOnce(&mut Context, &str) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let (reply, answer) = mpsc::sync_channel(1);
        let deadline = Instant::now() + allowed;
        let work: SessionWork = Box::new(move |context, name| {
            let result = context.and_then(|context| work(context, name));
            let broken = matches!(&result, Err(e) if e.is_transient());
            let _ = reply.send(result);
            broken
        });
        self.submit(Job::Session { work, deadline }, allowed)?;
        self.answer(&answer, deadline, allowed)
    }

    /// Waits for the owner thread's answer until `deadline`.
    fn answer<T>(
        &self,
        answer: &Receiver<Result<T, Error>>,
        deadline: Instant,
        allowed: Duration,
    ) -> Result<T, Error> {
        match answer.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                Err(self.unavailable(format!("did not answer within {}", seconds(allowed))))
            }
            Err(RecvTimeoutError::Disconnected) => {
                Err(self.unavailable("cannot be served: its owner thread stopped".into()))
            }
        }
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        // Closing the queue stops the owner thread after its current command; wait (up to a
        // deadline) so the TPM connection is closed when the last key is gone: swtpm serves
        // one connection at a time, and the next user of the TPM may be this same process.
        drop(
            self.requests
                .get_mut()
                .unwrap_or_else(PoisonError::into_inner)
                .take(),
        );
        let stopped = self
            .stopped
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .recv_timeout(self.close_wait);
        // Then join the thread: having said it stopped, it has not yet finished. Its
        // thread-exit destructors still run, libcrypto's among them (libtss2-esys does its
        // cryptography with OpenSSL 3), freeing the thread's OpenSSL state. The last key is typically
        // dropped just before `main` returns, and libc's exit handlers then run libcrypto's
        // `OPENSSL_cleanup`, which frees the same structures: both at once corrupt the heap
        // ("malloc_consolidate(): invalid chunk size", or SIGSEGV in `OPENSSL_sk_num`, at
        // exit of `agent reenroll` under CPU load). Joining waits only for those destructors.
        // A thread that did not stop in time is still inside a TPM command and is left
        // behind rather than hang its caller (DESIGN §3: never a hang).
        match stopped {
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                if let Some(owner) = self.owner.take() {
                    // An owner thread that panicked has nothing left to report here.
                    let _ = owner.join();
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

/// "5 s", "250 ms": deadlines as operators write them.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// A key the owner thread serves.
struct Key {
    object: TpmObject,
    /// The public key it was set up with; a reloaded key must match it.
    public: PublicKey,
    /// Its ESAPI handle in the current context, if loaded.
    handle: Option<KeyHandle>,
    /// Open `TpmKey`s for it.
    users: usize,
}

/// The owner thread's state: the only code that talks to the TPM.
struct Owner {
    tcti: Tcti,
    name: String,
    activity: Arc<Activity>,
    context: Option<Context>,
    keys: Vec<Key>,
}

impl Owner {
    fn run(mut self, queue: &Receiver<Job>, stopped: &SyncSender<()>) {
        while let Ok(job) = queue.recv() {
            self.activity.waiting.fetch_sub(1, Ordering::Relaxed);
            match job {
                Job::Setup {
                    setup,
                    object,
                    deadline,
                    reply,
                } => {
                    if Instant::now() < deadline {
                        let _ = reply.send(self.setup(setup, object));
                    }
                }
                Job::Sign {
                    object,
                    digest,
                    deadline,
                    reply,
                } => {
                    // A job past its deadline has had its answer: "did not answer within".
                    if Instant::now() < deadline {
                        let _ = reply.send(self.sign(&object, &digest, deadline));
                    }
                }
                Job::Release { object } => self.release(&object),
                Job::Session { work, deadline } => {
                    if Instant::now() < deadline {
                        self.unload_blobs();
                        let activity = Arc::clone(&self.activity);
                        let name = self.name.clone();
                        let broken = {
                            let context = self.context();
                            let _busy = activity.begin();
                            work(context, &name)
                        };
                        if broken {
                            self.disconnect();
                        }
                    }
                }
            }
        }
        self.disconnect();
        let _ = stopped.send(());
    }

    fn context(&mut self) -> Result<&mut Context, Error> {
        if let Some(context) = self.context.take() {
            return Ok(self.context.insert(context));
        }
        let _busy = self.activity.begin();
        let context = device::connect(&self.tcti, &self.name)?;
        Ok(self.context.insert(context))
    }

    /// Flushes the blob keys loaded now; each reloads at its next signature. A TPM without a
    /// resource manager (swtpm, a bare /dev/tpm0) holds three transient objects, and session
    /// work (credential activation: the EK and an AK; sealing: the storage key and the
    /// sealed object) needs room next to a process's keys.
    fn unload_blobs(&mut self) {
        let Some(context) = self.context.as_mut() else {
            return;
        };
        for key in &mut self.keys {
            if let (TpmObject::Blob(_), Some(handle)) = (&key.object, key.handle) {
                device::release(context, &key.object, handle);
                key.handle = None;
            }
        }
    }

    /// Drops the ESAPI context (closing the connection); every key reloads on next use.
    fn disconnect(&mut self) {
        for key in &mut self.keys {
            key.handle = None;
        }
        self.context = None;
    }

    fn setup(&mut self, setup: Setup, object: TpmObject) -> Result<PublicKey, Error> {
        if let (Setup::Open, Some(key)) = (setup, self.keys.iter_mut().find(|k| k.object == object))
        {
            key.users += 1;
            return Ok(key.public.clone());
        }
        let activity = Arc::clone(&self.activity);
        let name = self.name.clone();
        let result = self.context().and_then(|context| {
            let _busy = activity.begin();
            match setup {
                Setup::Create => device::create(context, &object, &name),
                Setup::Open => device::open(context, &object, &name),
            }
        });
        match result {
            Ok((handle, public)) => {
                self.keys.push(Key {
                    object,
                    public: public.clone(),
                    handle: Some(handle),
                    users: 1,
                });
                Ok(public)
            }
            Err(e) => {
                if e.is_transient() {
                    self.disconnect();
                }
                Err(e)
            }
        }
    }

    /// Signs; on failure drops the connection, and if the key was loaded before (the TPM may
    /// have restarted since) tries once more on a fresh connection while the deadline allows.
    fn sign(
        &mut self,
        object: &TpmObject,
        digest: &[u8; 32],
        deadline: Instant,
    ) -> Result<Vec<u8>, Error> {
        let was_loaded = self
            .keys
            .iter()
            .any(|k| &k.object == object && k.handle.is_some());
        match self.sign_once(object, digest) {
            Err(_) if was_loaded && Instant::now() < deadline => self.sign_once(object, digest),
            other => other,
        }
    }

    fn sign_once(&mut self, object: &TpmObject, digest: &[u8; 32]) -> Result<Vec<u8>, Error> {
        let activity = Arc::clone(&self.activity);
        let name = self.name.clone();
        let result = self.loaded(object).and_then(|(context, handle)| {
            let _busy = activity.begin();
            device::sign(context, handle, digest, &name)
        });
        if result.is_err() {
            self.disconnect();
        }
        result
    }

    /// The context and the key's handle, connecting and reloading as needed.
    fn loaded(&mut self, object: &TpmObject) -> Result<(&mut Context, KeyHandle), Error> {
        let index = self
            .keys
            .iter()
            .position(|k| &k.object == object)
            .ok_or_else(|| Error::Unavailable {
                device: self.name.clone(),
                reason: "has no such key open".into(),
            })?;
        let activity = Arc::clone(&self.activity);
        let name = self.name.clone();
        self.context()?;
        let Some(context) = self.context.as_mut() else {
            return Err(Error::Unavailable {
                device: name,
                reason: "lost its connection".into(),
            });
        };
        let key = &mut self.keys[index];
        let handle = match key.handle {
            Some(handle) => handle,
            None => {
                let _busy = activity.begin();
                let (handle, public) = device::open(context, &key.object, &name)?;
                if public != key.public {
                    device::release(context, &key.object, handle);
                    return Err(Error::Tpm {
                        device: name,
                        action: "reload the key".into(),
                        reason: "the key found there is not the key this signer was opened \
                                 with; reopen it deliberately if the key was replaced"
                            .into(),
                    });
                }
                *key.handle.insert(handle)
            }
        };
        Ok((context, handle))
    }

    fn release(&mut self, object: &TpmObject) {
        let Some(index) = self.keys.iter().position(|k| &k.object == object) else {
            return;
        };
        let key = &mut self.keys[index];
        key.users = key.users.saturating_sub(1);
        if key.users > 0 {
            return;
        }
        let key = self.keys.swap_remove(index);
        if let (Some(context), Some(handle)) = (self.context.as_mut(), key.handle) {
            let _busy = self.activity.begin();
            device::release(context, &key.object, handle);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadlines_read_as_operators_write_them() {
        assert_eq!(seconds(Duration::from_secs(5)), "5 s");
        assert_eq!(seconds(Duration::from_millis(250)), "250 ms");
        assert_eq!(seconds(Duration::from_millis(1500)), "1500 ms");
    }
}
