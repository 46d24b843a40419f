//! The agent's side of an `Attest` stream, under the attestation's deadlines: the evidence
//! must arrive within `first_message_timeout` of the stream opening, and every message
//! within `attestation_timeout` of it. Without them an unauthenticated client holds a
//! stream (and whatever it half-sent) for as long as it keeps the connection open.

use std::time::Duration;

use proto::agent::AttestRequest;
use tokio::time::Instant;
use tonic::{Status, Streaming};

/// The inbound messages of one attestation.
#[derive(Debug)]
pub struct Inbound {
    stream: Streaming<AttestRequest>,
    opened: Instant,
    first_message_timeout: Duration,
    attestation_timeout: Duration,
    first: bool,
}

impl Inbound {
    /// `stream`, opened now, under these deadlines.
    pub fn new(
        stream: Streaming<AttestRequest>,
        first_message_timeout: Duration,
        attestation_timeout: Duration,
    ) -> Self {
        Self {
            stream,
            opened: Instant::now(),
            first_message_timeout,
            attestation_timeout,
            first: true,
        }
    }

    /// The next message; `None` when the agent closed its side; DEADLINE_EXCEEDED past
    /// a deadline.
    pub async fn message(&mut self) -> Result<Option<AttestRequest>, Status> {
        let first = std::mem::replace(&mut self.first, false);
        let whole = self.opened + self.attestation_timeout;
        let deadline = if first {
            whole.min(self.opened + self.first_message_timeout)
        } else {
            whole
        };
        match tokio::time::timeout_at(deadline, self.stream.message()).await {
            Ok(message) => message,
            Err(_) if first => Err(Status::deadline_exceeded(format!(
                "no evidence within {} s of opening the attestation; send Evidence at once",
                self.first_message_timeout.as_secs_f32()
            ))),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the attestation did not finish within {} s",
                self.attestation_timeout.as_secs_f32()
            ))),
        }
    }
}
