//! Connections accepted but not yet admitted (a PLC proxy peer in its TLS handshake, a
//! metrics client that has not sent its request), bounded without letting silent clients
//! keep real ones out.
//!
//! Each such connection is in a table with its source address and age. At the table's limit,
//! or at the per-source limit, a new connection sheds the oldest one (of that source, or of
//! all): a real client's handshake or request takes milliseconds, so it is the youngest and
//! the last to go, while a connection that never speaks is the oldest and the first. A
//! source that floods connections sheds its own before it reaches anyone else's, as long as
//! the per-source limit is below the table's.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::Notify;

#[derive(Debug)]
struct Waiting {
    source: IpAddr,
    shed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// By id, which is also age order.
    waiting: BTreeMap<u64, Waiting>,
}

/// The pending connections of one listener.
#[derive(Debug, Clone)]
pub struct PendingConnections {
    table: Arc<Mutex<Table>>,
    limit: usize,
    per_source: usize,
}

/// One pending connection's place; dropping it (admitted, or given up) frees the place.
#[derive(Debug)]
pub struct Pending {
    id: u64,
    table: Arc<Mutex<Table>>,
    shed: Arc<Notify>,
}

impl PendingConnections {
    /// A table of at most `limit` pending connections, at most `per_source` of them from one
    /// IP address.
    pub fn new(limit: usize, per_source: usize) -> Self {
        Self {
            table: Arc::default(),
            limit: limit.max(1),
            per_source: per_source.clamp(1, limit.max(1)),
        }
    }

    /// A place for a connection just accepted from `source`, and whether another pending
    /// connection was shed to make room (it learns so from [`Pending::shed`]).
    pub fn admit(&self, source: IpAddr) -> (Pending, bool) {
        let mut table = lock(&self.table);
        let from_source = table
            .waiting
            .iter()
            .filter(|(_, w)| w.source == source)
            .map(|(id, _)| *id);
        let victim = if from_source.clone().count() >= self.per_source {
            from_source.min()
        } else if table.waiting.len() >= self.limit {
            table.waiting.keys().next().copied()
        } else {
            None
        };
        let shed = victim
            .and_then(|id| table.waiting.remove(&id))
            .map(|w| w.shed.notify_one())
            .is_some();
        let id = table.next_id;
        table.next_id += 1;
        let notify = Arc::new(Notify::new());
        table.waiting.insert(
            id,
            Waiting {
                source,
                shed: Arc::clone(&notify),
            },
        );
        (
            Pending {
                id,
                table: Arc::clone(&self.table),
                shed: notify,
            },
            shed,
        )
    }

    /// Connections pending now.
    pub fn len(&self) -> usize {
        lock(&self.table).waiting.len()
    }

    /// Whether none is pending.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Pending {
    /// Resolves once a newer connection took this one's place.
    pub async fn shed(&self) {
        // `notify_one` stores a permit, so a shedding before this call is not missed.
        self.shed.notified().await;
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        lock(&self.table).waiting.remove(&self.id);
    }
}

fn lock(table: &Mutex<Table>) -> MutexGuard<'_, Table> {
    // Every change is one insert or remove: a panic elsewhere leaves the map consistent.
    table.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("ip")
    }

    async fn is_shed(pending: &Pending) -> bool {
        tokio::time::timeout(Duration::from_millis(50), pending.shed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_flooding_source_sheds_its_own_oldest_and_nobody_elses() {
        let table = PendingConnections::new(4, 2);
        let (honest, shed) = table.admit(ip("10.0.0.1"));
        assert!(!shed);
        let (first, _) = table.admit(ip("10.0.0.9"));
        let (second, _) = table.admit(ip("10.0.0.9"));
        let (third, shed) = table.admit(ip("10.0.0.9"));
        assert!(shed, "the source's third sheds its first");
        assert!(is_shed(&first).await);
        assert!(!is_shed(&second).await && !is_shed(&third).await);
        assert!(!is_shed(&honest).await, "another source's connection stays");
        assert_eq!(table.len(), 3);
    }

    #[tokio::test]
    async fn at_the_limit_the_oldest_of_all_is_shed_and_a_dropped_place_is_freed() {
        let table = PendingConnections::new(2, 2);
        let (oldest, _) = table.admit(ip("10.0.0.1"));
        let (younger, _) = table.admit(ip("10.0.0.2"));
        let (newest, shed) = table.admit(ip("10.0.0.3"));
        assert!(shed);
        assert!(is_shed(&oldest).await);
        assert!(!is_shed(&younger).await);
        drop(younger);
        let (_fourth, shed) = table.admit(ip("10.0.0.4"));
        assert!(!shed, "a freed place is taken without shedding");
        assert!(!is_shed(&newest).await);
        drop(oldest);
        assert_eq!(table.len(), 2);
    }
}
