//! The accept loop both kinds of proxy share, and the two limits a connection meets on its
//! way to a session:
//!
//! 1. Pending: from accept until its handshake is done (the peer's, inbound; the gateway's,
//!    outbound) a connection holds a place in a [`PendingConnections`] table: at most
//!    `max_pending_handshakes`, `max_pending_per_source` from one address, the oldest shed
//!    when full, each bounded by [`HANDSHAKE_TIMEOUT`]. Silent connections cost the
//!    attacker a TCP handshake each and keep nobody out.
//! 2. Session: only a connection whose peer passed the handshake and the allow list takes
//!    one of `max_sessions` slots, for the session's life (which the idle timeout bounds).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;

use super::metrics::ProxyMetrics;
use crate::daemon::connections::{Pending, PendingConnections};

/// A TLS handshake that has not finished in this time is dropped: a real peer on a plant
/// network needs milliseconds, and a stalled one must not hold its place for long.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How many connections a proxy lets wait and run.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Open sessions at most.
    pub max_sessions: usize,
    /// Connections in their handshake at most.
    pub max_pending: usize,
    /// Of those, from one IP address.
    pub max_pending_per_source: usize,
}

/// Why a handshake did not lead to a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotAdmitted {
    /// Not finished within [`HANDSHAKE_TIMEOUT`].
    Timeout,
    /// A newer connection took its place in the full pending table.
    Shed,
}

impl NotAdmitted {
    /// The metrics label.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Timeout => "handshake_timeout",
            Self::Shed => "handshake_shed",
        }
    }
}

/// A connection's way from accept to a session slot.
#[derive(Debug)]
pub struct Admission {
    pending: Option<Pending>,
    slots: Arc<Semaphore>,
    max_sessions: usize,
}

impl Admission {
    /// Runs `handshake` while the connection is pending: bounded by [`HANDSHAKE_TIMEOUT`] and
    /// given up when the connection is shed.
    pub async fn handshake<F: Future>(&self, handshake: F) -> Result<F::Output, NotAdmitted> {
        let shed = async {
            match &self.pending {
                Some(pending) => pending.shed().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            done = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake) => done.map_err(|_| NotAdmitted::Timeout),
            () = shed => Err(NotAdmitted::Shed),
        }
    }

    /// Leaves the pending table and takes a session slot, held until the permit is dropped;
    /// `Err(max_sessions)` when all are taken.
    pub fn session_slot(mut self) -> Result<OwnedSemaphorePermit, usize> {
        drop(self.pending.take());
        Arc::clone(&self.slots)
            .try_acquire_owned()
            .map_err(|_| self.max_sessions)
    }
}

/// Accepts on `listener` until the future is dropped (which drops every session with it).
/// A connection arriving before the device has an identity is closed at once with a log
/// line; the others run `session(stream, from, identity, admission)`, which does its
/// handshake through [`Admission::handshake`] and then takes [`Admission::session_slot`].
pub async fn accept<T, S, F>(
    listener: TcpListener,
    device: &str,
    limits: Limits,
    identity: watch::Receiver<Result<T, String>>,
    metrics: &ProxyMetrics,
    session: S,
) where
    T: Clone,
    S: Fn(TcpStream, SocketAddr, T, Admission) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(limits.max_sessions));
    let pending = PendingConnections::new(limits.max_pending, limits.max_pending_per_source);
    let mut sessions = JoinSet::new();
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!(device, error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        while sessions.try_join_next().is_some() {}
        let current = match &*identity.borrow() {
            Ok(current) => current.clone(),
            Err(reason) => {
                metrics.session_refused("no_identity");
                tracing::warn!(device, %from, "connection closed: no identity to present yet: {reason}");
                continue;
            }
        };
        let (place, shed) = pending.admit(from.ip());
        if shed {
            tracing::debug!(device, %from, "pending handshakes full: the oldest is shed");
        }
        let admission = Admission {
            pending: Some(place),
            slots: Arc::clone(&slots),
            max_sessions: limits.max_sessions,
        };
        sessions.spawn(session(stream, from, current, admission));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_slot_is_taken_only_after_the_handshake_and_a_shed_handshake_gives_up() {
        let slots = Arc::new(Semaphore::new(1));
        let table = PendingConnections::new(1, 1);
        let admission = |place| Admission {
            pending: Some(place),
            slots: Arc::clone(&slots),
            max_sessions: 1,
        };
        let (place, _) = table.admit("10.0.0.1".parse().expect("ip"));
        let silent = admission(place);
        let stalled = silent.handshake(std::future::pending::<()>());
        tokio::pin!(stalled);
        // Nobody holds a session slot while the silent one waits.
        assert_eq!(slots.available_permits(), 1);
        let (place, shed) = table.admit("10.0.0.1".parse().expect("ip"));
        assert!(shed);
        assert_eq!(stalled.await, Err(NotAdmitted::Shed));
        let honest = admission(place);
        assert_eq!(honest.handshake(async { 7 }).await, Ok(7));
        let slot = honest.session_slot().expect("a free slot");
        assert!(table.is_empty(), "admitted: no longer pending");
        let (place, _) = table.admit("10.0.0.2".parse().expect("ip"));
        assert_eq!(admission(place).session_slot().err(), Some(1));
        drop(slot);
    }
}
