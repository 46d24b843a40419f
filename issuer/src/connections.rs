//! The connection limit of a listener, kept without letting slow or idle clients starve real
//! ones.
//!
//! A plain semaphore of `max_connections` lets a few thousand connections that never finish
//! their TLS handshake, trickle their headers, or sit idle on keep-alive hold every slot
//! while a real device waits in the kernel's backlog (slowloris). So each connection is in a
//! table with its phase and since when it is in it, and a new connection arriving at the
//! limit sheds the connection that has been waiting longest: in its TLS handshake, or idle
//! between requests (which includes still sending a request's headers). A real client's
//! handshake takes milliseconds, so it is the youngest, and the last to go; a slowloris
//! connection or a forgotten keep-alive is the oldest, and the first.
//!
//! A connection busy with a request is never shed; when every connection is busy, the new
//! one waits for a slot (each request is bounded: body timeout, signing deadline). To keep a
//! real client out, an attacker must open `max_connections` connections within the few
//! milliseconds that client needs, and each shed connection cost the attacker a TCP
//! handshake. The timeouts still bound every phase on their own.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{watch, Notify};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, TLS handshake not finished.
    Handshake,
    /// Established, no request in progress (or its headers still arriving).
    Idle,
    /// A request is being served.
    Busy,
}

#[derive(Debug)]
struct Entry {
    phase: Phase,
    /// When the connection entered `phase`.
    since: Instant,
    shed: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// By id, which is also age order.
    entries: BTreeMap<u64, Entry>,
}

#[derive(Debug)]
struct Shared {
    listener: &'static str,
    limit: usize,
    table: Mutex<Table>,
    released: Notify,
    shed_total: Arc<AtomicU64>,
    /// Set once the listener stops: every connection finishes the request it is serving,
    /// writes the answer, and closes.
    closing: watch::Sender<bool>,
}

/// The connections of one listener.
#[derive(Debug, Clone)]
pub struct Connections(Arc<Shared>);

impl Connections {
    /// A table of at most `limit` connections for `listener` (a name for logs); each shed
    /// connection is counted in `shed_total`.
    pub fn new(listener: &'static str, limit: usize, shed_total: Arc<AtomicU64>) -> Self {
        Self(Arc::new(Shared {
            listener,
            limit: limit.max(1),
            table: Mutex::new(Table::default()),
            released: Notify::new(),
            shed_total,
            closing: watch::channel(false).0,
        }))
    }

    /// Tells every connection to close once the request it is serving has been answered,
    /// and waits until all are gone or `deadline` has passed; returns how many were left.
    /// A process that stops (for a broken store, say) must not cut off answers it already
    /// made: a client then sees its 503 + Retry-After instead of a dropped connection.
    pub async fn close(&self, deadline: Duration) -> usize {
        self.0.closing.send_replace(true);
        let drained = async {
            loop {
                let released = self.0.released.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                if self.is_empty() {
                    return;
                }
                released.await;
            }
        };
        let _ = tokio::time::timeout(deadline, drained).await;
        self.len()
    }

    /// A slot for a connection just accepted, shedding the one waiting longest at the limit
    /// (see the module docs); waits only while every connection is busy with a request.
    pub async fn admit(&self) -> Slot {
        loop {
            let released = self.0.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            if let Some(slot) = self.try_admit() {
                return slot;
            }
            released.await;
        }
    }

    fn try_admit(&self) -> Option<Slot> {
        let mut table = self.0.table.lock().ok()?;
        if table.entries.len() >= self.0.limit {
            let victim = table
                .entries
                .iter()
                .filter(|(_, e)| e.phase != Phase::Busy)
                .min_by_key(|(_, e)| e.since)
                .map(|(id, _)| *id)?;
            if let Some(entry) = table.entries.remove(&victim) {
                tracing::debug!(
                    listener = self.0.listener,
                    phase = ?entry.phase,
                    waited_ms = entry.since.elapsed().as_millis() as u64,
                "connection limit reached: shedding the connection waiting longest"
                );
                self.0.shed_total.fetch_add(1, Ordering::Relaxed);
                entry.shed.notify_one();
            }
        }
        let id = table.next_id;
        table.next_id += 1;
        let shed = Arc::new(Notify::new());
        table.entries.insert(
            id,
            Entry {
                phase: Phase::Handshake,
                since: Instant::now(),
                shed: shed.clone(),
            },
        );
        Some(Slot {
            id,
            shed,
            phase: AtomicU8::new(Phase::Handshake as u8),
            in_flight: Mutex::new(0),
            shared: self.0.clone(),
        })
    }

    /// Connections held now.
    pub fn len(&self) -> usize {
        self.0.table.lock().map(|t| t.entries.len()).unwrap_or(0)
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One connection's place in the table; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    shed: Arc<Notify>,
    /// The phase, also kept here: a shed connection is no longer in the table.
    phase: AtomicU8,
    /// Requests in progress, for protocols that multiplex them (HTTP/2).
    in_flight: Mutex<usize>,
    shared: Arc<Shared>,
}

impl Slot {
    /// Records the connection's phase.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        if let Ok(mut table) = self.shared.table.lock() {
            if let Some(entry) = table.entries.get_mut(&self.id) {
                if entry.phase != phase {
                    entry.phase = phase;
                    entry.since = Instant::now();
                }
            }
        }
    }

    /// Whether a request is being served.
    pub fn is_busy(&self) -> bool {
        self.phase.load(Ordering::Relaxed) == Phase::Busy as u8
    }

    /// Marks one request in progress until the returned guard drops (HTTP/2: many at once);
    /// the connection is busy while any is.
    pub fn begin_request(self: &Arc<Self>) -> InFlight {
        if let Ok(mut n) = self.in_flight.lock() {
            *n += 1;
            self.set_phase(Phase::Busy);
        }
        InFlight(self.clone())
    }

    /// Completes when a newer connection shed this one: close it.
    pub async fn shed(&self) {
        self.shed.notified().await;
    }

    /// Completes when the listener stops ([`Connections::close`]): finish the request in
    /// progress, answer it, and close.
    pub async fn closing(&self) {
        let mut closing = self.shared.closing.subscribe();
        // The sender lives as long as `shared`, which this slot holds.
        let _ = closing.wait_for(|closing| *closing).await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let removed = self
            .shared
            .table
            .lock()
            .map(|mut t| t.entries.remove(&self.id).is_some())
            .unwrap_or(false);
        if removed {
            self.shared.released.notify_one();
        }
    }
}

/// One request in progress on a connection.
#[derive(Debug)]
pub struct InFlight(Arc<Slot>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Ok(mut n) = self.0.in_flight.lock() {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.0.set_phase(Phase::Idle);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn table(limit: usize) -> (Connections, Arc<AtomicU64>) {
        let shed = Arc::new(AtomicU64::new(0));
        (Connections::new("test", limit, shed.clone()), shed)
    }

    async fn admit_soon(connections: &Connections) -> Option<Slot> {
        tokio::time::timeout(Duration::from_millis(200), connections.admit())
            .await
            .ok()
    }

    #[tokio::test]
    async fn sheds_the_connection_waiting_longest_never_a_busy_one() {
        let (connections, shed_total) = table(3);
        let busy = admit_soon(&connections).await.expect("slot");
        busy.set_phase(Phase::Busy);
        let slow_handshake = admit_soon(&connections).await.expect("slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let idle = admit_soon(&connections).await.expect("slot");
        idle.set_phase(Phase::Idle);
        let _fourth = admit_soon(&connections).await.expect("sheds one");
        assert_eq!(shed_total.load(Ordering::Relaxed), 1);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), slow_handshake.shed())
                .await
                .is_ok(),
            "the handshake waiting longest is shed"
        );
        for survivor in [&busy, &idle] {
            assert!(
                tokio::time::timeout(Duration::from_millis(50), survivor.shed())
                    .await
                    .is_err()
            );
        }
        assert_eq!(connections.len(), 3);
    }

    #[tokio::test]
    async fn a_fresh_handshake_outlasts_a_connection_idle_for_longer() {
        let (connections, _) = table(2);
        let idle = admit_soon(&connections).await.expect("slot");
        idle.set_phase(Phase::Idle);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let handshake = admit_soon(&connections).await.expect("slot");
        let _third = admit_soon(&connections).await.expect("sheds one");
        assert!(tokio::time::timeout(Duration::from_millis(50), idle.shed())
            .await
            .is_ok());
        assert!(
            tokio::time::timeout(Duration::from_millis(50), handshake.shed())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn sheds_idle_connections_when_none_is_handshaking() {
        let (connections, _) = table(2);
        let first = admit_soon(&connections).await.expect("slot");
        first.set_phase(Phase::Idle);
        let second = admit_soon(&connections).await.expect("slot");
        second.set_phase(Phase::Busy);
        let _third = admit_soon(&connections).await.expect("sheds the idle one");
        assert!(
            tokio::time::timeout(Duration::from_millis(50), first.shed())
                .await
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_multiplexed_connection_is_busy_while_any_request_is() {
        let (connections, _) = table(1);
        let slot = Arc::new(admit_soon(&connections).await.expect("slot"));
        slot.set_phase(Phase::Idle);
        let first = slot.begin_request();
        let second = slot.begin_request();
        drop(first);
        assert!(slot.is_busy());
        assert!(admit_soon(&connections).await.is_none(), "busy: not shed");
        drop(second);
        assert!(!slot.is_busy());
        assert!(admit_soon(&connections).await.is_some(), "idle: shed");
    }

    #[tokio::test]
    async fn waits_while_every_connection_is_busy() {
        let (connections, shed_total) = table(1);
        let busy = admit_soon(&connections).await.expect("slot");
        busy.set_phase(Phase::Busy);
        assert!(admit_soon(&connections).await.is_none());
        let waiting = tokio::spawn({
            let connections = connections.clone();
            async move { connections.admit().await }
        });
        drop(busy);
        let admitted = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(
            matches!(admitted, Ok(Ok(_))),
            "a freed slot admits the waiter"
        );
        assert_eq!(shed_total.load(Ordering::Relaxed), 0);
    }
}
