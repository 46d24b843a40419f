//! The connection limit of a listener, kept without letting slow, idle or unauthenticated
//! clients starve real ones.
//!
//! A plain semaphore of `max_connections` lets a few thousand connections that never finish
//! their TLS handshake, trickle their headers or bodies, sit idle on keep-alive, or hold an
//! `Attest` stream open without a word, keep every slot while a real device waits in the
//! kernel's backlog (slowloris). So each connection is in a table with its phase, its source
//! and since when it is in its phase, and a new connection arriving at the limit sheds the
//! *sheddable* connection that has been in its phase longest. A real client's handshake or
//! request takes milliseconds, so it is the youngest, and the last to go; a slowloris
//! connection or a forgotten keep-alive is the oldest, and the first.
//!
//! Sheddable is every connection that is not serving a request (in its TLS handshake, idle,
//! still receiving a request), and every connection serving one for a client this CA has not
//! authenticated (no client certificate it issued): unauthenticated work never holds a slot
//! against a newcomer. Only authenticated requests being served are never shed; when every
//! connection is such, the new one waits, and is admitted as soon as any slot frees or turns
//! sheddable (each such request is bounded: body timeout, signing deadline).
//!
//! One source (an IPv4 address, an IPv6 /64) holds at most `per_source` connections: at its
//! cap its own longest-waiting sheddable connection makes room, and when it has none, the
//! new connection is refused. One host can then neither fill the table with work that is
//! never shed nor make the rest of the table churn alone.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{watch, Notify};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, TLS handshake not finished.
    Handshake,
    /// Established, no request in progress (or its headers still arriving).
    Idle,
    /// A request's headers are in and its body is still arriving (HTTP/1).
    Receiving,
    /// A request is being served.
    Busy,
}

impl Phase {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => Self::Handshake,
            1 => Self::Idle,
            2 => Self::Receiving,
            _ => Self::Busy,
        }
    }
}

#[derive(Debug)]
struct Entry {
    phase: Phase,
    /// When the connection entered `phase`.
    since: Instant,
    source: IpAddr,
    authenticated: bool,
    shed: Arc<Notify>,
}

impl Entry {
    fn sheddable(&self) -> bool {
        self.phase != Phase::Busy || !self.authenticated
    }
}

#[derive(Debug, Default)]
struct Table {
    next_id: u64,
    /// By id, which is also age order.
    entries: BTreeMap<u64, Entry>,
}

impl Table {
    /// The sheddable connection waiting longest, among those `matching`.
    fn victim(&self, matching: impl Fn(&Entry) -> bool) -> Option<u64> {
        self.entries
            .iter()
            .filter(|(_, e)| e.sheddable() && matching(e))
            .min_by_key(|(_, e)| e.since)
            .map(|(id, _)| *id)
    }
}

#[derive(Debug)]
struct Shared {
    listener: &'static str,
    limit: usize,
    per_source: usize,
    table: Mutex<Table>,
    /// Notified when a slot frees or turns sheddable: the accept loop may be waiting.
    released: Notify,
    shed_total: Counter,
    /// Set once the listener stops: every connection finishes the request it is serving,
    /// writes the answer, and closes.
    closing: watch::Sender<bool>,
}

impl Shared {
    fn shed(&self, table: &mut Table, victim: u64, why: &'static str) {
        if let Some(entry) = table.entries.remove(&victim) {
            tracing::debug!(
                listener = self.listener,
                phase = ?entry.phase,
                source = %entry.source,
                authenticated = entry.authenticated,
                waited_ms = entry.since.elapsed().as_millis() as u64,
                "{why}: shedding the connection waiting longest"
            );
            self.shed_total.inc();
            entry.shed.notify_one();
        }
    }
}

/// What one source is counted as: its address, or its /64 for IPv6 (one host typically
/// gets a whole /64).
fn source_key(address: IpAddr) -> IpAddr {
    match address.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(bits.into())
        }
        v4 => v4,
    }
}

/// The connections of one listener.
#[derive(Debug, Clone)]
pub struct Connections(Arc<Shared>);

impl Connections {
    /// A table of at most `limit` connections for `listener` (a name for logs), at most
    /// `per_source` of them from one source; each shed connection is counted in
    /// `shed_total`.
    pub fn new(
        listener: &'static str,
        limit: usize,
        per_source: usize,
        shed_total: Counter,
    ) -> Self {
        Self(Arc::new(Shared {
            listener,
            limit: limit.max(1),
            per_source: per_source.max(1),
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

    /// A slot for a connection just accepted from `source`, shedding the sheddable one
    /// waiting longest at the limit (see the module docs); waits only while every
    /// connection is serving an authenticated request. `None`: the source is at its cap
    /// with nothing to shed, close the new connection.
    pub async fn admit(&self, source: IpAddr) -> Option<Slot> {
        loop {
            let released = self.0.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            match self.try_admit(source) {
                Admission::Admitted(slot) => return Some(slot),
                Admission::Refused => return None,
                Admission::Full => released.await,
            }
        }
    }

    fn try_admit(&self, source: IpAddr) -> Admission {
        let Ok(mut table) = self.0.table.lock() else {
            return Admission::Refused;
        };
        let key = source_key(source);
        let from_source = table.entries.values().filter(|e| e.source == key).count();
        if from_source >= self.0.per_source {
            let Some(victim) = table.victim(|e| e.source == key) else {
                tracing::debug!(
                    listener = self.0.listener,
                    %source,
                    "connection refused: the source holds its maximum of busy connections"
                );
                self.0.shed_total.inc();
                return Admission::Refused;
            };
            self.0
                .shed(&mut table, victim, "connections per source reached");
        }
        if table.entries.len() >= self.0.limit {
            let Some(victim) = table.victim(|_| true) else {
                return Admission::Full;
            };
            self.0.shed(&mut table, victim, "connection limit reached");
        }
        let id = table.next_id;
        table.next_id += 1;
        let shed = Arc::new(Notify::new());
        table.entries.insert(
            id,
            Entry {
                phase: Phase::Handshake,
                since: Instant::now(),
                source: key,
                authenticated: false,
                shed: shed.clone(),
            },
        );
        Admission::Admitted(Slot {
            id,
            shed,
            phase: AtomicU8::new(Phase::Handshake as u8),
            authenticated: AtomicBool::new(false),
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

enum Admission {
    Admitted(Slot),
    /// The source is at its cap and none of its connections is sheddable.
    Refused,
    /// Every connection is serving an authenticated request.
    Full,
}

/// One connection's place in the table; dropping it frees the place.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    shed: Arc<Notify>,
    /// The phase, also kept here: a shed connection is no longer in the table.
    phase: AtomicU8,
    authenticated: AtomicBool,
    /// Requests in progress, for protocols that multiplex them (HTTP/2).
    in_flight: Mutex<usize>,
    shared: Arc<Shared>,
}

impl Slot {
    /// Records the connection's phase.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Relaxed);
        self.update(|entry| {
            if entry.phase != phase {
                entry.phase = phase;
                entry.since = Instant::now();
            }
        });
    }

    /// Records that the client presented a certificate this CA issued: its requests are no
    /// longer shed while being served.
    pub fn set_authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
        self.update(|entry| entry.authenticated = true);
    }

    /// Applies `change` to this connection's entry, and wakes the accept loop if the
    /// connection turned sheddable (it may be waiting for exactly that).
    fn update(&self, change: impl FnOnce(&mut Entry)) {
        let turned_sheddable = self.shared.table.lock().is_ok_and(|mut table| {
            table.entries.get_mut(&self.id).is_some_and(|entry| {
                let before = entry.sheddable();
                change(entry);
                !before && entry.sheddable()
            })
        });
        if turned_sheddable {
            self.shared.released.notify_one();
        }
    }

    /// The recorded phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }

    /// Whether a request is being served.
    pub fn is_busy(&self) -> bool {
        self.phase() == Phase::Busy
    }

    /// Whether the client presented a certificate this CA issued.
    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }

    /// Marks one request in progress, in `phase` (`Receiving` or `Busy`), until the returned
    /// guard drops (HTTP/2: many at once); the connection is idle again once none is.
    pub fn begin_request(self: &Arc<Self>, phase: Phase) -> InFlight {
        if let Ok(mut n) = self.in_flight.lock() {
            *n += 1;
            // A multiplexed connection is busy while any of its requests is.
            if *n == 1 || phase == Phase::Busy {
                self.set_phase(phase);
            }
        }
        InFlight(self.clone())
    }

    /// A request's body has arrived in full: the connection is busy serving it (unless it
    /// went idle meanwhile).
    pub fn received(&self) {
        if self.phase() == Phase::Receiving {
            self.set_phase(Phase::Busy);
        }
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

    const HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn table(limit: usize) -> (Connections, Counter) {
        let shed = Counter::default();
        // One test host: no per-source cap in the way of the global limit.
        (
            Connections::new("test", limit, usize::MAX, shed.clone()),
            shed,
        )
    }

    async fn admit_from(connections: &Connections, source: IpAddr) -> Option<Slot> {
        tokio::time::timeout(Duration::from_millis(200), connections.admit(source))
            .await
            .ok()
            .flatten()
    }

    async fn admit_soon(connections: &Connections) -> Option<Slot> {
        admit_from(connections, HOST).await
    }

    /// A slot serving an authenticated request: never shed.
    async fn authenticated_busy(connections: &Connections) -> Slot {
        let slot = admit_soon(connections).await.expect("slot");
        slot.set_authenticated();
        slot.set_phase(Phase::Busy);
        slot
    }

    async fn is_shed(slot: &Slot) -> bool {
        tokio::time::timeout(Duration::from_millis(50), slot.shed())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn sheds_the_connection_waiting_longest_never_an_authenticated_busy_one() {
        let (connections, shed_total) = table(3);
        let busy = authenticated_busy(&connections).await;
        let slow_handshake = admit_soon(&connections).await.expect("slot");
        tokio::time::sleep(Duration::from_millis(5)).await;
        let idle = admit_soon(&connections).await.expect("slot");
        idle.set_phase(Phase::Idle);
        let _fourth = admit_soon(&connections).await.expect("sheds one");
        assert_eq!(shed_total.get(), 1);
        assert!(
            is_shed(&slow_handshake).await,
            "the handshake waiting longest is shed"
        );
        for survivor in [&busy, &idle] {
            assert!(!is_shed(survivor).await);
        }
        assert_eq!(connections.len(), 3);
    }

    #[tokio::test]
    async fn unauthenticated_work_and_trickled_bodies_are_sheddable() {
        let (connections, _) = table(2);
        let unauthenticated = Arc::new(admit_soon(&connections).await.expect("slot"));
        let _attest = unauthenticated.begin_request(Phase::Busy);
        let receiving = Arc::new(admit_soon(&connections).await.expect("slot"));
        receiving.set_authenticated();
        let _upload = receiving.begin_request(Phase::Receiving);
        let _third = admit_soon(&connections).await.expect("sheds one");
        assert!(is_shed(&unauthenticated).await, "oldest: unauthenticated");
        let _fourth = admit_soon(&connections).await.expect("sheds another");
        assert!(is_shed(&receiving).await, "a body still arriving");
    }

    #[tokio::test]
    async fn a_received_body_makes_an_authenticated_request_busy() {
        let (connections, _) = table(1);
        let slot = Arc::new(admit_soon(&connections).await.expect("slot"));
        slot.set_authenticated();
        let request = slot.begin_request(Phase::Receiving);
        slot.received();
        assert!(slot.is_busy());
        assert!(admit_soon(&connections).await.is_none(), "busy: not shed");
        drop(request);
        slot.received();
        assert_eq!(
            slot.phase(),
            Phase::Idle,
            "a late end of body changes nothing"
        );
    }

    #[tokio::test]
    async fn a_fresh_handshake_outlasts_a_connection_idle_for_longer() {
        let (connections, _) = table(2);
        let idle = admit_soon(&connections).await.expect("slot");
        idle.set_phase(Phase::Idle);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let handshake = admit_soon(&connections).await.expect("slot");
        let _third = admit_soon(&connections).await.expect("sheds one");
        assert!(is_shed(&idle).await);
        assert!(!is_shed(&handshake).await);
    }

    #[tokio::test]
    async fn a_multiplexed_connection_is_busy_while_any_request_is() {
        let (connections, _) = table(1);
        let slot = Arc::new(admit_soon(&connections).await.expect("slot"));
        slot.set_authenticated();
        slot.set_phase(Phase::Idle);
        let first = slot.begin_request(Phase::Busy);
        let second = slot.begin_request(Phase::Busy);
        drop(first);
        assert!(slot.is_busy());
        assert!(admit_soon(&connections).await.is_none(), "busy: not shed");
        drop(second);
        assert!(!slot.is_busy());
        assert!(admit_soon(&connections).await.is_some(), "idle: shed");
    }

    #[tokio::test]
    async fn a_waiting_connection_is_admitted_when_a_slot_turns_sheddable() {
        let (connections, shed_total) = table(1);
        let slot = Arc::new(admit_soon(&connections).await.expect("slot"));
        slot.set_authenticated();
        let request = slot.begin_request(Phase::Busy);
        let waiting = tokio::spawn({
            let connections = connections.clone();
            async move { connections.admit(HOST).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished(), "every slot busy: it waits");
        // The request ends; the connection stays open, idle.
        drop(request);
        let admitted = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(
            matches!(admitted, Ok(Ok(Some(_)))),
            "an idle slot admits the waiter without the connection closing"
        );
        assert_eq!(shed_total.get(), 1);
        assert!(is_shed(&slot).await);
    }

    #[tokio::test]
    async fn waits_while_every_connection_is_busy() {
        let (connections, shed_total) = table(1);
        let busy = authenticated_busy(&connections).await;
        assert!(admit_soon(&connections).await.is_none());
        let waiting = tokio::spawn({
            let connections = connections.clone();
            async move { connections.admit(HOST).await }
        });
        drop(busy);
        let admitted = tokio::time::timeout(Duration::from_secs(5), waiting).await;
        assert!(
            matches!(admitted, Ok(Ok(Some(_)))),
            "a freed slot admits the waiter"
        );
        assert_eq!(shed_total.get(), 0);
    }

    #[tokio::test]
    async fn one_source_makes_room_among_its_own_connections_or_is_refused() {
        let shed_total = Counter::default();
        let connections = Connections::new("test", 10, 2, shed_total.clone());
        let other: IpAddr = "192.0.2.7".parse().expect("address");
        let stranger = admit_from(&connections, other).await.expect("slot");
        stranger.set_phase(Phase::Idle);
        let idle = admit_soon(&connections).await.expect("slot");
        idle.set_phase(Phase::Idle);
        let busy = authenticated_busy(&connections).await;
        let third = admit_soon(&connections)
            .await
            .expect("sheds its own idle one");
        assert!(is_shed(&idle).await);
        assert!(
            !is_shed(&stranger).await,
            "another source's older connection stays"
        );
        third.set_authenticated();
        third.set_phase(Phase::Busy);
        assert!(
            matches!(connections.try_admit(HOST), Admission::Refused),
            "at its cap with only busy connections: refused"
        );
        assert!(admit_from(&connections, other).await.is_some());
        drop(busy);
    }

    #[test]
    fn ipv6_sources_count_per_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().expect("address");
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().expect("address");
        let c: IpAddr = "2001:db8:1:3::1".parse().expect("address");
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().expect("address");
        assert_eq!(
            source_key(mapped),
            "192.0.2.1".parse::<IpAddr>().expect("v4")
        );
    }
}
