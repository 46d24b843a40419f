//! The Workload API address (SPIFFE_Workload_Endpoint.md §4): `unix:///path` or `unix:/path`
//! as `SPIFFE_ENDPOINT_SOCKET` gives it, or a plain path in `agent.toml`.

use std::path::{Path, PathBuf};

/// A Unix socket path for the Workload API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAddress(PathBuf);

impl SocketAddress {
    /// Parses `unix:///abs/path`, `unix:/abs/path` or a plain path (which may be relative
    /// to the config file). Other schemes (`tcp://`) and `unix://host/…` are refused.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the socket address is empty".into());
        }
        let path = if let Some(rest) = text.strip_prefix("unix://") {
            // An authority part is not allowed: unix://host/path names no local file.
            if !rest.starts_with('/') {
                return Err(format!(
                    "{text:?}: a unix:// address has no host; write unix:///absolute/path"
                ));
            }
            rest
        } else if let Some(rest) = text.strip_prefix("unix:") {
            if !rest.starts_with('/') {
                return Err(format!(
                    "{text:?}: write unix:/absolute/path or unix:///absolute/path"
                ));
            }
            rest
        } else if text.contains("://") {
            return Err(format!(
                "{text:?}: the Workload API is served on a Unix socket; write unix:///path"
            ));
        } else {
            text
        };
        if path.contains(['?', '#']) {
            return Err(format!(
                "{text:?}: a socket address has no query or fragment"
            ));
        }
        Ok(Self(PathBuf::from(path)))
    }

    /// The path, a relative one taken from `base`.
    pub fn resolve(&self, base: &Path) -> PathBuf {
        base.join(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_forms_spiffe_clients_use() {
        let base = Path::new("/etc/plant");
        let cases = [
            ("unix:///run/a/workload.sock", "/run/a/workload.sock"),
            ("unix:/run/a/workload.sock", "/run/a/workload.sock"),
            ("/run/a/workload.sock", "/run/a/workload.sock"),
            ("workload.sock", "/etc/plant/workload.sock"),
        ];
        for (text, path) in cases {
            let address = SocketAddress::parse(text).expect(text);
            assert_eq!(address.resolve(base), Path::new(path), "{text}");
        }
    }

    #[test]
    fn refuses_what_names_no_local_socket() {
        for text in [
            "",
            "tcp://127.0.0.1:8081",
            "unix://host/run/workload.sock",
            "unix:relative.sock",
            "unix:///run/x.sock?mode=1",
        ] {
            assert!(SocketAddress::parse(text).is_err(), "{text}");
        }
    }
}
