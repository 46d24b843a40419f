//! Secrets the engineer hands the agent: one-time enrollment tokens and PKCS#12 passwords.
//!
//! Both are redacted in `Debug` and zeroed on drop, and both can come from a file, so they
//! need never appear on a command line (where `ps` and shell history would keep them).

use std::fmt;
use std::path::Path;

use est::client::Auth;
use est::server::Secret;
use zeroize::Zeroizing;

use crate::Error;

/// The environment variable a token may come from.
pub const TOKEN_ENV: &str = "PLANT_EST_TOKEN";

/// How the token travels to the EST server (DESIGN §4 "Auth").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthScheme {
    /// HTTP Basic: user = the device's subject, password = the token.
    #[default]
    Basic,
    /// `Authorization: Bearer <token>`.
    Bearer,
}

/// A one-time enrollment token from `issuer token create`.
#[derive(Clone)]
pub struct EnrollmentToken(Zeroizing<String>);

impl EnrollmentToken {
    /// A token from text; surrounding whitespace (a pasted newline) is dropped.
    pub fn new(text: &str) -> Result<Self, Error> {
        let text = text.trim();
        if text.is_empty() {
            return Err(Error::Usage("the enrollment token is empty".into()));
        }
        Ok(Self(Zeroizing::new(text.to_owned())))
    }

    /// The token from the first line of `path`.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let line = read_first_line(path)?;
        Self::new(&line).map_err(|_| {
            Error::Usage(format!(
                "token file {} is empty; put the token on its first line",
                path.display()
            ))
        })
    }

    /// Picks the token from, in order, `--token`, `--token-file`, then the environment.
    pub fn resolve(
        argument: Option<&str>,
        file: Option<&Path>,
        environment: Option<&str>,
    ) -> Result<Self, Error> {
        match (argument, file, environment) {
            (Some(text), _, _) => Self::new(text),
            (None, Some(path), _) => Self::from_file(path),
            (None, None, Some(text)) => {
                Self::new(text).map_err(|_| Error::Usage(format!("{TOKEN_ENV} is set but empty")))
            }
            (None, None, None) => Err(Error::Usage(format!(
                "no enrollment token: pass --token-file FILE (or set {TOKEN_ENV}, or --token)"
            ))),
        }
    }

    /// The EST credentials for a device named `user`.
    pub fn auth(&self, user: &str, scheme: AuthScheme) -> Auth {
        let secret = Secret(self.0.as_str().to_owned());
        match scheme {
            AuthScheme::Basic => Auth::Basic {
                user: user.to_owned(),
                password: secret,
            },
            AuthScheme::Bearer => Auth::Bearer(secret),
        }
    }
}

impl fmt::Debug for EnrollmentToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EnrollmentToken(<redacted>)")
    }
}

/// The password that protects a PKCS#12 bundle.
#[derive(Clone)]
pub struct Pkcs12Password(Zeroizing<String>);

impl Pkcs12Password {
    /// The password as given; refuses an empty one, since a bundle holding a private key
    /// must not be readable by anyone who copies the file.
    pub fn new(text: &str) -> Result<Self, Error> {
        if text.is_empty() {
            return Err(Error::Usage(
                "the PKCS#12 password is empty; a bundle holding a private key needs one".into(),
            ));
        }
        Ok(Self(Zeroizing::new(text.to_owned())))
    }

    /// The password from the first line of `path`, without its line ending. Other spaces
    /// are kept: they may be part of the password.
    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let line = read_first_line(path)?;
        Self::new(&line).map_err(|_| {
            Error::Usage(format!(
                "password file {} has an empty first line; a bundle holding a private key needs a password",
                path.display()
            ))
        })
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Pkcs12Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pkcs12Password(<redacted>)")
    }
}

/// The first line of a secret file, without `\n` or `\r\n`.
fn read_first_line(path: &Path) -> Result<Zeroizing<String>, Error> {
    // A missing or unreadable secret file is the command line's fault: name the file.
    let text =
        Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            Error::Usage(format!("can't read secret file {}: {e}", path.display()))
        })?);
    let line = text.split('\n').next().unwrap_or_default();
    Ok(Zeroizing::new(
        line.strip_suffix('\r').unwrap_or(line).to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_never_shows_a_token_or_password() {
        let token = EnrollmentToken::new("tok-5ecret-value").expect("token");
        let password = Pkcs12Password::new("pa55-word").expect("password");
        let auth = token.auth("plc-1", AuthScheme::Basic);
        for text in [
            format!("{token:?}"),
            format!("{password:?}"),
            format!("{auth:?}"),
        ] {
            assert!(!text.contains("5ecret"), "{text}");
            assert!(!text.contains("pa55"), "{text}");
        }
    }

    #[test]
    fn token_comes_from_argument_then_file_then_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\nsecond line\n").expect("write");
        let pick = |a, f, e| {
            let token = EnrollmentToken::resolve(a, f, e).expect("token");
            token.0.as_str().to_owned()
        };
        assert_eq!(pick(Some("arg"), Some(&file), Some("env")), "arg");
        assert_eq!(pick(None, Some(&file), Some("env")), "from-file");
        assert_eq!(pick(None, None, Some("env")), "env");
        assert!(EnrollmentToken::resolve(None, None, None)
            .expect_err("no token")
            .is_usage());
    }

    #[test]
    fn password_file_keeps_spaces_but_drops_the_line_ending() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, " two words \r\nignored\n").expect("write");
        let password = Pkcs12Password::from_file(&file).expect("password");
        assert_eq!(password.as_str(), " two words ");
    }

    #[test]
    fn empty_password_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("pw");
        std::fs::write(&file, "\nsecond\n").expect("write");
        assert!(Pkcs12Password::from_file(&file).is_err());
        std::fs::write(&file, "").expect("write");
        assert!(Pkcs12Password::from_file(&file).is_err());
    }
}
