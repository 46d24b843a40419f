use std::path::PathBuf;

/// The one error type of the `agent` crate. Every message says what to fix, because the
/// reader is a commissioning engineer at a cabinet, not the author.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Flags or their values can't work together; the text names the flag to fix.
    #[error("{0}")]
    Usage(String),
    /// The batch CSV file is invalid; nothing was enrolled. Every problem found is listed,
    /// so an engineer with a long file fixes them all in one pass, not one per run.
    #[error("{}", batch_file_message(path, problems))]
    BatchFile {
        /// The CSV file.
        path: PathBuf,
        /// What is wrong, in line order; never empty.
        problems: Vec<BatchProblem>,
    },
    /// An EST exchange with the CA failed; `step` says which one.
    #[error("{step}: {}", explain(source, *command))]
    Est {
        /// What the agent was doing, e.g. "enrolling plc-7".
        step: String,
        /// The command that was talking to the CA, so the hint names only its options.
        command: EstCommand,
        /// The EST client's error, which carries the server's text.
        source: est::Error,
    },
    /// A private key could not be generated, read or encoded.
    #[error(transparent)]
    Key(#[from] hsm::Error),
    /// A certificate (from the CA or from a file) does not parse or is not what was asked for.
    #[error("{what}: {reason}")]
    Certificate {
        /// Which certificate, e.g. "issued certificate" or a file name.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The certificate request could not be built from the names given.
    #[error("building the certificate request: {0}")]
    Csr(String),
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A file holding a private key already exists and `--force` was not given.
    #[error("{} already exists; refusing to overwrite a private key (move it away, or pass --force)", .0.display())]
    WouldOverwrite(PathBuf),
    /// A PKCS#12 bundle could not be built.
    #[error("PKCS#12 bundle: {0}")]
    Pkcs12(String),
    /// `agent.toml` could not be read.
    #[error("{}: cannot read the agent config: {source} (give its path with --config)", path.display())]
    ConfigFile {
        /// The config file.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Node attestation could not produce evidence or answer the issuer's challenge.
    #[error("node attestation: {0}")]
    Attestation(String),
    /// `agent.toml` is wrong; `key` names the setting to fix.
    #[error("{}: {key}: {message}", path.display())]
    Config {
        /// The config file.
        path: PathBuf,
        /// The key, e.g. `attestation.method`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A call to the issuer's agent API failed; `step` says which.
    #[error("{step}: {message}")]
    Issuer {
        /// What the agent was doing, e.g. "attesting the node".
        step: String,
        /// The gRPC status code (Unavailable when the issuer could not be reached).
        code: tonic::Code,
        /// The issuer's message or the transport error.
        message: String,
    },
    /// The Workload API socket could not be set up.
    #[error("workload API socket {}: {reason}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
}

impl Error {
    /// True when the command line (or a file it names) is at fault rather than the CA, the
    /// network or the disk: the binary exits 64 (EX_USAGE) for these.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::Usage(_)
                | Self::BatchFile { .. }
                | Self::WouldOverwrite(_)
                | Self::Config { .. }
                | Self::ConfigFile { .. }
        )
    }

    /// An EST failure of `agent enroll`.
    pub(crate) fn est(step: impl Into<String>) -> impl FnOnce(est::Error) -> Self {
        let step = step.into();
        move |source| Self::Est {
            step,
            command: EstCommand::Enroll,
            source,
        }
    }

    /// An EST failure of `agent reenroll`.
    pub(crate) fn est_reenroll(step: impl Into<String>) -> impl FnOnce(est::Error) -> Self {
        let step = step.into();
        move |source| Self::Est {
            step,
            command: EstCommand::Reenroll,
            source,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.into();
        move |source| Self::Io { path, source }
    }

    pub(crate) fn issuer(step: impl Into<String>) -> impl FnOnce(tonic::Status) -> Self {
        let step = step.into();
        move |status| {
            // A transport failure says only "transport error"; the cause (refused
            // connection, certificate not trusted) is in the source chain.
            let mut message = status.message().to_owned();
            let mut source = std::error::Error::source(&status);
            while let Some(cause) = source {
                message.push_str(": ");
                message.push_str(&cause.to_string());
                source = cause.source();
            }
            Self::Issuer {
                step,
                code: status.code(),
                message,
            }
        }
    }

    /// True when the issuer could not be reached (or answered too late), so trying again later
    /// can succeed without anyone doing anything.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Self::Issuer {
                code: tonic::Code::Unavailable
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Unknown
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::Aborted,
                ..
            }
        )
    }

    pub(crate) fn certificate(what: impl Into<String>, reason: impl ToString) -> Self {
        Self::Certificate {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// One problem in a batch CSV file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchProblem {
    /// The line as an editor counts it (1 is the header row).
    pub line: u64,
    /// What is wrong on it.
    pub reason: String,
}

/// How many problems of a batch file are printed; a file with the wrong delimiter can fail
/// on every line, and hundreds of lines of the same complaint bury the first one.
pub(crate) const BATCH_PROBLEMS_SHOWN: usize = 50;

fn batch_file_message(path: &std::path::Path, problems: &[BatchProblem]) -> String {
    let count = match problems.len() {
        1 => "1 problem".to_owned(),
        n => format!("{n} problems"),
    };
    let mut text = format!("{}: {count}, nothing enrolled:", path.display());
    for problem in problems.iter().take(BATCH_PROBLEMS_SHOWN) {
        text.push_str(&format!("\n  line {}: {}", problem.line, problem.reason));
    }
    if let Some(more) = problems
        .len()
        .checked_sub(BATCH_PROBLEMS_SHOWN)
        .filter(|n| *n > 0)
    {
        text.push_str(&format!("\n  … and {more} more"));
    }
    text
}

/// The agent command that talked to the EST server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EstCommand {
    /// `agent enroll`, one device or a batch: authenticated by a one-time token.
    Enroll,
    /// `agent reenroll`: authenticated by the current certificate.
    Reenroll,
}

/// The server's own words plus what the engineer can do about the status, so an answer like
/// 401 does not leave them guessing whether to retry, re-type or call the PKI operator. The
/// hint names only options `command` has.
pub(crate) fn explain(error: &est::Error, command: EstCommand) -> String {
    use EstCommand::{Enroll, Reenroll};
    match error {
        est::Error::Server {
            status,
            message,
            retry_after,
        } => {
            let wait = retry_after
                .map(|s| format!(" (the server asks to wait {s} s)"))
                .unwrap_or_default();
            let hint = match (status, command) {
                (202, _) => format!("the request waits for an operator's approval; run the command again later{wait}"),
                (400, _) => "the CA rejected the request as malformed; check the subject and SAN values".into(),
                (401, Enroll) => "ask the PKI operator for a new token (tokens are single use, expire, and are bound to a label and sometimes a subject)".into(),
                (401, Reenroll) => "the CA did not take the current certificate as authentication; check --cert, --key or --key-ref, and --chain".into(),
                (403, Enroll) => "the CA's policy refuses this request; check --subject, --dns/--ip and --label with the PKI operator".into(),
                // The subject and SANs come from the certificate; only the label is the engineer's.
                (403, Reenroll) => "the CA refuses to renew this certificate (revoked, expired, not issued by this CA, or issued under another --label); a certificate that can't be renewed is replaced by enrolling the device again with a new token (`agent enroll`)".into(),
                (404, _) => "the CA does not serve this label; ask the PKI operator which --label to use".into(),
                (413 | 415, _) => "the server did not take the request format; check that --server is a Plant PKI EST server".into(),
                (501, _) => "the CA does not offer this operation".into(),
                (503, _) => format!("the CA is busy or its key is unavailable; try again shortly{wait}"),
                _ => String::new(),
            };
            let mut text = format!("EST server answered {status}");
            if !message.is_empty() {
                text.push_str(": ");
                text.push_str(message);
            }
            // Plant PKI's issuer already says what to do; other EST servers are often terse.
            if !hint.is_empty() && !message.contains("PKI operator") {
                text.push_str("; ");
                text.push_str(&hint);
            }
            text
        }
        est::Error::Transport(reason) => format!(
            "could not talk to the EST server: {reason}; check --server, the network, and that the server's certificate chains to the CA you trust"
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_refusal_keeps_the_server_text_and_says_what_to_do() {
        let err = Error::Est {
            step: "enrolling plc-7".into(),
            command: EstCommand::Enroll,
            source: est::Error::Server {
                status: 401,
                message: "token already used".into(),
                retry_after: None,
            },
        };
        let text = err.to_string();
        assert!(
            text.starts_with("enrolling plc-7: EST server answered 401: token already used; ask the PKI operator for a new token"),
            "{text}"
        );
    }

    #[test]
    fn usage_errors_are_told_apart_from_failures() {
        assert!(Error::Usage("x".into()).is_usage());
        assert!(!Error::Pkcs12("x".into()).is_usage());
    }
}
