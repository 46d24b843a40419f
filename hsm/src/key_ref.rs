//! `KeyRef`: where a key lives, parsed once from its string form.
//!
//! Grammar (`;` separates `name=value` pairs; names may come in any order, each once;
//! values cannot contain `;`):
//!
//! ```text
//! key-ref  = "soft:"   "path=" FILE
//!          | "tpm:"    ( "handle=" HEX32 | "blob=" FILE ) [ ";tcti=" TCTI ]
//!          | "pkcs11:" [ "module=" FILE ";" ] "token=" LABEL ";object=" LABEL [ ";pin-file=" FILE ]
//! TCTI     = "device" [ ":" DEVICE-PATH ]                 ; default /dev/tpmrm0
//!          | "swtpm"  [ ":" "host=" HOST [ ",port=" PORT ] ] ; default 127.0.0.1, 2321
//!          | "tabrmd" [ ":" TABRMD-CONFIG ]
//! ```
//!
//! `HEX32` is a persistent handle in the owner range `0x81000000`–`0x817fffff`. A missing
//! `tcti` means "at open time, `PLANT_TPM_TCTI` or else `device:/dev/tpmrm0`"; a missing
//! `module` means `PLANT_PKCS11_MODULE` or else Debian's SoftHSM2 module. A PIN never appears
//! in a key reference (`pin=` is refused): it comes from `pin-file` or `PLANT_PKCS11_PIN`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::Error;

/// Where a key lives, parsed once from strings such as `soft:path=/var/lib/plant/ca.key`,
/// `tpm:handle=0x81010001` or `pkcs11:token=plant;object=issuing-ca` (grammar in the module
/// documentation).
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyRef {
    /// A PKCS#8 file on disk, mode 0600 (development and small sites).
    Soft {
        /// The PKCS#8 PEM file.
        path: PathBuf,
    },
    /// A key in a TPM 2.0: a persistent handle or a key blob loaded under the storage key.
    Tpm(TpmKeyRef),
    /// A key pair in a PKCS#11 token.
    Pkcs11(Pkcs11KeyRef),
}

/// A TPM 2.0 key: which object, and how to reach the TPM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TpmKeyRef {
    /// The key object.
    pub object: TpmObject,
    /// How to reach the TPM; `None` means [`Tcti::from_env`] at open time.
    pub tcti: Option<Tcti>,
}

/// Where a TPM key object is kept between uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TpmObject {
    /// A persistent handle (TPM2_EvictControl) in the owner range `0x81000000`–`0x817fffff`.
    Persistent(u32),
    /// A `TSS2 PRIVATE KEY` PEM file with the key's public area and its private area
    /// encrypted by the owner hierarchy's storage key; useless on any other TPM.
    Blob(PathBuf),
}

/// A TPM Command Transmission Interface: how commands reach the TPM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tcti {
    /// A character device, normally the kernel's resource manager `/dev/tpmrm0`.
    Device {
        /// The device node.
        path: PathBuf,
    },
    /// A software TPM (`swtpm socket --tpm2`) over TCP; the control channel is `port + 1`.
    Swtpm {
        /// Host name or address.
        host: String,
        /// The TPM command port.
        port: u16,
    },
    /// The TPM2 Access Broker and Resource Manager daemon over D-Bus.
    Tabrmd {
        /// Its options (`bus_name=…,bus_type=…`), empty for the defaults.
        config: String,
    },
}

/// A PKCS#11 key: module, token, object label and PIN source (never the PIN itself).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pkcs11KeyRef {
    /// The module to load; `None` means `PLANT_PKCS11_MODULE` or [`DEFAULT_PKCS11_MODULE`].
    pub module: Option<PathBuf>,
    /// The token label (CKA_LABEL of the token, `softhsm2-util --label`).
    pub token: String,
    /// The label (CKA_LABEL) of the key pair's objects.
    pub object: String,
    /// A file holding the user PIN; `None` means `PLANT_PKCS11_PIN`.
    pub pin_file: Option<PathBuf>,
}

/// The TCTI used when neither the key reference nor `PLANT_TPM_TCTI` names one.
pub const DEFAULT_TCTI: &str = "device:/dev/tpmrm0";
/// The PKCS#11 module used when neither the key reference nor `PLANT_PKCS11_MODULE` names one
/// (Debian's and Ubuntu's `softhsm2` package).
pub const DEFAULT_PKCS11_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";

/// Persistent handles the owner may create with TPM2_EvictControl (TPM 2.0 Part 2 §7.5;
/// the upper half of 0x81xxxxxx belongs to the platform).
const OWNER_PERSISTENT: std::ops::RangeInclusive<u32> = 0x8100_0000..=0x817f_ffff;

impl KeyRef {
    /// A software key at `path`.
    pub fn soft(path: impl Into<PathBuf>) -> Self {
        Self::Soft { path: path.into() }
    }

    /// The backend's name, for messages.
    pub fn backend(&self) -> &'static str {
        match self {
            Self::Soft { .. } => "soft",
            Self::Tpm(_) => "tpm",
            Self::Pkcs11(_) => "pkcs11",
        }
    }

    /// The same reference with relative file paths (soft key, TPM blob, PIN file) resolved
    /// against `base`, e.g. the folder of the configuration file that named it.
    pub fn with_base_dir(&self, base: &Path) -> Self {
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_owned()
            } else {
                base.join(p)
            }
        };
        match self {
            Self::Soft { path } => Self::soft(resolve(path)),
            Self::Tpm(tpm) => Self::Tpm(TpmKeyRef {
                object: match &tpm.object {
                    TpmObject::Blob(path) => TpmObject::Blob(resolve(path)),
                    handle => handle.clone(),
                },
                tcti: tpm.tcti.clone(),
            }),
            Self::Pkcs11(p11) => Self::Pkcs11(Pkcs11KeyRef {
                pin_file: p11.pin_file.as_deref().map(resolve),
                ..p11.clone()
            }),
        }
    }
}

impl Tcti {
    /// `PLANT_TPM_TCTI` if set, else [`DEFAULT_TCTI`].
    pub fn from_env() -> Result<Self, Error> {
        match std::env::var("PLANT_TPM_TCTI") {
            Ok(value) if !value.is_empty() => value.parse().map_err(|e| match e {
                Error::InvalidKeyRef { reason, .. } => Error::InvalidKeyRef {
                    reference: format!("PLANT_TPM_TCTI={value}"),
                    reason,
                },
                other => other,
            }),
            _ => DEFAULT_TCTI.parse(),
        }
    }
}

impl FromStr for Tcti {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidKeyRef {
            reference: s.to_owned(),
            reason,
        };
        let (kind, config) = match s.split_once(':') {
            Some((kind, config)) => (kind, Some(config)),
            None => (s, None),
        };
        match kind {
            "device" => {
                let path = config.unwrap_or("/dev/tpmrm0");
                if path.is_empty() || !path.starts_with('/') {
                    return Err(invalid(
                        "a device TCTI needs an absolute path, e.g. device:/dev/tpmrm0",
                    ));
                }
                Ok(Self::Device { path: path.into() })
            }
            "swtpm" => {
                let (mut host, mut port) = ("127.0.0.1".to_owned(), 2321u16);
                for pair in config
                    .unwrap_or_default()
                    .split(',')
                    .filter(|p| !p.is_empty())
                {
                    match pair.split_once('=') {
                        Some(("host", h)) if !h.is_empty() => h.clone_into(&mut host),
                        Some(("port", p)) => {
                            port = p
                                .parse()
                                .ok()
                                .filter(|p| *p != 0 && *p != u16::MAX)
                                .ok_or_else(|| invalid("swtpm port must be 1-65534"))?;
                        }
                        _ => return Err(invalid("swtpm TCTI takes host=HOST,port=PORT")),
                    }
                }
                Ok(Self::Swtpm { host, port })
            }
            "tabrmd" => {
                let config = config.unwrap_or_default();
                if config.contains(';') {
                    return Err(invalid("tabrmd options cannot contain ';'"));
                }
                Ok(Self::Tabrmd {
                    config: config.to_owned(),
                })
            }
            _ => Err(invalid(
                "unknown TCTI; use device:PATH, swtpm:host=H,port=P or tabrmd",
            )),
        }
    }
}

impl fmt::Display for Tcti {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Device { path } => write!(f, "device:{}", path.display()),
            Self::Swtpm { host, port } => write!(f, "swtpm:host={host},port={port}"),
            Self::Tabrmd { config } if config.is_empty() => f.write_str("tabrmd"),
            Self::Tabrmd { config } => write!(f, "tabrmd:{config}"),
        }
    }
}

/// The `name=value` pairs after `backend:`, each name at most once.
struct Params<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Params<'a> {
    fn parse(params: &'a str, allowed: &[&str]) -> Result<Self, &'static str> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for pair in params.split(';').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').ok_or("expected name=value pairs")?;
            if name == "pin" || name == "pin-value" {
                return Err(
                    "a PIN never goes in a key reference; use pin-file=PATH or PLANT_PKCS11_PIN",
                );
            }
            if !allowed.contains(&name) {
                return Err("unknown parameter for this backend");
            }
            if pairs.iter().any(|(n, _)| *n == name) {
                return Err("a parameter is given twice");
            }
            if value.is_empty() {
                return Err("a parameter has an empty value");
            }
            pairs.push((name, value));
        }
        Ok(Self { pairs })
    }

    fn get(&self, name: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(n, _)| *n == name).map(|(_, v)| *v)
    }
}

fn parse_handle(value: &str) -> Option<u32> {
    let hex = value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))?;
    u32::from_str_radix(hex, 16)
        .ok()
        .filter(|h| OWNER_PERSISTENT.contains(h))
}

impl FromStr for KeyRef {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let invalid = |reason| Error::InvalidKeyRef {
            reference: s.to_owned(),
            reason,
        };
        let (scheme, params) = s
            .split_once(':')
            .ok_or_else(|| invalid("expected BACKEND:PARAMS, e.g. soft:path=ca.key"))?;
        match scheme {
            "soft" => {
                let params = Params::parse(params, &["path"]).map_err(invalid)?;
                let path = params
                    .get("path")
                    .ok_or_else(|| invalid("a soft key needs path=FILE"))?;
                Ok(Self::Soft { path: path.into() })
            }
            "tpm" => {
                let params = Params::parse(params, &["handle", "blob", "tcti"]).map_err(invalid)?;
                let object = match (params.get("handle"), params.get("blob")) {
                    (Some(handle), None) => TpmObject::Persistent(parse_handle(handle).ok_or_else(
                        || invalid("handle must be hex in the owner's persistent range 0x81000000-0x817fffff"),
                    )?),
                    (None, Some(blob)) => TpmObject::Blob(blob.into()),
                    _ => return Err(invalid("a TPM key needs exactly one of handle=0x81…… or blob=FILE")),
                };
                let tcti = params
                    .get("tcti")
                    .map(str::parse)
                    .transpose()
                    .map_err(|e| match e {
                        Error::InvalidKeyRef { reason, .. } => invalid(reason),
                        other => other,
                    })?;
                Ok(Self::Tpm(TpmKeyRef { object, tcti }))
            }
            "pkcs11" => {
                let params = Params::parse(params, &["module", "token", "object", "pin-file"])
                    .map_err(invalid)?;
                let token = params
                    .get("token")
                    .ok_or_else(|| invalid("a PKCS#11 key needs token=LABEL"))?;
                let object = params
                    .get("object")
                    .ok_or_else(|| invalid("a PKCS#11 key needs object=LABEL"))?;
                if token.len() > 32 {
                    return Err(invalid("a PKCS#11 token label has at most 32 bytes"));
                }
                Ok(Self::Pkcs11(Pkcs11KeyRef {
                    module: params.get("module").map(PathBuf::from),
                    token: token.to_owned(),
                    object: object.to_owned(),
                    pin_file: params.get("pin-file").map(PathBuf::from),
                }))
            }
            _ => Err(invalid("unknown backend; use soft, tpm or pkcs11")),
        }
    }
}

impl fmt::Display for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Soft { path } => write!(f, "soft:path={}", path.display()),
            Self::Tpm(TpmKeyRef { object, tcti }) => {
                match object {
                    TpmObject::Persistent(handle) => write!(f, "tpm:handle={handle:#010x}")?,
                    TpmObject::Blob(path) => write!(f, "tpm:blob={}", path.display())?,
                }
                match tcti {
                    Some(tcti) => write!(f, ";tcti={tcti}"),
                    None => Ok(()),
                }
            }
            Self::Pkcs11(p11) => {
                f.write_str("pkcs11:")?;
                if let Some(module) = &p11.module {
                    write!(f, "module={};", module.display())?;
                }
                write!(f, "token={};object={}", p11.token, p11.object)?;
                match &p11.pin_file {
                    Some(pin_file) => write!(f, ";pin-file={}", pin_file.display()),
                    None => Ok(()),
                }
            }
        }
    }
}

impl fmt::Debug for KeyRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Display names where a PIN is kept (pin-file), never the PIN.
        write!(f, "KeyRef({self})")
    }
}

/// Which endorsement key a TPM attests with (TCG EK Credential Profile, low range).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EndorsementKind {
    /// The RSA 2048 EK if its certificate is in NV (0x01c00002), else the ECC P-256 one: a
    /// TPM that attested with RSA keeps doing so (its node id is its EK's), and one whose
    /// manufacturer certified only the ECC EK still attests.
    #[default]
    Auto,
    /// The RSA 2048 EK (template L-1), certificate at NV index 0x01c00002.
    Rsa,
    /// The ECC NIST P-256 EK (template L-2), certificate at NV index 0x01c0000a.
    Ecc,
}

impl std::str::FromStr for EndorsementKind {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "auto" => Ok(Self::Auto),
            "rsa" => Ok(Self::Rsa),
            "ecc" => Ok(Self::Ecc),
            other => Err(format!(
                "unknown EK {other:?}: use \"auto\" (RSA if certified, else ECC), \"rsa\" or \"ecc\""
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_key_ref_round_trips() {
        let k: KeyRef = "soft:path=/tmp/ca.key".parse().expect("parses");
        assert_eq!(k, KeyRef::soft("/tmp/ca.key"));
        assert_eq!(k.to_string(), "soft:path=/tmp/ca.key");
    }

    #[test]
    fn every_documented_form_parses_into_typed_fields_and_round_trips() {
        let cases = [
            "tpm:handle=0x81010001",
            "tpm:handle=0x81010001;tcti=device:/dev/tpmrm0",
            "tpm:blob=/var/lib/plant/issuing.tpmkey;tcti=swtpm:host=127.0.0.1,port=2321",
            "tpm:blob=issuing.tpmkey;tcti=tabrmd",
            "tpm:handle=0x81000000;tcti=tabrmd:bus_name=com.intel.tss2.Tabrmd,bus_type=system",
            "pkcs11:token=plant;object=issuing-ca",
            "pkcs11:module=/usr/lib/softhsm/libsofthsm2.so;token=plant;object=issuing-ca;pin-file=/etc/plant/pin",
        ];
        for case in cases {
            let k: KeyRef = case.parse().expect(case);
            assert_eq!(k.to_string(), case);
            assert_eq!(k.to_string().parse::<KeyRef>().expect(case), k);
        }
        let k: KeyRef = "tpm:tcti=swtpm:port=2400;handle=0x81010001"
            .parse()
            .expect("any order, defaults");
        assert_eq!(
            k,
            KeyRef::Tpm(TpmKeyRef {
                object: TpmObject::Persistent(0x8101_0001),
                tcti: Some(Tcti::Swtpm {
                    host: "127.0.0.1".into(),
                    port: 2400
                }),
            })
        );
        let k: KeyRef = "pkcs11:object=ca;token=plant".parse().expect("any order");
        assert_eq!(
            k,
            KeyRef::Pkcs11(Pkcs11KeyRef {
                module: None,
                token: "plant".into(),
                object: "ca".into(),
                pin_file: None,
            })
        );
    }

    #[test]
    fn malformed_key_refs_are_refused_with_a_reason() {
        for bad in [
            "",
            "soft",
            "soft:",
            "soft:path=",
            "soft:path=a;path=b",
            "soft:path=a;mode=0600",
            "vault:x",
            "tpm:",
            "tpm:handle=81010001",
            "tpm:handle=0x01000001",
            "tpm:handle=0x81800000",
            "tpm:handle=0xzz",
            "tpm:handle=0x81010001;blob=/k",
            "tpm:blob=/k;tcti=",
            "tpm:blob=/k;tcti=mssim:port=1",
            "tpm:blob=/k;tcti=device:dev/tpm0",
            "tpm:blob=/k;tcti=swtpm:port=0",
            "tpm:blob=/k;tcti=swtpm:port=x",
            "tpm:blob=/k;tcti=swtpm:bogus=1",
            "pkcs11:token=plant",
            "pkcs11:object=ca",
            "pkcs11:token=plant;object=ca;slot=1",
            "pkcs11:token=0123456789abcdef0123456789abcdefX;object=ca",
        ] {
            let err = bad.parse::<KeyRef>().expect_err(bad);
            assert!(matches!(err, Error::InvalidKeyRef { .. }), "{bad}: {err}");
        }
    }

    #[test]
    fn a_pin_in_the_key_ref_is_refused_and_not_echoed_in_the_reason() {
        let err = "pkcs11:token=plant;object=ca;pin=1234"
            .parse::<KeyRef>()
            .expect_err("pin refused");
        let Error::InvalidKeyRef { reason, .. } = err else {
            panic!("unexpected {err}");
        };
        assert!(reason.contains("pin-file"), "{reason}");
        assert!(!reason.contains("1234"));
    }

    #[test]
    fn debug_shows_where_the_pin_is_kept_but_holds_no_secret() {
        let k: KeyRef = "pkcs11:token=plant;object=ca;pin-file=/run/pin"
            .parse()
            .expect("parses");
        assert_eq!(
            format!("{k:?}"),
            "KeyRef(pkcs11:token=plant;object=ca;pin-file=/run/pin)"
        );
    }

    #[test]
    fn relative_paths_resolve_against_a_base_dir() {
        let base = Path::new("/etc/plant");
        let k: KeyRef = "tpm:blob=keys/ca.tpmkey".parse().expect("parses");
        assert_eq!(
            k.with_base_dir(base).to_string(),
            "tpm:blob=/etc/plant/keys/ca.tpmkey"
        );
        let k: KeyRef = "pkcs11:token=t;object=o;pin-file=pin"
            .parse()
            .expect("parses");
        assert_eq!(
            k.with_base_dir(base).to_string(),
            "pkcs11:token=t;object=o;pin-file=/etc/plant/pin"
        );
        let k: KeyRef = "tpm:handle=0x81010001".parse().expect("parses");
        assert_eq!(k.with_base_dir(base), k);
    }

    #[test]
    fn tcti_defaults_fill_in_missing_parts() {
        assert_eq!(
            "device".parse::<Tcti>().expect("device"),
            Tcti::Device {
                path: "/dev/tpmrm0".into()
            }
        );
        assert_eq!(
            "swtpm".parse::<Tcti>().expect("swtpm").to_string(),
            "swtpm:host=127.0.0.1,port=2321"
        );
        assert_eq!(
            "tabrmd".parse::<Tcti>().expect("tabrmd").to_string(),
            "tabrmd"
        );
    }
}
