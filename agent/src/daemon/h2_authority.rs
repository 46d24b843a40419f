//! The HTTP/2 `:authority` that gRPC clients send over a Unix socket.
//!
//! gRPC's C core (py-spiffe, and every grpcio-based workload), grpc-java and older grpc-go
//! send the socket's *path* as `:authority` when they dial `unix:/run/…/workload.sock`. The
//! `h2` crate under tonic checks `:authority` against RFC 3986, finds the `/`, and resets
//! the stream with PROTOCOL_ERROR before the Workload API sees the request (hyperium/h2
//! #442, #487; unfixed). A SPIFFE agent must serve those clients, so every request header
//! block a Workload API client sends passes through [`AuthorityRewriter`]: a block whose
//! `:authority` is not a valid URI authority gets `localhost` instead, the convention for
//! Unix sockets. Nothing else in the byte stream changes.
//!
//! HPACK (RFC 7541) is stateful: a header block may add to the peer's dynamic table, and
//! later blocks refer to it. So the rewriter decodes *every* block with its own decoder (the
//! client's view of the table) and re-encodes every block as literals that refer to no table
//! at all, which `h2` decodes whatever its table holds.

use loona_hpack::Decoder;

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Frame header size (RFC 9113 §4.1).
const FRAME_HEADER: usize = 9;
/// Largest frame accepted from a client. h2 advertises 16 KiB and refuses more itself; this
/// only bounds what the rewriter buffers before h2 gets to say so.
const MAX_FRAME: usize = 1 << 20;
/// Largest frame payload the rewriter emits: SETTINGS_MAX_FRAME_SIZE's initial value, which
/// every HTTP/2 server accepts.
const EMIT_FRAME: usize = 16_384;
/// Largest header block accepted (all fragments together).
const MAX_BLOCK: usize = 64 * 1024;
/// The dynamic table size h2 advertises (SETTINGS_HEADER_TABLE_SIZE default, RFC 9113 §6.5.2):
/// the most a client's encoder may use.
const TABLE_SIZE: usize = 4096;
/// Frame types and flags (RFC 9113 §6.2, §6.10).
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Why a client's bytes could not be carried on; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthorityError {
    /// The connection did not start with the HTTP/2 preface.
    #[error("not an HTTP/2 connection (no client preface)")]
    Preface,
    /// A frame longer than any server accepts.
    #[error("HTTP/2 frame of {0} bytes is too large")]
    FrameTooLarge(usize),
    /// A header block over 64 KiB.
    #[error("HTTP/2 header block too large")]
    BlockTooLarge,
    /// A HEADERS frame whose padding or priority fields do not fit in it, or a CONTINUATION
    /// without a HEADERS before it, or another frame in the middle of a header block.
    #[error("malformed HTTP/2 header frames")]
    Framing,
    /// The header block is not valid HPACK.
    #[error("header block is not valid HPACK")]
    Hpack,
}

/// A header block being collected from HEADERS + CONTINUATION frames.
#[derive(Debug)]
struct OpenBlock {
    stream_id: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragments: Vec<u8>,
}

/// Rewrites invalid `:authority` values in the client-to-server direction of one HTTP/2
/// connection. Feed it the bytes as they arrive, in any pieces.
pub struct AuthorityRewriter {
    decoder: Decoder<'static>,
    input: Vec<u8>,
    preface_seen: usize,
    block: Option<OpenBlock>,
}

impl std::fmt::Debug for AuthorityRewriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityRewriter")
            .field("buffered", &self.input.len())
            .field("in_block", &self.block.is_some())
            .finish_non_exhaustive()
    }
}

impl Default for AuthorityRewriter {
    fn default() -> Self {
        Self::new()
    }
}

impl AuthorityRewriter {
    /// A rewriter for a new connection.
    pub fn new() -> Self {
        let mut decoder = Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            decoder,
            input: Vec::new(),
            preface_seen: 0,
            block: None,
        }
    }

    /// Takes the next bytes from the client and appends what the server should see to `out`.
    /// Bytes of an incomplete frame are held until the rest arrives.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let mut bytes = bytes;
        if self.preface_seen < PREFACE.len() {
            let take = bytes.len().min(PREFACE.len() - self.preface_seen);
            if bytes[..take] != PREFACE[self.preface_seen..self.preface_seen + take] {
                return Err(AuthorityError::Preface);
            }
            out.extend_from_slice(&bytes[..take]);
            self.preface_seen += take;
            bytes = &bytes[take..];
        }
        self.input.extend_from_slice(bytes);
        let mut start = 0;
        while self.input.len() - start >= FRAME_HEADER {
            let header = &self.input[start..start + FRAME_HEADER];
            let length =
                usize::from(header[0]) << 16 | usize::from(header[1]) << 8 | usize::from(header[2]);
            if length > MAX_FRAME {
                return Err(AuthorityError::FrameTooLarge(length));
            }
            if self.input.len() - start < FRAME_HEADER + length {
                break;
            }
            let frame_end = start + FRAME_HEADER + length;
            let frame = self.input[start..frame_end].to_vec();
            self.frame(&frame, out)?;
            start = frame_end;
        }
        self.input.drain(..start);
        Ok(())
    }

    fn frame(&mut self, frame: &[u8], out: &mut Vec<u8>) -> Result<(), AuthorityError> {
        let kind = frame[3];
        let flags = frame[4];
        let stream_id = [frame[5], frame[6], frame[7], frame[8]];
        let payload = &frame[FRAME_HEADER..];
        match kind {
            HEADERS => {
                if self.block.is_some() {
                    return Err(AuthorityError::Framing);
                }
                let (priority, fragment) = headers_fragment(flags, payload)?;
                self.block = Some(OpenBlock {
                    stream_id,
                    end_stream: flags & END_STREAM != 0,
                    priority,
                    fragments: Vec::new(),
                });
                self.fragment(fragment, flags, out)
            }
            CONTINUATION => match &self.block {
                Some(block) if block.stream_id == stream_id => self.fragment(payload, flags, out),
                _ => Err(AuthorityError::Framing),
            },
            _ if self.block.is_some() => Err(AuthorityError::Framing),
            _ => {
                out.extend_from_slice(frame);
                Ok(())
            }
        }
    }

    fn fragment(
        &mut self,
        fragment: &[u8],
        flags: u8,
        out: &mut Vec<u8>,
    ) -> Result<(), AuthorityError> {
        let Some(block) = self.block.as_mut() else {
            return Err(AuthorityError::Framing);
        };
        if block.fragments.len() + fragment.len() > MAX_BLOCK {
            return Err(AuthorityError::BlockTooLarge);
        }
        block.fragments.extend_from_slice(fragment);
        if flags & END_HEADERS == 0 {
            return Ok(());
        }
        let Some(block) = self.block.take() else {
            return Err(AuthorityError::Framing);
        };
        let mut fields = Vec::new();
        self.decoder
            .decode_with_cb(&block.fragments, |name, value| {
                fields.push((name.into_owned(), value.into_owned()));
            })
            .map_err(|_| AuthorityError::Hpack)?;
        for (name, value) in &mut fields {
            if name.as_slice() == b":authority"
                && http::uri::Authority::try_from(&value[..]).is_err()
            {
                *value = b"localhost".to_vec();
            }
        }
        let encoded = literal_block(&fields);
        if encoded.len() > MAX_BLOCK {
            return Err(AuthorityError::BlockTooLarge);
        }
        emit_block(&block, &encoded, out);
        Ok(())
    }
}

/// The priority fields and the header block fragment of a HEADERS payload.
fn headers_fragment(flags: u8, payload: &[u8]) -> Result<(Option<[u8; 5]>, &[u8]), AuthorityError> {
    let mut rest = payload;
    let mut padding = 0;
    if flags & PADDED != 0 {
        let (&pad, tail) = rest.split_first().ok_or(AuthorityError::Framing)?;
        padding = usize::from(pad);
        rest = tail;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let fields: [u8; 5] = rest
            .get(..5)
            .and_then(|p| p.try_into().ok())
            .ok_or(AuthorityError::Framing)?;
        priority = Some(fields);
        rest = &rest[5..];
    }
    let end = rest
        .len()
        .checked_sub(padding)
        .ok_or(AuthorityError::Framing)?;
    Ok((priority, &rest[..end]))
}

/// Encodes every field as "literal header field without indexing — new name" (RFC 7541
/// §6.2.2): no table references, no table changes.
fn literal_block(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        out.push(0x00);
        string_literal(name, &mut out);
        string_literal(value, &mut out);
    }
    out
}

/// A string literal without Huffman coding (RFC 7541 §5.2): H=0 and a 7-bit-prefix length.
fn string_literal(text: &[u8], out: &mut Vec<u8>) {
    let mut length = text.len();
    if length < 0x7f {
        out.push(length as u8);
    } else {
        out.push(0x7f);
        length -= 0x7f;
        while length >= 0x80 {
            out.push((length % 0x80) as u8 | 0x80);
            length /= 0x80;
        }
        out.push(length as u8);
    }
    out.extend_from_slice(text);
}

/// Writes `encoded` as one HEADERS frame and as many CONTINUATION frames as it needs.
fn emit_block(block: &OpenBlock, encoded: &[u8], out: &mut Vec<u8>) {
    let priority_len = if block.priority.is_some() { 5 } else { 0 };
    let first_len = encoded.len().min(EMIT_FRAME - priority_len);
    let (first, mut rest) = encoded.split_at(first_len);
    let mut flags = 0;
    if block.end_stream {
        flags |= END_STREAM;
    }
    if block.priority.is_some() {
        flags |= PRIORITY;
    }
    if rest.is_empty() {
        flags |= END_HEADERS;
    }
    frame_header(
        priority_len + first.len(),
        HEADERS,
        flags,
        block.stream_id,
        out,
    );
    if let Some(priority) = &block.priority {
        out.extend_from_slice(priority);
    }
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(rest.len().min(EMIT_FRAME));
        let flags = if tail.is_empty() { END_HEADERS } else { 0 };
        frame_header(chunk.len(), CONTINUATION, flags, block.stream_id, out);
        out.extend_from_slice(chunk);
        rest = tail;
    }
}

fn frame_header(length: usize, kind: u8, flags: u8, stream_id: [u8; 4], out: &mut Vec<u8>) {
    // `length` is at most EMIT_FRAME, so three bytes hold it.
    out.extend_from_slice(&[
        (length >> 16) as u8,
        (length >> 8) as u8,
        length as u8,
        kind,
        flags,
    ]);
    out.extend_from_slice(&stream_id);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        frame_header(payload.len(), kind, flags, stream.to_be_bytes(), &mut out);
        out.extend_from_slice(payload);
        out
    }

    /// Splits rewritten output into (type, flags, stream, payload) frames after the preface.
    fn frames(bytes: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert!(bytes.starts_with(PREFACE));
        let mut rest = &bytes[PREFACE.len()..];
        let mut out = Vec::new();
        while !rest.is_empty() {
            let length =
                usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            out.push((rest[3], rest[4], stream, rest[9..9 + length].to_vec()));
            rest = &rest[9 + length..];
        }
        out
    }

    fn request(authority: &str, path: &str) -> Vec<(&'static [u8], Vec<u8>)> {
        vec![
            (b":method", b"POST".to_vec()),
            (b":scheme", b"http".to_vec()),
            (b":path", path.as_bytes().to_vec()),
            (b":authority", authority.as_bytes().to_vec()),
            (b"content-type", b"application/grpc".to_vec()),
            (b"workload.spiffe.io", b"true".to_vec()),
        ]
    }

    /// Feeds `input` one byte at a time (the worst split) and whole, and checks both agree.
    fn rewrite(input: &[u8]) -> Vec<u8> {
        let mut whole = Vec::new();
        AuthorityRewriter::new()
            .feed(input, &mut whole)
            .expect("rewrites");
        let mut bytewise = Vec::new();
        let mut rewriter = AuthorityRewriter::new();
        for byte in input {
            rewriter.feed(&[*byte], &mut bytewise).expect("rewrites");
        }
        assert_eq!(whole, bytewise, "output depends on how the input was split");
        whole
    }

    fn decode_all(frames: &[(u8, u8, u32, Vec<u8>)]) -> Vec<Vec<(Vec<u8>, Vec<u8>)>> {
        // A fresh decoder, as h2's: the rewritten blocks must not need any table.
        let mut blocks = Vec::new();
        for (kind, _, _, payload) in frames {
            if *kind == HEADERS {
                let mut decoder = Decoder::new();
                blocks.push(decoder.decode(payload).expect("valid HPACK"));
            }
        }
        blocks
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_and_all_else_is_kept() {
        // grpc-core's requests as it encodes them: the second refers to dynamic-table entries
        // the first one added.
        let mut encoder = loona_hpack::Encoder::new();
        let first = encoder.encode(
            request(
                "/run/plant-agent/workload.sock",
                "/SpiffeWorkloadAPI/FetchX509SVID",
            )
            .iter()
            .map(|(n, v)| (*n, v.as_slice())),
        );
        let second = encoder.encode(
            request(
                "/run/plant-agent/workload.sock",
                "/SpiffeWorkloadAPI/FetchJWTSVID",
            )
            .iter()
            .map(|(n, v)| (*n, v.as_slice())),
        );
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, END_STREAM, 1, b"\0\0\0\0\0");
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        input.extend(frame(HEADERS, END_HEADERS, 1, &first));
        input.extend(&data);
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        let out = frames(&rewrite(&input));

        assert_eq!(out.len(), 4);
        assert_eq!(frame(out[0].0, out[0].1, out[0].2, &out[0].3), settings);
        assert_eq!(frame(out[2].0, out[2].1, out[2].2, &out[2].3), data);
        assert_eq!((out[1].0, out[1].1, out[1].2), (HEADERS, END_HEADERS, 1));
        assert_eq!(
            (out[3].0, out[3].1, out[3].2),
            (HEADERS, END_HEADERS | END_STREAM, 3)
        );
        let blocks = decode_all(&out);
        for (block, path) in blocks.iter().zip(["FetchX509SVID", "FetchJWTSVID"]) {
            let expected: Vec<(Vec<u8>, Vec<u8>)> =
                request("localhost", &format!("/SpiffeWorkloadAPI/{path}"))
                    .into_iter()
                    .map(|(n, v)| (n.to_vec(), v))
                    .collect();
            assert_eq!(block, &expected);
        }
    }

    #[test]
    fn a_valid_authority_is_left_alone() {
        let block = literal_block(
            &request("localhost:8080", "/x")
                .into_iter()
                .map(|(n, v)| (n.to_vec(), v))
                .collect::<Vec<_>>(),
        );
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        let out = frames(&rewrite(&input));
        let blocks = decode_all(&out);
        assert!(blocks[0].contains(&(b":authority".to_vec(), b"localhost:8080".to_vec())));
    }

    #[test]
    fn padding_priority_and_continuations_are_understood() {
        let fields: Vec<(Vec<u8>, Vec<u8>)> = request("/tmp/x.sock", "/p")
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v))
            .collect();
        let block = literal_block(&fields);
        let (head, tail) = block.split_at(10);
        let mut payload = vec![3]; // pad length
        payload.extend([0x80, 0, 0, 0, 7]); // exclusive dependency on stream 0, weight 8
        payload.extend(head);
        payload.extend([0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 5, &payload));
        input.extend(frame(CONTINUATION, END_HEADERS, 5, tail));
        let out = frames(&rewrite(&input));
        assert_eq!(out.len(), 1);
        let (kind, flags, stream, payload) = &out[0];
        assert_eq!(
            (*kind, *flags, *stream),
            (HEADERS, PRIORITY | END_STREAM | END_HEADERS, 5)
        );
        assert_eq!(&payload[..5], &[0x80, 0, 0, 0, 7]);
        let fields_out = Decoder::new().decode(&payload[5..]).expect("valid HPACK");
        assert!(fields_out.contains(&(b":authority".to_vec(), b"localhost".to_vec())));
    }

    #[test]
    fn a_large_block_is_split_into_continuations() {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = request("/tmp/x.sock", "/p")
            .into_iter()
            .map(|(n, v)| (n.to_vec(), v))
            .collect();
        fields.push((b"x-big".to_vec(), vec![b'a'; 40_000]));
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &literal_block(&fields)[..]));
        // The input frame itself is larger than 16 KiB (a client may send up to MAX_FRAME
        // when the server allows it); the output never is.
        let out = frames(&rewrite(&input));
        assert!(out.len() >= 3);
        assert!(out.iter().all(|(_, _, _, p)| p.len() <= EMIT_FRAME));
        assert_eq!(out[0].0, HEADERS);
        assert!(out[1..]
            .iter()
            .all(|(k, _, s, _)| *k == CONTINUATION && *s == 1));
        assert_eq!(out.last().map(|f| f.1), Some(END_HEADERS));
        let joined: Vec<u8> = out.iter().flat_map(|f| f.3.clone()).collect();
        let decoded = Decoder::new().decode(&joined).expect("valid HPACK");
        assert_eq!(decoded.last().map(|f| f.1.len()), Some(40_000));
    }

    #[test]
    fn bad_input_is_refused_without_a_panic() {
        let cases: Vec<(Vec<u8>, AuthorityError)> = vec![
            (b"GET / HTTP/1.1\r\n".to_vec(), AuthorityError::Preface),
            (
                [PREFACE, &frame(CONTINUATION, END_HEADERS, 1, b"")].concat(),
                AuthorityError::Framing,
            ),
            (
                [PREFACE, &frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 0])].concat(),
                AuthorityError::Framing,
            ),
            (
                [
                    PREFACE,
                    &frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff]),
                ]
                .concat(),
                AuthorityError::Hpack,
            ),
            (
                [
                    PREFACE,
                    &frame(HEADERS, 0, 1, &[0x82]),
                    &frame(0x0, 0, 1, b"data in a header block"),
                ]
                .concat(),
                AuthorityError::Framing,
            ),
            (
                [PREFACE, &[0x7f, 0xff, 0xff, 0x1, 0, 0, 0, 0, 1][..]].concat(),
                AuthorityError::FrameTooLarge(0x7f_ffff),
            ),
        ];
        for (input, expected) in cases {
            let mut out = Vec::new();
            assert_eq!(
                AuthorityRewriter::new().feed(&input, &mut out),
                Err(expected),
                "{input:?}"
            );
        }
    }
}
