//! Workload attestation: which process is on the other end of a Workload API connection,
//! from the kernel's word only (DESIGN §5 "Registration entries and workload attestation").
//!
//! At accept the agent takes the peer's credentials from SO_PEERCRED, notes the time since
//! boot, and opens `/proc/<pid>` as a directory, keeping the descriptor. Every later read goes
//! through that descriptor: once the process that connected is gone, the reads fail, even if
//! its pid was handed to a new process meanwhile (procfs ties the directory to the task, not
//! the number). Two more checks close the gaps around that (SPIRE's peer tracker does the
//! same):
//! - a process whose start time is after the accept time is not the one that connected;
//! - after the selectors are computed, the start time and uid are read again through the held
//!   descriptor; any change or failure refuses the caller.
//!
//! Two more against a process that is not what it seems:
//! - exec after connect: the executable's device and inode are noted at accept (through
//!   /proc/<pid>/exe) and must be the same at every request, else the caller is refused. A
//!   process that connects and then execs another binary (keeping the connection in a child
//!   it forked) is not attested as that binary. (An exec between `connect` and the agent's
//!   accept is not seen: the kernel keeps no record of the executable at connect. Entries
//!   must name a user, so only that user's processes could try.)
//! - other namespaces: a process in another mount or user namespace than the agent's gets no
//!   `unix:path` or `unix:sha256` selector, since an unprivileged user there can mount a file
//!   of their own over any path. Its uid and gid (translated by the kernel) still count.
//!
//! Selectors: `unix:uid`, `unix:gid`, `unix:user`, `unix:group` (names from /etc/passwd and
//! /etc/group), `unix:path` (/proc/<pid>/exe) and `unix:sha256` (of the executable, read
//! through /proc/<pid>/exe so a replaced file on disk does not matter; cached by device,
//! inode, mtime and size); `systemd:unit`, `docker:id` and `podman:id` from the cgroup
//! ([`crate::daemon::cgroup`]).

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use proto::Selector;
use rustix::fs::{Mode, OFlags};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::UnixStream;

use crate::daemon::h2_authority::AuthorityRewriter;

/// At most this many executable digests are kept; the cache starts over when full.
const HASH_CACHE_ENTRIES: usize = 1024;

/// Why a caller could not be attested. The workload is told only "permission denied"; the
/// agent logs this.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The kernel gave no pid for the peer (e.g. a socket passed across pid namespaces).
    #[error("the kernel gave no process id for the caller")]
    NoPid,
    /// /proc/<pid> could not be opened at accept: the process was already gone.
    #[error("process {0} was gone when its connection was accepted")]
    GoneAtAccept(i32),
    /// A read through the held /proc/<pid> descriptor failed: the process exited.
    #[error("process {pid} exited: {reason}")]
    Exited {
        /// The pid.
        pid: i32,
        /// What the read said.
        reason: String,
    },
    /// The process started after the connection was accepted: its pid was reused.
    #[error("process {0} started after the connection was accepted (pid reused)")]
    StartedAfterAccept(i32),
    /// The start time or uid changed while the selectors were computed.
    #[error("process {0} changed while it was attested")]
    Changed(i32),
    /// /proc/<pid>/stat did not parse.
    #[error("process {0}: unreadable /proc stat")]
    Stat(i32),
    /// The executable is another than at accept: the process exec'd after it connected.
    #[error("process {0} runs another executable than when it connected (exec after connect); it must connect again")]
    Executed(i32),
}

/// The process at the other end of one Workload API connection.
#[derive(Debug)]
pub struct Peer {
    pid: Option<i32>,
    uid: u32,
    gid: u32,
    /// Clock ticks since boot at accept.
    accepted_at: u64,
    /// `/proc/<pid>`, opened at accept; `Err` if that already failed.
    proc_dir: Result<OwnedFd, Refusal>,
    /// Device and inode of the executable at accept (`None`: not readable).
    exe_at_accept: Option<(u64, u64)>,
}

impl Peer {
    /// The peer of a freshly accepted connection.
    pub fn accepted(stream: &UnixStream) -> Self {
        let accepted_at = boot_ticks();
        match stream.peer_cred() {
            Ok(cred) => Self::new(cred.pid(), cred.uid(), cred.gid(), accepted_at),
            Err(_) => Self {
                pid: None,
                uid: u32::MAX,
                gid: u32::MAX,
                accepted_at,
                proc_dir: Err(Refusal::NoPid),
                exe_at_accept: None,
            },
        }
    }

    /// A peer with the kernel's credentials, accepted at `accepted_at` (ticks since boot).
    pub fn new(pid: Option<i32>, uid: u32, gid: u32, accepted_at: u64) -> Self {
        let proc_dir = match pid {
            Some(pid) if pid > 0 => rustix::fs::open(
                format!("/proc/{pid}"),
                OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|_| Refusal::GoneAtAccept(pid)),
            _ => Err(Refusal::NoPid),
        };
        let exe_at_accept = proc_dir.as_ref().ok().and_then(executable);
        Self {
            pid,
            uid,
            gid,
            accepted_at,
            proc_dir,
            exe_at_accept,
        }
    }

    /// The pid, for logs.
    pub fn pid(&self) -> Option<i32> {
        self.pid
    }

    /// The uid, for logs.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    /// The selectors of the process that connected, or why it can't be attested. Blocks on
    /// /proc reads and, the first time an executable is seen, on hashing it.
    pub fn selectors(&self, hashes: &ExecutableHashes) -> Result<Vec<Selector>, Refusal> {
        let dir = self.proc_dir.as_ref().map_err(Clone::clone)?;
        let pid = self.pid.ok_or(Refusal::NoPid)?;
        let before = ProcessStamp::read(dir, pid)?;
        if before.start_ticks > self.accepted_at {
            return Err(Refusal::StartedAfterAccept(pid));
        }
        if before.euid != self.uid {
            return Err(Refusal::Changed(pid));
        }
        if before.exe != self.exe_at_accept {
            return Err(Refusal::Executed(pid));
        }
        let mut selectors = vec![
            Selector::unix("uid", self.uid),
            Selector::unix("gid", self.gid),
        ];
        if let Some(user) = name_of("/etc/passwd", self.uid) {
            selectors.push(Selector::unix("user", user));
        }
        if let Some(group) = name_of("/etc/group", self.gid) {
            selectors.push(Selector::unix("group", group));
        }
        // A kernel thread or a process whose exe we may not read has no path: it simply
        // matches no entry that needs one. Nor has a process in another namespace.
        if same_namespaces(dir) {
            if let Ok(path) = rustix::fs::readlinkat(dir, "exe", Vec::new()) {
                selectors.push(Selector::unix("path", path.to_string_lossy()));
            }
            if let Some(digest) = hashes.digest(dir) {
                selectors.push(Selector::unix("sha256", digest));
            }
        } else {
            tracing::info!(
                pid,
                "Workload API caller runs in another mount or user namespace than the agent: no unix:path or unix:sha256 selector for it (a user there can mount any file over any path)"
            );
        }
        // The unit and container: a process can't move itself into a root-owned cgroup, so
        // reading the file once between the two stamps is enough.
        if let Ok(text) = read_at(dir, "cgroup") {
            selectors.extend(crate::daemon::cgroup::selectors(&text));
        }
        let after = ProcessStamp::read(dir, pid)?;
        if after != before {
            return Err(Refusal::Changed(pid));
        }
        Ok(selectors)
    }
}

/// What identifies a process across two reads: its start time, effective uid and
/// executable.
#[derive(Debug, PartialEq, Eq)]
struct ProcessStamp {
    start_ticks: u64,
    euid: u32,
    exe: Option<(u64, u64)>,
}

impl ProcessStamp {
    fn read(dir: &OwnedFd, pid: i32) -> Result<Self, Refusal> {
        let exited = |e: std::io::Error| Refusal::Exited {
            pid,
            reason: e.to_string(),
        };
        let stat = read_at(dir, "stat").map_err(exited)?;
        let start_ticks = start_time(&stat).ok_or(Refusal::Stat(pid))?;
        let status = read_at(dir, "status").map_err(exited)?;
        let euid = status
            .lines()
            .find_map(|line| line.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().nth(1))
            .and_then(|id| id.parse().ok())
            .ok_or(Refusal::Stat(pid))?;
        Ok(Self {
            start_ticks,
            euid,
            exe: executable(dir),
        })
    }
}

/// Device and inode of the executable of the process whose /proc directory is `dir`.
fn executable(dir: &OwnedFd) -> Option<(u64, u64)> {
    let stat = rustix::fs::statat(dir, "exe", rustix::fs::AtFlags::empty()).ok()?;
    Some((stat.st_dev, stat.st_ino))
}

/// Whether the process whose /proc directory is `dir` is in the agent's mount and user
/// namespaces; `false` when that can't be read.
fn same_namespaces(dir: &OwnedFd) -> bool {
    let namespace = |dir: &OwnedFd, name: &str| {
        rustix::fs::statat(dir, name, rustix::fs::AtFlags::empty())
            .ok()
            .map(|stat| (stat.st_dev, stat.st_ino))
    };
    let Ok(own) = rustix::fs::open(
        "/proc/self",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    ) else {
        return false;
    };
    ["ns/mnt", "ns/user"].iter().all(|name| {
        let theirs = namespace(dir, name);
        theirs.is_some() && theirs == namespace(&own, name)
    })
}

fn read_at(dir: &OwnedFd, name: &str) -> std::io::Result<String> {
    let fd = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    let mut text = String::new();
    File::from(fd).read_to_string(&mut text)?;
    Ok(text)
}

/// Field 22 of /proc/<pid>/stat (proc(5)): start time in clock ticks since boot. The command
/// name (field 2) may hold spaces and parentheses, so fields are counted after the last `)`.
fn start_time(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    // Field 3 is the first after the name, so field 22 is the 20th.
    after_name.split_whitespace().nth(19)?.parse().ok()
}

/// Now, in clock ticks since boot (CLOCK_BOOTTIME, the clock /proc start times count in).
pub fn boot_ticks() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    let hz = rustix::param::clock_ticks_per_second();
    let seconds = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    seconds.saturating_mul(hz) + nanos.saturating_mul(hz) / 1_000_000_000
}

/// The name for `id` in a passwd(5)/group(5) style file (`name:x:id:…`).
fn name_of(file: &str, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let mut fields = line.split(':');
            let name = fields.next()?;
            let entry_id: u32 = fields.nth(1)?.parse().ok()?;
            (entry_id == id && !name.is_empty()).then(|| name.to_owned())
        })
}

/// SHA-256 digests of executables, keyed by what changes when the file does.
#[derive(Debug, Default)]
pub struct ExecutableHashes {
    digests: Mutex<HashMap<FileStamp, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct FileStamp {
    device: u64,
    inode: u64,
    mtime: (i64, i64),
    size: i64,
}

impl ExecutableHashes {
    /// The hex SHA-256 of the executable of the process whose /proc directory is `dir`.
    fn digest(&self, dir: &OwnedFd) -> Option<String> {
        let fd =
            rustix::fs::openat(dir, "exe", OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()).ok()?;
        let stat = rustix::fs::fstat(fd.as_fd()).ok()?;
        let stamp = FileStamp {
            device: stat.st_dev,
            inode: stat.st_ino,
            mtime: (stat.st_mtime, i64::from(stat.st_mtime_nsec as i32)),
            size: stat.st_size,
        };
        if let Some(digest) = self.lock().get(&stamp) {
            return Some(digest.clone());
        }
        let mut file = File::from(fd);
        let mut hasher = Sha256::new();
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buffer).ok()?;
            if n == 0 {
                break;
            }
            hasher.update(&buffer[..n]);
        }
        let digest = hex::encode(hasher.finalize());
        let mut digests = self.lock();
        if digests.len() >= HASH_CACHE_ENTRIES {
            digests.clear();
        }
        digests.insert(stamp, digest.clone());
        Some(digest)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<FileStamp, String>> {
        // A panic while holding the lock leaves a consistent map (insert or clear).
        self.digests
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A Workload API connection with its attested peer, for tonic's `serve_with_incoming`: the
/// peer is recorded at accept and reaches handlers as a request extension
/// (`Arc<Peer>`). What the client sends passes through an [`AuthorityRewriter`], so gRPC
/// clients that name the socket path as `:authority` are served (see [`crate::daemon::h2_authority`]).
#[derive(Debug)]
pub struct PeerStream {
    inner: UnixStream,
    peer: Arc<Peer>,
    rewriter: AuthorityRewriter,
    /// Rewritten client bytes not yet handed to the server.
    rewritten: Vec<u8>,
    /// How much of `rewritten` has been handed over.
    handed: usize,
}

impl PeerStream {
    /// Records the peer of a freshly accepted connection.
    pub fn accepted(inner: UnixStream) -> Self {
        let peer = Arc::new(Peer::accepted(&inner));
        Self {
            inner,
            peer,
            rewriter: AuthorityRewriter::new(),
            rewritten: Vec::new(),
            handed: 0,
        }
    }
}

impl tonic::transport::server::Connected for PeerStream {
    type ConnectInfo = Arc<Peer>;

    fn connect_info(&self) -> Self::ConnectInfo {
        Arc::clone(&self.peer)
    }
}

impl AsyncRead for PeerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.handed < this.rewritten.len() {
                let n = buf.remaining().min(this.rewritten.len() - this.handed);
                buf.put_slice(&this.rewritten[this.handed..this.handed + n]);
                this.handed += n;
                if this.handed == this.rewritten.len() {
                    this.rewritten.clear();
                    this.handed = 0;
                }
                return Poll::Ready(Ok(()));
            }
            let mut raw = [0u8; 8192];
            let mut raw = ReadBuf::new(&mut raw);
            std::task::ready!(Pin::new(&mut this.inner).poll_read(cx, &mut raw))?;
            if raw.filled().is_empty() {
                return Poll::Ready(Ok(())); // end of stream
            }
            this.rewriter
                .feed(raw.filled(), &mut this.rewritten)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            // Only part of a frame so far: read on.
        }
    }
}

impl AsyncWrite for PeerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_uid_gid() -> (u32, u32) {
        let status = std::fs::read_to_string("/proc/self/status").expect("status");
        let field = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|id| id.parse().ok())
                .expect(name)
        };
        (field("Uid:"), field("Gid:"))
    }

    #[tokio::test]
    async fn own_process_is_attested_over_a_real_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let _client = UnixStream::connect(&path).await.expect("connect");
        let (server_side, _) = listener.accept().await.expect("accept");
        let stream = PeerStream::accepted(server_side);
        let peer = tonic::transport::server::Connected::connect_info(&stream);
        assert_eq!(peer.pid(), Some(std::process::id() as i32));
        let hashes = ExecutableHashes::default();
        let selectors = peer.selectors(&hashes).expect("attested");
        let text: Vec<String> = selectors.iter().map(ToString::to_string).collect();
        let (uid, gid) = own_uid_gid();
        assert!(text.contains(&format!("unix:uid:{uid}")), "{text:?}");
        assert!(text.contains(&format!("unix:gid:{gid}")), "{text:?}");
        let exe = std::env::current_exe().expect("exe");
        assert!(
            text.contains(&format!("unix:path:{}", exe.display())),
            "{text:?}"
        );
        let own_digest = hex::encode(Sha256::digest(std::fs::read(&exe).expect("read exe")));
        assert!(
            text.contains(&format!("unix:sha256:{own_digest}")),
            "{text:?}"
        );
        if let Some(user) = name_of("/etc/passwd", uid) {
            assert!(text.contains(&format!("unix:user:{user}")), "{text:?}");
        }
        // Every selector the agent produces parses as an entry selector would.
        for selector in &text {
            Selector::new(selector).expect(selector);
        }
        // The second time the digest comes from the cache, and is the same.
        assert_eq!(peer.selectors(&hashes).expect("again"), selectors);
    }

    #[test]
    fn a_process_that_exited_is_refused_even_with_its_directory_held() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let (uid, gid) = own_uid_gid();
        let peer = Peer::new(Some(child.id() as i32), uid, gid, boot_ticks());
        assert!(peer.selectors(&ExecutableHashes::default()).is_ok());
        child.kill().expect("kill");
        child.wait().expect("reap");
        let refusal = peer
            .selectors(&ExecutableHashes::default())
            .expect_err("gone");
        assert!(matches!(refusal, Refusal::Exited { .. }), "{refusal}");
        // And a pid that no longer exists can't even be opened.
        let late = Peer::new(Some(child.id() as i32), uid, gid, boot_ticks());
        assert!(late.selectors(&ExecutableHashes::default()).is_err());
    }

    #[test]
    fn a_process_younger_than_the_connection_is_refused() {
        let (uid, gid) = own_uid_gid();
        // Accepted "at boot": this process started after that, so it can't have connected.
        let peer = Peer::new(Some(std::process::id() as i32), uid, gid, 0);
        assert_eq!(
            peer.selectors(&ExecutableHashes::default()),
            Err(Refusal::StartedAfterAccept(std::process::id() as i32))
        );
    }

    #[test]
    fn a_uid_other_than_the_kernels_is_refused() {
        let (uid, gid) = own_uid_gid();
        let peer = Peer::new(
            Some(std::process::id() as i32),
            uid.wrapping_add(1),
            gid,
            boot_ticks(),
        );
        assert!(peer.selectors(&ExecutableHashes::default()).is_err());
    }

    /// Waits until `pid` runs an executable whose path ends with `name`.
    fn wait_for_exe(pid: u32, name: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while !std::fs::read_link(format!("/proc/{pid}/exe"))
            .is_ok_and(|exe| exe.to_string_lossy().ends_with(name))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "{pid} never ran {name}"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }

    #[test]
    fn a_process_that_execs_after_it_connected_is_refused() {
        use std::io::Write as _;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "read go; exec sleep 30"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let pid = child.id();
        wait_for_exe(pid, "sh");
        let (uid, gid) = own_uid_gid();
        let peer = Peer::new(Some(pid as i32), uid, gid, boot_ticks());
        let hashes = ExecutableHashes::default();
        assert!(peer.selectors(&hashes).is_ok(), "the shell that connected");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(b"go\n")
            .expect("write");
        wait_for_exe(pid, "sleep");
        assert_eq!(peer.selectors(&hashes), Err(Refusal::Executed(pid as i32)));
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn a_process_in_another_mount_and_user_namespace_gets_no_path_or_digest() {
        // Unprivileged user namespaces may be off; then there is nothing to compare.
        let Ok(mut child) = std::process::Command::new("unshare")
            .args(["-Urm", "sleep", "30"])
            .spawn()
        else {
            return;
        };
        let pid = child.id();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let own = std::fs::read_link("/proc/self/ns/mnt").expect("own mnt ns");
        loop {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
            let ns = std::fs::read_link(format!("/proc/{pid}/ns/mnt"));
            if exe.is_ok_and(|e| e.to_string_lossy().ends_with("sleep"))
                && ns.is_ok_and(|ns| ns != own)
            {
                break;
            }
            if child.try_wait().expect("wait").is_some() || std::time::Instant::now() > deadline {
                eprintln!("unshare -Urm does not work here: nothing to test");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let id = |name: &str| -> u32 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|ids| ids.split_whitespace().nth(1))
                .and_then(|id| id.parse().ok())
                .expect(name)
        };
        let peer = Peer::new(Some(pid as i32), id("Uid:"), id("Gid:"), boot_ticks());
        let selectors = peer
            .selectors(&ExecutableHashes::default())
            .expect("attested");
        let text: Vec<String> = selectors.iter().map(ToString::to_string).collect();
        assert!(text.iter().any(|s| s.starts_with("unix:uid:")), "{text:?}");
        assert!(
            !text
                .iter()
                .any(|s| s.starts_with("unix:path:") || s.starts_with("unix:sha256:")),
            "{text:?}"
        );
        let _ = child.kill();
        let _ = child.wait();
    }

    #[test]
    fn start_time_is_field_22_even_with_parentheses_in_the_name() {
        let stat = "42 (a) b) c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(start_time(stat), Some(987654));
        assert_eq!(start_time("42 (x) S 1"), None);
        assert_eq!(start_time("garbage"), None);
    }

    #[test]
    fn names_come_from_passwd_style_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("passwd");
        std::fs::write(
            &file,
            "# comment\nroot:x:0:0:root:/root:/bin/sh\nhistorian:x:1000:1000::/home/h:/bin/sh\n",
        )
        .expect("write");
        let file = file.to_string_lossy().into_owned();
        assert_eq!(name_of(&file, 1000).as_deref(), Some("historian"));
        assert_eq!(name_of(&file, 0).as_deref(), Some("root"));
        assert_eq!(name_of(&file, 7), None);
    }
}
