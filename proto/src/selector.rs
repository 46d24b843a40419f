//! Workload selectors (`unix:uid:1000`): facts the agent learns from the kernel about the
//! process calling the Workload API, and what registration entries require.
//!
//! One type is not about processes: `legacy:device:<name>` marks an entry that gives a
//! legacy device declared in the gateway agent's configuration (a PLC behind its inbound
//! proxy, an old HMI behind its outbound one) its identity. No process ever shows that
//! selector, so such an identity is never served over the Workload API.

use std::fmt;
use std::str::FromStr;

/// Longest selector value accepted; executable paths are the longest real ones.
const MAX_VALUE_LENGTH: usize = 4096;

/// The keys of the `unix` selector type (DESIGN §5).
const UNIX_KEYS: [&str; 6] = ["uid", "gid", "user", "group", "path", "sha256"];

/// Why text is not a selector.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SelectorError {
    /// No `type:value` form.
    #[error("a selector has the form type:key:value, e.g. unix:uid:1000")]
    Form,
    /// A selector type this system does not produce.
    #[error("unknown selector type {0:?}: use unix:…, systemd:unit:… or legacy:device:…")]
    UnknownType(String),
    /// A key of the `unix` type this system does not produce.
    #[error("unknown unix selector {0:?}: use unix:uid, unix:gid, unix:user, unix:group, unix:path or unix:sha256")]
    UnknownUnixKey(String),
    /// A numeric selector (uid, gid) that is not a number.
    #[error("unix:{0} takes a number")]
    NotANumber(String),
    /// `unix:sha256` takes 64 hex digits.
    #[error("unix:sha256 takes the 64 hex digits of the executable's SHA-256")]
    Digest,
    /// `unix:path` takes an absolute path.
    #[error("unix:path takes an absolute path")]
    RelativePath,
    /// `legacy:device:` takes a device name.
    #[error("a legacy device selector has the form legacy:device:<name>, the name as in the gateway's agent.toml (letters, digits, '.', '-', '_')")]
    LegacyDevice,
    /// Empty, too long, or with control characters.
    #[error("a selector value must be 1 to 4096 printable characters")]
    Value,
}

/// One selector: a type (`unix`, `systemd`) and a value (`uid:1000`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    kind: String,
    value: String,
}

impl Selector {
    /// Parses `type:value`, checking the forms this system knows.
    pub fn new(text: &str) -> Result<Self, SelectorError> {
        let (kind, value) = text.split_once(':').ok_or(SelectorError::Form)?;
        if value.is_empty() || value.len() > MAX_VALUE_LENGTH || value.chars().any(char::is_control)
        {
            return Err(SelectorError::Value);
        }
        match kind {
            "unix" => check_unix(value)?,
            "systemd" => {
                if value.strip_prefix("unit:").is_none_or(str::is_empty) {
                    return Err(SelectorError::Form);
                }
            }
            "legacy" => {
                if value
                    .strip_prefix("device:")
                    .is_none_or(|name| crate::check_device_name(name).is_err())
                {
                    return Err(SelectorError::LegacyDevice);
                }
            }
            other => return Err(SelectorError::UnknownType(other.to_owned())),
        }
        Ok(Self {
            kind: kind.to_owned(),
            value: value.to_owned(),
        })
    }

    /// The `legacy:device:<name>` selector of a legacy device the agent proxies for.
    pub fn legacy_device(name: &str) -> Self {
        Self {
            kind: "legacy".to_owned(),
            value: format!("device:{name}"),
        }
    }

    /// The device name, if this is a `legacy:device:<name>` selector.
    pub fn legacy_device_name(&self) -> Option<&str> {
        (self.kind == "legacy")
            .then(|| self.value.strip_prefix("device:"))
            .flatten()
    }

    /// A `unix:<key>:<value>` selector the agent observed. Not validated: the kernel said so.
    pub fn unix(key: &str, value: impl fmt::Display) -> Self {
        Self {
            kind: "unix".to_owned(),
            value: format!("{key}:{value}"),
        }
    }

    /// The type, e.g. `unix`.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The value, e.g. `uid:1000`.
    pub fn value(&self) -> &str {
        &self.value
    }
}

fn check_unix(value: &str) -> Result<(), SelectorError> {
    let (key, rest) = value.split_once(':').ok_or(SelectorError::Form)?;
    if !UNIX_KEYS.contains(&key) {
        return Err(SelectorError::UnknownUnixKey(key.to_owned()));
    }
    if rest.is_empty() {
        return Err(SelectorError::Value);
    }
    match key {
        "uid" | "gid" if rest.parse::<u32>().is_err() => {
            Err(SelectorError::NotANumber(key.to_owned()))
        }
        "sha256" if rest.len() != 64 || !rest.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Err(SelectorError::Digest)
        }
        "path" if !rest.starts_with('/') => Err(SelectorError::RelativePath),
        _ => Ok(()),
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.kind, self.value)
    }
}

impl FromStr for Selector {
    type Err = SelectorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_selectors_the_agent_produces() {
        for text in [
            "unix:uid:1000",
            "unix:gid:50",
            "unix:user:historian",
            "unix:group:plant",
            "unix:path:/usr/bin/opcua-agg",
            "unix:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "systemd:unit:historian.service",
            "legacy:device:press-7",
        ] {
            let selector = Selector::new(text).expect(text);
            assert_eq!(selector.to_string(), text);
        }
        assert_eq!(
            Selector::new("unix:uid:1000").expect("valid"),
            Selector::unix("uid", 1000)
        );
        let press = Selector::new("legacy:device:press-7").expect("valid");
        assert_eq!(press, Selector::legacy_device("press-7"));
        assert_eq!(press.legacy_device_name(), Some("press-7"));
        assert_eq!(Selector::unix("uid", 1).legacy_device_name(), None);
    }

    #[test]
    fn refuses_typos_with_what_to_write_instead() {
        let cases = [
            ("uid1000", SelectorError::Form),
            ("unix:usr:1000", SelectorError::UnknownUnixKey("usr".into())),
            ("k8s:ns:default", SelectorError::UnknownType("k8s".into())),
            ("unix:uid:alice", SelectorError::NotANumber("uid".into())),
            ("unix:sha256:abc", SelectorError::Digest),
            ("unix:path:bin/x", SelectorError::RelativePath),
            ("unix:", SelectorError::Value),
            ("unix:user:a\nb", SelectorError::Value),
            ("legacy:plc:press-7", SelectorError::LegacyDevice),
            ("legacy:device:press 7", SelectorError::LegacyDevice),
            ("legacy:device:", SelectorError::LegacyDevice),
        ];
        for (text, expected) in cases {
            assert_eq!(Selector::new(text), Err(expected), "{text}");
        }
    }
}
