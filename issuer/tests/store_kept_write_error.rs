//! A write error that sled keeps (here: the disk filled under its log while records were
//! written) breaks the store even when no flush of ours failed, so the issuer stops and
//! restarts on what is on disk instead of answering 503 forever.

mod support;

use std::time::Duration;

use issuer::store::Journaled;
use support::{fill_until_refused, sled_on, Tmpfs};

#[tokio::test]
async fn a_write_error_sled_keeps_breaks_the_store_without_any_flush_of_ours_failing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let _tmpfs = Tmpfs::mount(dir.path(), "8m");
    let db = sled_on(dir.path());
    let durability = Journaled::start(db.clone(), dir.path()).expect("durability");
    // Records of a certificate's size, and no commit: our flusher is never asked to flush.
    let failed = fill_until_refused(&db, &[0x5a; 2048]);
    // A bound against a hang, not a timing assertion: the idle probe runs every 500 ms.
    let broken = tokio::time::timeout(Duration::from_secs(60), durability.broken())
        .await
        .unwrap_or_else(|_| panic!("the store was not reported broken after {failed}"));
    assert!(!broken.is_empty(), "no error message");
    // Every later commit fails instead of claiming durability.
    assert!(durability.commit().await.is_err());
}
