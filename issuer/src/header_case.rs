//! hyper's title-case option writes `Www-Authenticate`, but Cisco libest's client finds the
//! Basic challenge with a case-sensitive `strncmp(name, "WWW-Authenticate", 16)`, and hyper
//! offers no public way to choose one header's case. This writer restores the spelling of
//! RFC 7235 on the way out. The replacement has the same length, so byte counts returned
//! to hyper stay true; vectored writes are turned off so hyper hands over each response head
//! in one buffer and the name can't be split between two writes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const TITLE_CASED: &[u8] = b"\r\nWww-Authenticate:";
const RFC_CASED: &[u8] = b"\r\nWWW-Authenticate:";

/// Wraps a connection's stream.
#[derive(Debug)]
pub struct HeaderCase<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for HeaderCase<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeaderCase<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match find(buf, TITLE_CASED) {
            Some(at) => {
                let mut fixed = buf.to_vec();
                fixed[at..at + RFC_CASED.len()].copy_from_slice(RFC_CASED);
                Pin::new(&mut self.0).poll_write(cx, &fixed)
            }
            None => Pin::new(&mut self.0).poll_write(cx, buf),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    // Only response heads contain "\r\n" followed by a header name; bodies are base64 or
    // text/plain, which can't contain this exact sequence except by echoing it, and an echoed
    // header would be rewritten to its correct spelling anyway.
    // Every response passes through here: a vectorised search, not a compare at each byte.
    memchr::memmem::find(haystack, needle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[tokio::test]
    async fn restores_www_authenticate_spelling_only() {
        let mut out = HeaderCase(Vec::new());
        out.write_all(b"HTTP/1.1 401 Unauthorized\r\nWww-Authenticate: Basic realm=\"x\"\r\nContent-Length: 0\r\n\r\n")
            .await
            .expect("write");
        let text = String::from_utf8(out.0).expect("ascii");
        assert!(text.contains("\r\nWWW-Authenticate: Basic"));
        assert!(text.contains("\r\nContent-Length: 0"));
    }
}
