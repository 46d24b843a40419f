//! Audit records for what the PLC proxy refuses. The agent keeps no audit log of its own: a
//! refused Modbus request is reported to the issuer (`ReportProxyEvents`), which appends it
//! to its hash-chained log.
//!
//! The proxy must never wait on the issuer, so [`ProxyAudit::refused`] only queues. A
//! reporter task sends what is queued in batches as soon as it is there, and while the issuer
//! is unreachable keeps it (bounded) and retries with a short backoff. What does not fit is
//! counted and reported later as one `proxy.events_dropped` event, so the log shows the gap.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use proto::agent::ProxyEvent;
use proto::SpiffeId;
use tokio::sync::{mpsc, watch};

use crate::daemon::issuer_client::IssuerClient;
use crate::Error;

/// The event kind of a refused Modbus request.
pub const REQUEST_REFUSED: &str = "modbus.request_refused";
/// The event kind summarising events that were not kept.
pub const EVENTS_DROPPED: &str = "proxy.events_dropped";
/// Refused requests waiting between the proxy and the reporter.
pub const QUEUE_CAPACITY: usize = 4096;
/// Refused requests the reporter holds while the issuer is unreachable.
pub const MAX_PENDING: usize = 4096;
/// Most events in one call (the issuer takes at most 1000).
pub const MAX_BATCH: usize = 500;
/// First wait after a failed report; doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One request the proxy refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RefusedRequest {
    /// The device name from agent.toml (`press-7`).
    pub device: String,
    /// Who sent it (the client certificate's SPIFFE ID).
    pub peer: SpiffeId,
    /// The Modbus function code asked for.
    pub function_code: u8,
    /// The MBAP transaction identifier.
    pub transaction_id: u16,
    /// The MBAP unit identifier.
    pub unit_id: u8,
}

/// Where the proxy reports refusals: cheap to clone, never blocks.
#[derive(Debug, Clone)]
pub struct ProxyAudit {
    queue: mpsc::Sender<ProxyEvent>,
    /// Refusals that found the queue full (or the reporter gone), not yet reported.
    dropped: Arc<AtomicU64>,
}

impl ProxyAudit {
    /// Starts the reporter task; `issuer` is `cache::Published.issuer` (a client once the
    /// node has an identity).
    pub fn spawn(issuer: watch::Receiver<Option<IssuerClient>>) -> Self {
        let (audit, reporter) = Self::with_reporter(QUEUE_CAPACITY);
        tokio::spawn(reporter.run(issuer));
        audit
    }

    fn with_reporter(capacity: usize) -> (Self, Reporter) {
        let (queue, receiver) = mpsc::channel(capacity);
        let dropped = Arc::new(AtomicU64::new(0));
        let reporter = Reporter {
            receiver: Some(receiver),
            dropped: Arc::clone(&dropped),
            pending: VecDeque::new(),
            unreported_drops: 0,
            failing: false,
        };
        (Self { queue, dropped }, reporter)
    }

    /// Queues an audit record of `request`. Never blocks or fails: when the queue is full
    /// the request is counted, and the count reported later as one `proxy.events_dropped`.
    pub fn refused(&self, request: RefusedRequest) {
        let event = ProxyEvent {
            device: request.device,
            peer_spiffe_id: request.peer.to_string(),
            kind: REQUEST_REFUSED.to_owned(),
            function_code: request.function_code.into(),
            transaction_id: request.transaction_id.into(),
            unit_id: request.unit_id.into(),
            at: unix_now(),
            count: 1,
        };
        if self.queue.try_send(event).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The task between the queue and the issuer.
struct Reporter {
    /// `None` once every [`ProxyAudit`] is gone and the queue is drained.
    receiver: Option<mpsc::Receiver<ProxyEvent>>,
    dropped: Arc<AtomicU64>,
    /// Taken from the queue, not yet accepted by the issuer; oldest first.
    pending: VecDeque<ProxyEvent>,
    /// Dropped events not yet accepted by the issuer in a `proxy.events_dropped` summary.
    unreported_drops: u64,
    /// The last report failed (a new outage is logged at warn once, then at debug).
    failing: bool,
}

impl Reporter {
    async fn run(mut self, mut issuer: watch::Receiver<Option<IssuerClient>>) {
        let mut backoff = MIN_BACKOFF;
        loop {
            if self.idle() {
                let Some(receiver) = self.receiver.as_mut() else {
                    return;
                };
                match receiver.recv().await {
                    Some(event) => self.pending.push_back(event),
                    None => self.receiver = None,
                }
            }
            self.take_queued();
            self.take_drops();
            let Some(batch) = self.batch() else {
                continue;
            };
            let client = issuer.borrow_and_update().clone();
            let Some(client) = client else {
                // No node identity yet: wait for one.
                pause(&mut issuer, backoff).await;
                continue;
            };
            match client.report_proxy_events(batch.events).await {
                Ok(()) => {
                    self.acknowledge(batch.refused, batch.drops);
                    if self.failing {
                        tracing::info!("proxy audit events reach the issuer again");
                    }
                    self.failing = false;
                    backoff = MIN_BACKOFF;
                }
                Err(e) if is_permanent(&e) => {
                    // Sending the same batch again would be refused again; drop it, counted.
                    tracing::warn!(error = %e, events = batch.refused, "the issuer refused proxy audit events; dropping them");
                    self.acknowledge(batch.refused, 0);
                    self.unreported_drops += batch.refused as u64;
                    // An issuer without this call refuses the drop summary too: don't
                    // hammer it.
                    pause(&mut issuer, backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
                Err(e) => {
                    if self.failing {
                        tracing::debug!(error = %e, pending = self.pending.len(), "reporting proxy audit events failed; retrying");
                    } else {
                        tracing::warn!(error = %e, pending = self.pending.len(), "reporting proxy audit events failed; keeping them and retrying");
                    }
                    self.failing = true;
                    pause(&mut issuer, backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Nothing to send: wait for the queue.
    fn idle(&self) -> bool {
        self.pending.is_empty()
            && self.unreported_drops == 0
            && self.dropped.load(Ordering::Relaxed) == 0
    }

    /// Moves queued events to `pending` while there is room; the rest stay queued, and what
    /// then does not fit the queue is counted by [`ProxyAudit::refused`].
    fn take_queued(&mut self) {
        let Some(receiver) = self.receiver.as_mut() else {
            return;
        };
        while self.pending.len() < MAX_PENDING {
            match receiver.try_recv() {
                Ok(event) => self.pending.push_back(event),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    self.receiver = None;
                    break;
                }
            }
        }
    }

    fn take_drops(&mut self) {
        let dropped = self.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::warn!(
                dropped,
                "proxy audit events dropped: the queue is full (is the issuer unreachable?); reporting the count"
            );
            self.unreported_drops += dropped;
        }
    }

    /// The next call's events: the oldest pending refusals, then the drop summary if any.
    fn batch(&self) -> Option<Batch> {
        let drops = self.unreported_drops;
        let room = if drops > 0 { MAX_BATCH - 1 } else { MAX_BATCH };
        let refused = self.pending.len().min(room);
        let mut events: Vec<ProxyEvent> = self.pending.iter().take(refused).cloned().collect();
        if drops > 0 {
            events.push(ProxyEvent {
                kind: EVENTS_DROPPED.to_owned(),
                at: unix_now(),
                count: drops,
                ..ProxyEvent::default()
            });
        }
        (!events.is_empty()).then_some(Batch {
            events,
            refused,
            drops,
        })
    }

    /// The issuer has the first `refused` pending events and a summary of `drops`.
    fn acknowledge(&mut self, refused: usize, drops: u64) {
        self.pending.drain(..refused.min(self.pending.len()));
        self.unreported_drops -= drops.min(self.unreported_drops);
    }
}

/// One call's worth.
struct Batch {
    events: Vec<ProxyEvent>,
    refused: usize,
    drops: u64,
}

/// Waits `backoff`, or less if the issuer client changes (a new node identity).
async fn pause(issuer: &mut watch::Receiver<Option<IssuerClient>>, backoff: Duration) {
    tokio::select! {
        () = tokio::time::sleep(backoff) => {}
        changed = issuer.changed() => {
            if changed.is_err() {
                // No one will publish a client again; don't spin.
                tokio::time::sleep(backoff).await;
            }
        }
    }
}

/// Refusals that retrying can't cure: the issuer rejects the batch itself, or does not know
/// the call.
fn is_permanent(error: &Error) -> bool {
    matches!(
        error,
        Error::Issuer {
            code: tonic::Code::InvalidArgument | tonic::Code::Unimplemented,
            ..
        }
    )
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(transaction_id: u16) -> RefusedRequest {
        RefusedRequest {
            device: "press-7".into(),
            peer: SpiffeId::new("spiffe://plant.example/historian").expect("valid"),
            function_code: 6,
            transaction_id,
            unit_id: 1,
        }
    }

    #[test]
    fn a_refusal_becomes_one_event_with_its_modbus_fields() {
        let (audit, mut reporter) = ProxyAudit::with_reporter(8);
        audit.refused(request(0x1234));
        reporter.take_queued();
        let batch = reporter.batch().expect("one event");
        assert_eq!(batch.events.len(), 1);
        let event = &batch.events[0];
        assert_eq!(event.kind, REQUEST_REFUSED);
        assert_eq!(event.device, "press-7");
        assert_eq!(event.peer_spiffe_id, "spiffe://plant.example/historian");
        assert_eq!(
            (event.function_code, event.transaction_id, event.unit_id),
            (6, 0x1234, 1)
        );
        assert!(event.at > 0);
        assert_eq!(event.count, 1);
    }

    #[test]
    fn a_full_queue_counts_what_it_drops_and_reports_the_count_once() {
        let (audit, mut reporter) = ProxyAudit::with_reporter(10);
        for id in 0..13 {
            audit.clone().refused(request(id));
        }
        reporter.take_queued();
        reporter.take_drops();
        let batch = reporter.batch().expect("events");
        assert_eq!(batch.events.len(), 11, "10 refusals and one summary");
        let ids: Vec<u32> = batch.events[..10]
            .iter()
            .map(|e| e.transaction_id)
            .collect();
        assert_eq!(ids, (0..10).collect::<Vec<u32>>(), "oldest first");
        let summary = &batch.events[10];
        assert_eq!((summary.kind.as_str(), summary.count), (EVENTS_DROPPED, 3));

        // Not accepted (issuer down): the same events again, with later drops added.
        audit.refused(request(99));
        reporter.take_queued();
        for id in 100..102 {
            audit.refused(request(id));
        }
        reporter.take_queued();
        reporter.take_drops();
        let again = reporter.batch().expect("events");
        assert_eq!(again.refused, 13);
        assert_eq!(again.drops, 3);

        reporter.acknowledge(again.refused, again.drops);
        assert!(reporter.idle(), "everything reported");
        assert!(reporter.batch().is_none());
    }

    #[test]
    fn batches_hold_at_most_max_batch_events_and_pending_is_bounded() {
        let (audit, mut reporter) = ProxyAudit::with_reporter(MAX_PENDING + 100);
        for id in 0..(MAX_PENDING + 100) {
            audit.refused(request(id as u16));
        }
        reporter.take_queued();
        assert_eq!(
            reporter.pending.len(),
            MAX_PENDING,
            "the rest waits in the queue"
        );
        let mut sent = 0;
        while let Some(batch) = reporter.batch() {
            assert!(batch.events.len() <= MAX_BATCH, "{}", batch.events.len());
            sent += batch.events.len();
            reporter.acknowledge(batch.refused, batch.drops);
            reporter.take_queued();
        }
        assert_eq!(sent, MAX_PENDING + 100);
    }

    #[test]
    fn a_summary_shares_a_batch_without_exceeding_the_limit() {
        let (audit, mut reporter) = ProxyAudit::with_reporter(MAX_BATCH);
        for id in 0..(MAX_BATCH + 5) {
            audit.refused(request(id as u16));
        }
        reporter.take_queued();
        reporter.take_drops();
        let batch = reporter.batch().expect("events");
        assert_eq!(batch.events.len(), MAX_BATCH);
        assert_eq!(batch.refused, MAX_BATCH - 1);
        assert_eq!(batch.events.last().map(|e| e.count), Some(5));
        reporter.acknowledge(batch.refused, batch.drops);
        let rest = reporter.batch().expect("the last refusal");
        assert_eq!((rest.events.len(), rest.drops), (1, 0));
    }
}
