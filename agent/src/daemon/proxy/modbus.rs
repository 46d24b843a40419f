//! Modbus/TCP as the inbound proxy sees it: MBAP-framed requests from peers, the function
//! code policy, and the exception response a refused request gets (Modbus Application
//! Protocol v1.1b3 §4.1, §7; Modbus Messaging on TCP/IP v1.0b §3.1.3).
//!
//! Only framing and the function code are read; the PLC validates everything else, as it
//! would without the proxy. Framing is checked in both directions so the proxy can insert
//! an exception response between two whole responses, never inside one.

use std::fmt;

/// The MBAP header: transaction id, protocol id, length, unit id.
pub const HEADER_LEN: usize = 7;

/// The largest ADU: a 7-byte header and a 253-byte PDU (the function code is counted in
/// both, so the length field is at most 254).
pub const MAX_FRAME: usize = 260;

/// `length` counts the unit id and the PDU; a PDU is at least a function code.
const MIN_LENGTH: usize = 2;
const MAX_LENGTH: usize = MAX_FRAME - HEADER_LEN + 1;

/// Exception code 01, ILLEGAL FUNCTION.
pub const ILLEGAL_FUNCTION: u8 = 0x01;

/// What a peer may do to the PLC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Function codes 1–4: read coils, discrete inputs, holding and input registers.
    ReadOnly,
    /// Also 5, 6, 15, 16, 22, 23: the writes.
    ReadWrite,
}

/// Reads: coils, discrete inputs, holding registers, input registers.
const READS: [u8; 4] = [1, 2, 3, 4];
/// Write single coil/register, write multiple coils/registers, mask write, read/write
/// multiple registers (23 writes, so it is a write).
const WRITES: [u8; 6] = [5, 6, 15, 16, 22, 23];

impl Access {
    /// Parses the `access` value of an allow rule.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "read-only" => Ok(Self::ReadOnly),
            "read-write" => Ok(Self::ReadWrite),
            other => Err(format!(
                "{other:?} is not an access level: use \"read-only\" (function codes 1-4) or \"read-write\" (also 5, 6, 15, 16, 22, 23)"
            )),
        }
    }

    /// Whether a request with `function` passes. Everything outside the two lists
    /// (diagnostics, file records, device identification, programming) is refused: those
    /// are how an old PLC gets stopped or reprogrammed.
    pub fn permits(self, function: u8) -> bool {
        READS.contains(&function) || (self == Self::ReadWrite && WRITES.contains(&function))
    }
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ReadOnly => "read-only",
            Self::ReadWrite => "read-write",
        })
    }
}

/// Why bytes are not a Modbus/TCP frame. The session is closed: after a framing error
/// there is no telling where the next frame starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The protocol identifier must be 0 (Modbus).
    #[error("protocol identifier {0} is not 0 (Modbus): not Modbus/TCP")]
    Protocol(u16),
    /// The length field is outside 2..=254.
    #[error("length field {0} is outside 2..=254 (a frame is at most 260 bytes)")]
    Length(u16),
    /// A request whose PDU is not the length its function code and quantities make it: the
    /// extra bytes would reach the PLC unchecked (a second request smuggled inside a read).
    #[error("function code {function}: the PDU is {length} bytes, the request it announces takes {expected}; each frame must hold exactly one request")]
    PduLength {
        /// The function code.
        function: u8,
        /// PDU bytes in the frame (function code included).
        length: usize,
        /// PDU bytes the request takes.
        expected: usize,
    },
    /// A write-multiple request whose byte count disagrees with its quantity.
    #[error("function code {function}: byte count {byte_count} does not match the quantity written ({expected} bytes)")]
    ByteCount {
        /// The function code.
        function: u8,
        /// The byte count field.
        byte_count: u8,
        /// Bytes the quantity takes.
        expected: usize,
    },
}

/// One whole frame's header facts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// The transaction identifier, echoed in the response.
    pub transaction_id: u16,
    /// The unit identifier (the PLC's slave address behind a serial gateway), echoed too.
    pub unit_id: u8,
    /// The function code.
    pub function: u8,
    /// Bytes of the whole frame, header included.
    pub len: usize,
}

/// The frame at the start of `bytes`: `Ok(None)` until it is all there.
pub fn frame(bytes: &[u8]) -> Result<Option<Frame>, FrameError> {
    if bytes.len() < HEADER_LEN {
        return Ok(None);
    }
    let protocol = u16::from_be_bytes([bytes[2], bytes[3]]);
    if protocol != 0 {
        return Err(FrameError::Protocol(protocol));
    }
    let length = u16::from_be_bytes([bytes[4], bytes[5]]);
    if !(MIN_LENGTH..=MAX_LENGTH).contains(&usize::from(length)) {
        return Err(FrameError::Length(length));
    }
    let len = HEADER_LEN - 1 + usize::from(length);
    if bytes.len() < len {
        return Ok(None);
    }
    Ok(Some(Frame {
        transaction_id: u16::from_be_bytes([bytes[0], bytes[1]]),
        unit_id: bytes[6],
        function: bytes[7],
        len,
    }))
}

/// Checks that the request `bytes` (the whole frame `frame` was read from) holds exactly
/// the PDU its function code prescribes (Modbus Application Protocol v1.1b3 §6): fixed
/// lengths for 1–6 and 22, header plus byte count for 15, 16 and 23, the byte count matching
/// the quantity. Other function codes are never forwarded, so their length is not judged.
pub fn check_request(frame: &Frame, bytes: &[u8]) -> Result<(), FrameError> {
    let pdu = bytes.get(HEADER_LEN..frame.len).unwrap_or_default();
    let quantity = |at: usize| {
        pdu.get(at..at + 2)
            .map(|q| usize::from(u16::from_be_bytes([q[0], q[1]])))
    };
    // (expected PDU length, where the byte count is and the bytes it must say), or the
    // shortest PDU the function code allows when even the quantity is missing.
    let (expected, byte_count) = match frame.function {
        1..=6 => (5, None),
        22 => (7, None),
        15 => match quantity(3) {
            Some(q) => (6 + q.div_ceil(8), Some((5, q.div_ceil(8)))),
            None => (6, None),
        },
        16 => match quantity(3) {
            Some(q) => (6 + 2 * q, Some((5, 2 * q))),
            None => (6, None),
        },
        23 => match quantity(7) {
            Some(q) => (10 + 2 * q, Some((9, 2 * q))),
            None => (10, None),
        },
        _ => return Ok(()),
    };
    if pdu.len() != expected {
        return Err(FrameError::PduLength {
            function: frame.function,
            length: pdu.len(),
            expected,
        });
    }
    if let Some((at, bytes)) = byte_count {
        let count = pdu[at];
        if usize::from(count) != bytes {
            return Err(FrameError::ByteCount {
                function: frame.function,
                byte_count: count,
                expected: bytes,
            });
        }
    }
    Ok(())
}

/// The exception response to `request`: same transaction and unit, function | 0x80, `code`.
pub fn exception(request: &Frame, code: u8) -> [u8; 9] {
    let [t0, t1] = request.transaction_id.to_be_bytes();
    [
        t0,
        t1,
        0,
        0,
        0,
        3,
        request.unit_id,
        request.function | 0x80,
        code,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(transaction: u16, unit: u8, pdu: &[u8]) -> Vec<u8> {
        let mut bytes = transaction.to_be_bytes().to_vec();
        bytes.extend([0, 0]);
        bytes.extend(
            u16::try_from(pdu.len() + 1)
                .expect("short pdu")
                .to_be_bytes(),
        );
        bytes.push(unit);
        bytes.extend(pdu);
        bytes
    }

    #[test]
    fn read_only_permits_reads_and_read_write_the_writes_too() {
        for function in 0..=255u8 {
            let read = (1..=4).contains(&function);
            let write = [5, 6, 15, 16, 22, 23].contains(&function);
            assert_eq!(Access::ReadOnly.permits(function), read, "{function}");
            assert_eq!(
                Access::ReadWrite.permits(function),
                read || write,
                "{function}"
            );
        }
        assert_eq!(Access::parse("read-only"), Ok(Access::ReadOnly));
        assert_eq!(Access::parse("read-write"), Ok(Access::ReadWrite));
        assert!(Access::parse("rw").expect_err("typo").contains("read-only"));
    }

    #[test]
    fn frames_are_found_whole_and_only_whole() {
        // Read holding registers 0..10 from unit 1.
        let bytes = request(0x1234, 1, &[3, 0, 0, 0, 10]);
        for cut in 0..bytes.len() {
            assert_eq!(frame(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
        let found = frame(&bytes).expect("valid").expect("whole");
        assert_eq!(
            found,
            Frame {
                transaction_id: 0x1234,
                unit_id: 1,
                function: 3,
                len: 12
            }
        );
        let mut two = bytes.clone();
        two.extend(request(7, 2, &[6, 0, 1, 0, 2]));
        assert_eq!(frame(&two).expect("valid").expect("whole").len, 12);
    }

    #[test]
    fn bad_headers_are_errors_at_once() {
        let mut wrong_protocol = request(1, 1, &[3, 0, 0, 0, 1]);
        wrong_protocol[3] = 1;
        assert_eq!(frame(&wrong_protocol), Err(FrameError::Protocol(1)));
        // Known as soon as the header is in, without waiting for a body that never ends.
        for length in [0u16, 1, 255, 0xffff] {
            let mut header = request(1, 1, &[3]);
            header[4..6].copy_from_slice(&length.to_be_bytes());
            assert_eq!(
                frame(&header[..HEADER_LEN]),
                Err(FrameError::Length(length))
            );
        }
        // The largest legal frame.
        let big = request(1, 1, &[16; 253]);
        assert_eq!(big.len(), MAX_FRAME);
        assert_eq!(frame(&big).expect("valid").expect("whole").len, MAX_FRAME);
    }

    fn checked(pdu: &[u8]) -> Result<(), FrameError> {
        let bytes = request(1, 1, pdu);
        let found = frame(&bytes).expect("valid").expect("whole");
        check_request(&found, &bytes)
    }

    #[test]
    fn each_request_is_exactly_as_long_as_its_function_code_says() {
        // Well-formed requests of every permitted function code.
        let good: [&[u8]; 10] = [
            &[1, 0, 0, 0, 8],
            &[2, 0, 0, 0, 8],
            &[3, 0, 0, 0, 10],
            &[4, 0, 0, 0, 1],
            &[5, 0, 3, 0xff, 0],
            &[6, 0, 5, 4, 210],
            &[15, 0, 0, 0, 10, 2, 0xff, 0x03],
            &[16, 0, 20, 0, 2, 4, 0, 7, 0, 8],
            &[22, 0, 4, 0, 0xf2, 0, 0x25],
            &[23, 0, 0, 0, 2, 0, 9, 0, 1, 2, 0, 5],
        ];
        for pdu in good {
            assert_eq!(checked(pdu), Ok(()), "{pdu:?}");
        }
        // A read whose MBAP length also covers a whole write request (the smuggling attack).
        let write = request(2, 1, &[6, 0, 5, 0x03, 0xe7]);
        let smuggled = [&[3u8, 0, 5, 0, 1][..], &write].concat();
        assert_eq!(
            checked(&smuggled),
            Err(FrameError::PduLength {
                function: 3,
                length: 17,
                expected: 5
            })
        );
        assert!(matches!(
            checked(&[6, 0, 5, 0]),
            Err(FrameError::PduLength { expected: 5, .. })
        ));
        assert!(matches!(
            checked(&[16, 0, 20, 0, 2, 4, 0, 7, 0, 8, 6, 0, 1, 0, 1]),
            Err(FrameError::PduLength { expected: 10, .. })
        ));
        assert!(matches!(
            checked(&[16, 0, 20]),
            Err(FrameError::PduLength { expected: 6, .. })
        ));
        assert_eq!(
            checked(&[16, 0, 20, 0, 1, 4, 0, 7]),
            Err(FrameError::ByteCount {
                function: 16,
                byte_count: 4,
                expected: 2
            })
        );
        // Codes that are never forwarded are refused by function, not judged by length.
        assert_eq!(checked(&[8, 0, 0, 0, 0, 1, 2, 3]), Ok(()));
    }

    #[test]
    fn the_exception_echoes_transaction_and_unit() {
        let write = frame(&request(0xbeef, 17, &[6, 0, 5, 4, 210]))
            .expect("valid")
            .expect("whole");
        let answer = exception(&write, ILLEGAL_FUNCTION);
        assert_eq!(answer, [0xbe, 0xef, 0, 0, 0, 3, 17, 0x86, 1]);
        let parsed = frame(&answer).expect("valid").expect("whole");
        assert_eq!(parsed.transaction_id, 0xbeef);
        assert_eq!(parsed.len, answer.len());
    }
}
