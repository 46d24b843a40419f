//! The accept loop both kinds of proxy share: a session slot per connection (at most
//! `max_sessions`), the identity current at accept, one task per session.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use super::metrics::ProxyMetrics;

/// Accepts on `listener` until the future is dropped (which drops every session with it).
/// A connection over the session limit, or arriving before the device has an identity, is
/// closed at once with a log line; the others run `session(stream, from, identity)`.
pub async fn accept<T, S, F>(
    listener: TcpListener,
    device: &str,
    max_sessions: usize,
    identity: watch::Receiver<Result<T, String>>,
    metrics: &ProxyMetrics,
    session: S,
) where
    T: Clone,
    S: Fn(TcpStream, SocketAddr, T) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_sessions));
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
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            metrics.session_refused("max_sessions");
            tracing::warn!(device, %from, max_sessions, "connection closed: the device has its maximum of open sessions");
            continue;
        };
        let current = match &*identity.borrow() {
            Ok(current) => current.clone(),
            Err(reason) => {
                metrics.session_refused("no_identity");
                tracing::warn!(device, %from, "connection closed: no identity to present yet: {reason}");
                continue;
            }
        };
        let run = session(stream, from, current);
        sessions.spawn(async move {
            run.await;
            drop(slot);
        });
    }
}
