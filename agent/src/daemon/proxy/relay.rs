//! Moving a session's bytes: as they come (tcp, and every outbound proxy), or frame by frame
//! with each Modbus request's function code checked against the peer's access.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use super::modbus::{self, Access, Frame, FrameError};

/// How long the rest of a session may take once one side has closed its sending half: the
/// other may still owe a response.
const HALF_CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Read buffer per direction: Modbus frames are at most 260 bytes, but tcp proxies may carry
/// bulk transfers.
const BUFFER: usize = 16 * 1024;

/// Bytes and refusals of one session, readable while it runs and after it ends however it
/// ends; and when either side last sent something, for the idle timeout.
#[derive(Debug)]
pub struct Traffic {
    /// From the peer (or legacy client) towards the PLC (or gateway).
    pub sent: AtomicU64,
    /// Back.
    pub received: AtomicU64,
    /// Modbus requests refused.
    pub refused: AtomicU64,
    /// When the session started.
    started: Instant,
    /// Milliseconds after `started` of the last bytes read from either side.
    last_active_ms: AtomicU64,
}

impl Default for Traffic {
    fn default() -> Self {
        Self {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            started: Instant::now(),
            last_active_ms: AtomicU64::new(0),
        }
    }
}

impl Traffic {
    fn add(counter: &AtomicU64, n: usize) {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Notes that one side sent something.
    fn touch(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_active_ms.fetch_max(now, Ordering::Relaxed);
    }

    /// How long neither side has sent anything.
    fn idle_for(&self) -> Duration {
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// Resolves once neither side of the session has sent anything for `timeout`: a session
/// that idles holds a slot and a connection to the PLC, so it is ended (SCADA polls every
/// few seconds; a client that went away without a FIN never sends again).
pub async fn idle(traffic: &Traffic, timeout: Duration) {
    loop {
        let idle = traffic.idle_for();
        if idle >= timeout {
            return;
        }
        tokio::time::sleep(timeout - idle).await;
    }
}

/// How a session ended.
#[derive(Debug)]
pub enum End {
    /// The peer closed; the PLC answered what it owed.
    Closed,
    /// The PLC (or gateway) closed the connection.
    UpstreamClosed,
    /// Bytes that are not Modbus/TCP; `from_peer` says which side sent them.
    Malformed {
        /// Whether the peer sent them (else the PLC did).
        from_peer: bool,
        /// What was wrong.
        error: FrameError,
    },
    /// A read or write failed.
    Io(std::io::Error),
}

impl std::fmt::Display for End {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("closed by the peer"),
            Self::UpstreamClosed => f.write_str("closed by the upstream"),
            Self::Malformed { from_peer, error } => write!(
                f,
                "malformed Modbus/TCP frame from the {}: {error}",
                if *from_peer { "peer" } else { "PLC" }
            ),
            Self::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

async fn copy<R, W>(
    from: &mut R,
    to: &mut W,
    traffic: &Traffic,
    counter: &AtomicU64,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buffer = vec![0; BUFFER];
    loop {
        let n = from.read(&mut buffer).await?;
        if n == 0 {
            // Pass the half-close on: the other side learns nothing more is coming.
            return to.shutdown().await;
        }
        traffic.touch();
        to.write_all(&buffer[..n]).await?;
        to.flush().await?;
        Traffic::add(counter, n);
    }
}

/// Relays bytes both ways until both sides have closed (or one fails). After one side's
/// half-close, the other direction gets [`HALF_CLOSE_GRACE`] to finish.
pub async fn bytes<P, U>(peer: P, upstream: U, traffic: &Traffic) -> End
where
    P: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut peer_read, mut peer_write) = tokio::io::split(peer);
    let (mut up_read, mut up_write) = tokio::io::split(upstream);
    let sending = copy(&mut peer_read, &mut up_write, traffic, &traffic.sent);
    let receiving = copy(&mut up_read, &mut peer_write, traffic, &traffic.received);
    tokio::pin!(sending, receiving);
    tokio::select! {
        sent = &mut sending => match sent {
            Err(e) => End::Io(e),
            Ok(()) => match tokio::time::timeout(HALF_CLOSE_GRACE, receiving).await {
                Ok(Err(e)) => End::Io(e),
                _ => End::Closed,
            },
        },
        received = &mut receiving => match received {
            Err(e) => End::Io(e),
            Ok(()) => match tokio::time::timeout(HALF_CLOSE_GRACE, sending).await {
                Ok(Err(e)) => End::Io(e),
                _ => End::UpstreamClosed,
            },
        },
    }
}

/// Why the Modbus relay refused a request.
#[derive(Debug, Clone, Copy)]
pub enum Refusal<'a> {
    /// Its function code is not permitted to the peer; it was answered with exception 01.
    Function,
    /// Its PDU is not the length its function code prescribes; the session is closed.
    Malformed(&'a FrameError),
}

/// What the Modbus relay tells its caller about a refused request.
pub type OnRefused<'a> = &'a (dyn Fn(&Frame, Refusal<'_>) + Send + Sync);

/// Relays Modbus/TCP between a peer with `access` and the PLC. A request the access does not
/// permit is not forwarded: the peer gets an illegal-function exception in its place, and
/// `on_refused` hears of it. A request whose length does not fit its function code is not
/// forwarded either: `on_refused` hears of it and the session ends, as it does at the first
/// framing error from either side.
pub async fn modbus<P, U>(
    peer: P,
    plc: U,
    access: Access,
    traffic: &Traffic,
    on_refused: OnRefused<'_>,
) -> End
where
    P: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut peer_read, mut peer_write) = tokio::io::split(peer);
    let (mut plc_read, mut plc_write) = tokio::io::split(plc);
    // Exceptions go to the peer through the response side, which writes whole frames
    // only, so one is never spliced into the middle of a PLC response. Bounded: a peer that
    // floods refused requests is slowed to the pace it reads its answers.
    let (exceptions, mut pending) = mpsc::channel::<[u8; 9]>(64);
    let requests = async {
        let mut buffer = Vec::with_capacity(BUFFER);
        let mut chunk = vec![0; BUFFER];
        loop {
            let n = peer_read.read(&mut chunk).await.map_err(End::Io)?;
            if n == 0 {
                plc_write.shutdown().await.map_err(End::Io)?;
                return Ok::<_, End>(());
            }
            traffic.touch();
            buffer.extend_from_slice(&chunk[..n]);
            let mut offset = 0;
            let mut forward: Option<Vec<u8>> = None;
            loop {
                let frame = match modbus::frame(&buffer[offset..]) {
                    Ok(Some(frame)) => frame,
                    Ok(None) => break,
                    Err(error) => {
                        return Err(End::Malformed {
                            from_peer: true,
                            error,
                        })
                    }
                };
                let bytes = &buffer[offset..offset + frame.len];
                if let Err(error) = modbus::check_request(&frame, bytes) {
                    // Nothing of this frame is forwarded; whole frames before it in this
                    // read were not sent yet either, and the session ends here.
                    traffic.refused.fetch_add(1, Ordering::Relaxed);
                    on_refused(&frame, Refusal::Malformed(&error));
                    return Err(End::Malformed {
                        from_peer: true,
                        error,
                    });
                }
                if access.permits(frame.function) {
                    if let Some(out) = forward.as_mut() {
                        out.extend_from_slice(bytes);
                    }
                } else {
                    // From here on the permitted frames are copied out one by one; before,
                    // they are still a prefix of `buffer` and are written from there.
                    forward.get_or_insert_with(|| buffer[..offset].to_vec());
                    traffic.refused.fetch_add(1, Ordering::Relaxed);
                    on_refused(&frame, Refusal::Function);
                    if exceptions
                        .send(modbus::exception(&frame, modbus::ILLEGAL_FUNCTION))
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
                offset += frame.len;
            }
            let out = forward.as_deref().unwrap_or(&buffer[..offset]);
            if !out.is_empty() {
                plc_write.write_all(out).await.map_err(End::Io)?;
                plc_write.flush().await.map_err(End::Io)?;
                Traffic::add(&traffic.sent, out.len());
            }
            buffer.drain(..offset);
        }
    };
    let responses = async {
        let mut buffer = Vec::with_capacity(BUFFER);
        let mut chunk = vec![0; BUFFER];
        loop {
            tokio::select! {
                read = plc_read.read(&mut chunk) => {
                    let n = read.map_err(End::Io)?;
                    if n == 0 {
                        let _ = peer_write.shutdown().await;
                        return Err::<(), _>(End::UpstreamClosed);
                    }
                    traffic.touch();
                    buffer.extend_from_slice(&chunk[..n]);
                    let mut whole = 0;
                    loop {
                        match modbus::frame(&buffer[whole..]) {
                            Ok(Some(frame)) => whole += frame.len,
                            Ok(None) => break,
                            Err(error) => return Err(End::Malformed { from_peer: false, error }),
                        }
                    }
                    if whole > 0 {
                        peer_write.write_all(&buffer[..whole]).await.map_err(End::Io)?;
                        peer_write.flush().await.map_err(End::Io)?;
                        Traffic::add(&traffic.received, whole);
                        buffer.drain(..whole);
                    }
                }
                Some(exception) = pending.recv() => {
                    peer_write.write_all(&exception).await.map_err(End::Io)?;
                    peer_write.flush().await.map_err(End::Io)?;
                }
            }
        }
    };
    tokio::pin!(requests, responses);
    tokio::select! {
        sent = &mut requests => match sent {
            Err(end) => end,
            // The peer is done sending; the PLC may still owe answers.
            Ok(()) => match tokio::time::timeout(HALF_CLOSE_GRACE, responses).await {
                Ok(Err(End::UpstreamClosed)) | Err(_) => End::Closed,
                Ok(Err(end)) => end,
                Ok(Ok(())) => End::Closed,
            },
        },
        received = &mut responses => match received {
            Err(end) => end,
            Ok(()) => End::UpstreamClosed,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use tokio::io::duplex;

    fn request(transaction: u16, pdu: &[u8]) -> Vec<u8> {
        let mut bytes = transaction.to_be_bytes().to_vec();
        bytes.extend([0, 0]);
        bytes.extend(u16::try_from(pdu.len() + 1).expect("short").to_be_bytes());
        bytes.push(1);
        bytes.extend(pdu);
        bytes
    }

    /// A PLC that echoes each request frame back as its response.
    async fn echo_plc(mut plc: tokio::io::DuplexStream) {
        let mut buffer = Vec::new();
        let mut chunk = [0; 512];
        while let Ok(n) = plc.read(&mut chunk).await {
            if n == 0 {
                return;
            }
            buffer.extend_from_slice(&chunk[..n]);
            while let Ok(Some(frame)) = modbus::frame(&buffer) {
                let _ = plc.write_all(&buffer[..frame.len]).await;
                buffer.drain(..frame.len);
            }
        }
    }

    #[tokio::test]
    async fn a_refused_write_gets_an_exception_in_order_and_the_read_after_it_passes() {
        let (mut client, peer) = duplex(4096);
        let (plc, plc_end) = duplex(4096);
        tokio::spawn(echo_plc(plc_end));
        let traffic = Traffic::default();
        let refused = Mutex::new(Vec::new());
        let on_refused = |frame: &Frame, _: Refusal<'_>| {
            refused.lock().expect("lock").push(frame.transaction_id)
        };
        let relay = modbus(peer, plc, Access::ReadOnly, &traffic, &on_refused);
        let read = request(1, &[3, 0, 0, 0, 2]);
        let write = request(2, &[6, 0, 5, 0, 9]);
        let read_again = request(3, &[4, 0, 0, 0, 1]);
        let client_side = async {
            // All three in one write, split in odd places to exercise reassembly.
            let all = [read.clone(), write.clone(), read_again.clone()].concat();
            for piece in all.chunks(5) {
                client.write_all(piece).await.expect("write");
            }
            let mut answers = vec![0; read.len() + 9 + read_again.len()];
            client.read_exact(&mut answers).await.expect("answers");
            client.shutdown().await.expect("shutdown");
            answers
        };
        let (end, answers) = tokio::join!(relay, client_side);
        assert!(matches!(end, End::Closed), "{end}");
        // The exception may come before or after the first read's echo, but frames are whole.
        let mut frames = Vec::new();
        let mut rest = &answers[..];
        while let Ok(Some(frame)) = modbus::frame(rest) {
            frames.push((frame.transaction_id, rest[..frame.len].to_vec()));
            rest = &rest[frame.len..];
        }
        assert!(rest.is_empty());
        frames.sort();
        assert_eq!(frames[0].1, read);
        assert_eq!(frames[1].1, [0, 2, 0, 0, 0, 3, 1, 0x86, 1]);
        assert_eq!(frames[2].1, read_again);
        assert_eq!(*refused.lock().expect("lock"), [2]);
        assert_eq!(traffic.refused.load(Ordering::Relaxed), 1);
        assert_eq!(
            traffic.sent.load(Ordering::Relaxed),
            (read.len() + read_again.len()) as u64
        );
    }

    #[tokio::test]
    async fn a_bad_length_ends_the_session_without_forwarding_it() {
        let (mut client, peer) = duplex(4096);
        let (plc, mut plc_end) = duplex(4096);
        let traffic = Traffic::default();
        let relay = modbus(peer, plc, Access::ReadWrite, &traffic, &|_, _| {});
        let mut bad = request(1, &[3, 0, 0, 0, 2]);
        bad[4..6].copy_from_slice(&300u16.to_be_bytes());
        client.write_all(&bad).await.expect("write");
        let end = relay.await;
        assert!(
            matches!(
                end,
                End::Malformed {
                    from_peer: true,
                    error: FrameError::Length(300)
                }
            ),
            "{end}"
        );
        drop(client);
        let mut got = Vec::new();
        plc_end.read_to_end(&mut got).await.expect("read");
        assert!(got.is_empty(), "nothing reached the PLC");
    }

    #[tokio::test]
    async fn a_write_smuggled_inside_a_read_is_refused_and_never_forwarded() {
        let (mut client, peer) = duplex(4096);
        let (plc, mut plc_end) = duplex(4096);
        let traffic = Traffic::default();
        let refused = Mutex::new(Vec::new());
        let on_refused = |frame: &Frame, why: Refusal<'_>| {
            refused
                .lock()
                .expect("lock")
                .push((frame.function, matches!(why, Refusal::Malformed(_))));
        };
        let relay = modbus(peer, plc, Access::ReadOnly, &traffic, &on_refused);
        let write = request(2, &[6, 0, 5, 0x03, 0xe7]);
        let smuggled = request(1, &[&[3u8, 0, 5, 0, 1][..], &write].concat());
        client.write_all(&smuggled).await.expect("write");
        let end = relay.await;
        assert!(
            matches!(
                end,
                End::Malformed {
                    from_peer: true,
                    error: FrameError::PduLength { function: 3, .. }
                }
            ),
            "{end}"
        );
        assert_eq!(*refused.lock().expect("lock"), [(3, true)]);
        drop(client);
        let mut got = Vec::new();
        plc_end.read_to_end(&mut got).await.expect("read");
        assert!(got.is_empty(), "nothing reached the PLC: {got:?}");
    }

    #[tokio::test]
    async fn bytes_pass_both_ways_and_are_counted() {
        let (mut client, peer) = duplex(64);
        let (up, up_end) = duplex(64);
        let traffic = Traffic::default();
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(up_end);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
        let relay = bytes(peer, up, &traffic);
        let client_side = async {
            let data: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
            let (mut r, mut w) = tokio::io::split(&mut client);
            let write = async {
                w.write_all(&data).await.expect("write");
                w.shutdown().await.expect("shutdown");
            };
            let mut back = Vec::new();
            let read = r.read_to_end(&mut back);
            let (_, read) = tokio::join!(write, read);
            read.expect("read");
            assert_eq!(back, data);
        };
        let (end, ()) = tokio::join!(relay, client_side);
        assert!(matches!(end, End::Closed | End::UpstreamClosed), "{end}");
        assert_eq!(traffic.sent.load(Ordering::Relaxed), 10_000);
        assert_eq!(traffic.received.load(Ordering::Relaxed), 10_000);
    }
}
