//! Workload selectors (`unix:uid:1000`): facts the agent learns from the kernel about the
//! process calling the Workload API, and what registration entries require.
//!
//! Types and what produces them: `unix:*` (the kernel's credentials and /proc), `systemd:unit`
//! (the system unit of the process's cgroup), `docker:id` and `podman:id` (a container's id
//! from the cgroup path the container runtime created). Entries can name nothing else: an
//! entry with a selector no agent produces would never match anything.
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
    #[error("unknown selector type {0:?}: use unix:…, systemd:unit:…, docker:id:…, podman:id:… or legacy:device:…")]
    UnknownType(String),
    /// `systemd:unit:` takes a full unit name: a process runs in a `.service` or `.scope`.
    #[error("{0:?} is not a unit a process runs in: a systemd selector has the form systemd:unit:<name>.service (or .scope), the full name of a system unit as `systemctl status` shows it (e.g. systemd:unit:mosquitto.service)")]
    SystemdUnit(String),
    /// `docker:id:` and `podman:id:` take a full container id.
    #[error("a container selector has the form docker:id:<id> or podman:id:<id>, the container's full 64-hex-digit id (`docker inspect --format '{{{{.Id}}}}'`)")]
    ContainerId,
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
            "systemd" => match value.strip_prefix("unit:") {
                Some(unit) if is_unit_name(unit) => {}
                Some(unit) => return Err(SelectorError::SystemdUnit(unit.to_owned())),
                None => return Err(SelectorError::SystemdUnit(value.to_owned())),
            },
            "docker" | "podman" => {
                if value
                    .strip_prefix("id:")
                    .is_none_or(|id| !is_container_id(id))
                {
                    return Err(SelectorError::ContainerId);
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

    /// A selector the agent observed that is not a `unix` one, e.g. `systemd`, `unit`,
    /// `historian.service`. Not validated: the kernel said so.
    pub fn observed(kind: &str, key: &str, value: impl fmt::Display) -> Self {
        Self {
            kind: kind.to_owned(),
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

/// A systemd unit a process can run in: a service or a scope (`.slice`s hold units, they
/// are not one), no path separator.
pub fn is_unit_name(name: &str) -> bool {
    let stem = name
        .strip_suffix(".service")
        .or_else(|| name.strip_suffix(".scope"));
    stem.is_some_and(|stem| !stem.is_empty() && !name.contains('/'))
}

/// A full container id as docker and podman make them: 64 lowercase hex digits.
pub fn is_container_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
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
            "systemd:unit:run-r3f1.scope",
            "docker:id:4b825dc642cb6eb9a060e54bf8d69288fbee4904c3d3b51a2c1e8e1f0a8d2e71",
            "podman:id:4b825dc642cb6eb9a060e54bf8d69288fbee4904c3d3b51a2c1e8e1f0a8d2e71",
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
            // Names no agent would produce: the unit without its suffix, a slice, a path.
            (
                "systemd:unit:mosquitto",
                SelectorError::SystemdUnit("mosquitto".into()),
            ),
            (
                "systemd:unit:system.slice",
                SelectorError::SystemdUnit("system.slice".into()),
            ),
            (
                "systemd:unit:a/b.service",
                SelectorError::SystemdUnit("a/b.service".into()),
            ),
            (
                "systemd:name:x.service",
                SelectorError::SystemdUnit("name:x.service".into()),
            ),
            ("docker:id:4b825dc642cb", SelectorError::ContainerId),
            (
                "podman:id:4B825DC642CB6EB9A060E54BF8D69288FBEE4904C3D3B51A2C1E8E1F0A8D2E71",
                SelectorError::ContainerId,
            ),
            ("docker:image:nginx", SelectorError::ContainerId),
        ];
        for (text, expected) in cases {
            assert_eq!(Selector::new(text), Err(expected), "{text}");
        }
    }
}
