//! A flush that sled never returns (it waits without a timeout for a log buffer whose write
//! failed inside it) breaks the store after the flush deadline instead of hanging every
//! commit behind it.

mod support;

use std::time::Duration;

use issuer::store::Journaled;
use support::{fill_until_refused, sled_on, Tmpfs};

#[test]
fn a_flush_stuck_on_a_failed_write_breaks_the_store_instead_of_hanging_commits() {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let dir = tempfile::tempdir().expect("tempdir");
        let _tmpfs = Tmpfs::mount(dir.path(), "8m");
        let db = sled_on(dir.path());
        let durability =
            Journaled::start_with_deadline(db.clone(), dir.path(), Duration::from_secs(2))
                .expect("durability");
        // Values this large go to sled's blob files; a blob write that fails on a full disk
        // leaves a log buffer that sled's flush then waits for without end.
        let failed = fill_until_refused(&db, &[0x5a; 256 * 1024]);
        let committed = tokio::time::timeout(Duration::from_secs(60), durability.commit())
            .await
            .unwrap_or_else(|_| panic!("a commit hung after {failed}"));
        let refused = committed.expect_err("a commit claimed durability on a full disk");
        assert!(
            refused.to_string().contains("writing to disk failed"),
            "{refused}"
        );
        assert!(!durability.broken().await.is_empty());
    });
    // sled's flush thread stays stuck; don't wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
}
