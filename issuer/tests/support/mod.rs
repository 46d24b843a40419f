//! What the store fault tests share. Each of them is a test binary of its own: sled guards
//! every database of a process with one global lock, and a flush that sled never returns
//! holds it, so a test that leaves one behind must not share its process with others.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted over a folder for a test, lazily unmounted when dropped.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn mount(path: &Path, size: &str) -> Self {
        assert!(
            rustix::process::geteuid().is_root(),
            "this test mounts a tmpfs and must run as root (as CI does)"
        );
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount");
        assert!(status.success(), "mount -t tmpfs failed");
        Self(path.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// sled on `dir` as the issuer opens it: no periodic flush of its own.
pub fn sled_on(dir: &Path) -> sled::Db {
    sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .open()
        .expect("sled")
}

/// Inserts `value` under new keys until sled refuses; returns its error.
pub fn fill_until_refused(db: &sled::Db, value: &[u8]) -> sled::Error {
    let tree = db.open_tree("fill").expect("tree");
    (0u32..1_000_000)
        .find_map(|i| tree.insert(i.to_be_bytes(), value).err())
        .expect("the tmpfs never filled up")
}
