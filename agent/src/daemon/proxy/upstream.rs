//! Connecting to what a proxy forwards to (the PLC, or the remote gateway), rate-limited
//! after failures.
//!
//! When a PLC reboots, every SCADA client reconnects at once and keeps retrying; forwarding
//! each attempt would hammer a device that is still starting. After a failed connect the
//! upstream is "down": clients are closed at once without a connect for a back-off that
//! doubles up to [`MAX_BACKOFF`]; then one client's connect probes it while the others are
//! still closed, and the first success lets everyone through again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

/// The first back-off after a failure.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest back-off.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Why no connection was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unreachable {
    /// This attempt failed.
    Failed(String),
    /// Not tried: the last attempt failed and the back-off runs for this long yet (or
    /// another client's probe is under way).
    BackingOff(Duration),
}

impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Failed(e) => f.write_str(e),
            Self::BackingOff(left) => write!(
                f,
                "unreachable at the last attempt; not trying again for {} ms",
                left.as_millis()
            ),
        }
    }
}

#[derive(Debug, Default)]
struct Health {
    failures: u32,
    retry_at: Option<Instant>,
    probing: bool,
}

/// One upstream address and its health.
#[derive(Debug)]
pub struct Upstream {
    address: String,
    timeout: Duration,
    health: Mutex<Health>,
}

impl Upstream {
    /// `address` is `host:port`, resolved at each attempt.
    pub fn new(address: String, timeout: Duration) -> Self {
        Self {
            address,
            timeout,
            health: Mutex::new(Health::default()),
        }
    }

    /// The address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// A connection with TCP_NODELAY (Modbus is request/response: Nagle would add up to
    /// 40 ms to each), unless the upstream is backing off.
    pub async fn connect(&self) -> Result<TcpStream, Unreachable> {
        self.admit(Instant::now())?;
        let outcome =
            match tokio::time::timeout(self.timeout, TcpStream::connect(&self.address)).await {
                Ok(Ok(stream)) => stream
                    .set_nodelay(true)
                    .map(|()| stream)
                    .map_err(|e| e.to_string()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
            };
        self.record(outcome.is_ok(), Instant::now());
        outcome.map_err(|e| Unreachable::Failed(format!("connecting to {}: {e}", self.address)))
    }

    /// Whether an attempt may be made now; claims the probe when the upstream is down.
    fn admit(&self, now: Instant) -> Result<(), Unreachable> {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let Some(retry_at) = health.retry_at else {
            return Ok(());
        };
        if now < retry_at {
            return Err(Unreachable::BackingOff(retry_at - now));
        }
        if health.probing {
            return Err(Unreachable::BackingOff(Duration::ZERO));
        }
        health.probing = true;
        Ok(())
    }

    fn record(&self, ok: bool, now: Instant) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.probing = false;
        if ok {
            if health.failures > 0 {
                tracing::info!(upstream = %self.address, failures = health.failures, "upstream reachable again");
            }
            *health = Health::default();
            return;
        }
        health.failures = health.failures.saturating_add(1);
        let backoff = FIRST_BACKOFF
            .saturating_mul(1 << health.failures.saturating_sub(1).min(8))
            .min(MAX_BACKOFF);
        health.retry_at = Some(now + backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_back_off_doubling_and_one_probe_goes_at_a_time() {
        let upstream = Upstream::new("127.0.0.1:1".into(), Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(upstream.admit(t0), Ok(()));
        upstream.record(false, t0);
        assert_eq!(
            upstream.admit(t0),
            Err(Unreachable::BackingOff(FIRST_BACKOFF))
        );
        let t1 = t0 + FIRST_BACKOFF;
        assert_eq!(upstream.admit(t1), Ok(()), "the probe");
        assert!(
            matches!(upstream.admit(t1), Err(Unreachable::BackingOff(_))),
            "everyone else waits for the probe"
        );
        upstream.record(false, t1);
        assert_eq!(
            upstream.admit(t1),
            Err(Unreachable::BackingOff(FIRST_BACKOFF * 2))
        );
        let mut t = t1;
        for _ in 0..20 {
            t += MAX_BACKOFF;
            assert_eq!(upstream.admit(t), Ok(()));
            upstream.record(false, t);
        }
        assert_eq!(upstream.admit(t), Err(Unreachable::BackingOff(MAX_BACKOFF)));
        t += MAX_BACKOFF;
        assert_eq!(upstream.admit(t), Ok(()));
        upstream.record(true, t);
        assert_eq!(upstream.admit(t), Ok(()));
        assert_eq!(upstream.admit(t), Ok(()), "healthy: no probe limit");
    }

    #[tokio::test]
    async fn a_closed_port_fails_with_the_address_and_then_backs_off() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        drop(listener);
        let upstream = Upstream::new(address.clone(), Duration::from_secs(2));
        match upstream.connect().await {
            Err(Unreachable::Failed(e)) => assert!(e.contains(&address), "{e}"),
            other => panic!("expected a failure, got {other:?}"),
        }
        assert!(matches!(
            upstream.connect().await,
            Err(Unreachable::BackingOff(_))
        ));
    }
}
