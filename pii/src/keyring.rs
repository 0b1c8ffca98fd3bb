//! Key-encryption keys (KEKs) from configuration.
//!
//! Two settings, read once at start-up:
//!
//! - `PII_KEK` (required): the current KEK, `<id>:<base64 of 32 bytes>`, e.g.
//!   `2026-11:` followed by the output of `openssl rand -base64 32`. New data keys are
//!   wrapped with it, and `rewrap_all` moves every live data key under it.
//! - `PII_KEK_PREVIOUS` (optional): earlier KEKs, the same form, separated by commas. They
//!   only unwrap data keys that have not been rewrapped yet; drop one once `rewrap_all` has
//!   reported no key left under it.
//!
//! An id is 1–64 characters from `A–Z a–z 0–9 . _ -`; it is stored beside every wrapped
//! key and bound into its associated data, so it must never be reused for other key
//! material. The key is standard base64 (padding optional) of exactly 32 bytes.
//!
//! [`KeyringError`] names the setting (and the entry of the list) and says what is wrong;
//! it never includes any part of the value, since a malformed value may well be the key.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use hmac::Mac;
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

/// The setting holding the current KEK.
pub const CURRENT_SETTING: &str = "PII_KEK";
/// The setting holding the previous KEKs (comma-separated, optional).
pub const PREVIOUS_SETTING: &str = "PII_KEK_PREVIOUS";

/// Length in bytes of every key this crate uses (KEKs and data keys): 256 bits.
pub const KEY_LEN: usize = 32;

const MAX_ID_LEN: usize = 64;

/// The public name of a KEK, stored beside every key it wraps.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KekId(String);

impl KekId {
    /// Checks the id rules (1–64 characters from `A–Z a–z 0–9 . _ -`).
    pub fn new(id: &str) -> Option<Self> {
        let valid = !id.is_empty()
            && id.len() <= MAX_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        valid.then(|| Self(id.to_owned()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for KekId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KekId({})", self.0)
    }
}

/// HMAC-SHA256, for request fingerprints.
type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// One key-encryption key: its id and 32 secret bytes, zeroized on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct Kek {
    #[zeroize(skip)]
    id: KekId,
    key: [u8; KEY_LEN],
    /// The HMAC key of request fingerprints derived from it (see
    /// [`Keyring::fingerprints`]), derived once.
    fingerprint_key: [u8; KEY_LEN],
}

impl Kek {
    /// A KEK from raw bytes (tests and tools; services use [`Keyring::parse`]).
    pub fn new(id: KekId, key: [u8; KEY_LEN]) -> Self {
        let mut derive = <HmacSha256 as Mac>::new_from_slice(&key)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        derive.update(b"ledger-pii/fingerprint/1");
        let fingerprint_key = derive.finalize().into_bytes().into();
        Self {
            id,
            key,
            fingerprint_key,
        }
    }

    /// The KEK's id.
    pub fn id(&self) -> &KekId {
        &self.id
    }

    pub(crate) fn key_bytes(&self) -> &[u8; KEY_LEN] {
        &self.key
    }
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek")
            .field("id", &self.id)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The current KEK and any previous ones, by id.
#[derive(Clone)]
pub struct Keyring {
    current: KekId,
    keys: BTreeMap<KekId, Kek>,
}

impl Keyring {
    /// A keyring from KEKs already built: `current` wraps, all of them unwrap.
    ///
    /// # Errors
    /// [`KeyringProblem::DuplicateId`] when two KEKs share an id (reported against
    /// `PII_KEK_PREVIOUS`).
    pub fn new(current: Kek, previous: Vec<Kek>) -> Result<Self, KeyringError> {
        let current_id = current.id.clone();
        let mut keys = BTreeMap::new();
        keys.insert(current_id.clone(), current);
        for (index, kek) in previous.into_iter().enumerate() {
            if keys.contains_key(&kek.id) {
                return Err(KeyringError {
                    setting: PREVIOUS_SETTING,
                    entry: Some(index + 1),
                    problem: KeyringProblem::DuplicateId(kek.id.clone()),
                });
            }
            keys.insert(kek.id.clone(), kek);
        }
        Ok(Self {
            current: current_id,
            keys,
        })
    }

    /// Parses the two settings' values (`None` when a setting is unset).
    ///
    /// # Errors
    /// A [`KeyringError`] naming the setting, the entry and the problem, never the value.
    pub fn parse(current: Option<&str>, previous: Option<&str>) -> Result<Self, KeyringError> {
        let current = match current.map(str::trim) {
            None | Some("") => {
                return Err(KeyringError {
                    setting: CURRENT_SETTING,
                    entry: None,
                    problem: KeyringProblem::Missing,
                })
            }
            Some(value) => parse_entry(value).map_err(|problem| KeyringError {
                setting: CURRENT_SETTING,
                entry: None,
                problem,
            })?,
        };
        let mut older = Vec::new();
        if let Some(list) = previous.map(str::trim).filter(|l| !l.is_empty()) {
            for (index, entry) in list.split(',').enumerate() {
                let kek = parse_entry(entry.trim()).map_err(|problem| KeyringError {
                    setting: PREVIOUS_SETTING,
                    entry: Some(index + 1),
                    problem,
                })?;
                older.push(kek);
            }
        }
        Self::new(current, older)
    }

    /// Reads `PII_KEK` and `PII_KEK_PREVIOUS` from the environment and parses them.
    ///
    /// # Errors
    /// As [`Keyring::parse`]; a value that is not Unicode is reported as not base64.
    pub fn from_env() -> Result<Self, KeyringError> {
        let read = |setting: &'static str| match std::env::var(setting) {
            Ok(value) => Ok(Some(Zeroizing::new(value))),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(_)) => Err(KeyringError {
                setting,
                entry: None,
                problem: KeyringProblem::NotBase64,
            }),
        };
        let current = read(CURRENT_SETTING)?;
        let previous = read(PREVIOUS_SETTING)?;
        Self::parse(
            current.as_ref().map(|v| v.as_str()),
            previous.as_ref().map(|v| v.as_str()),
        )
    }

    /// Keyed digests of `message` (HMAC-SHA256, lower-case hex), one per KEK, the current
    /// KEK's first: for fingerprints of requests that may hold personal data (a name, a
    /// reference), which are stored and published in clear. An unkeyed hash of a name
    /// would let anyone holding the events confirm a guessed name; these need a KEK. The
    /// key is derived from the KEK (never the KEK itself), so a digest reveals nothing about
    /// it. Store the first; accept any (a request retried across a KEK rotation still
    /// matches while the old KEK is in `PII_KEK_PREVIOUS`).
    pub fn fingerprints(&self, message: &[u8]) -> Vec<String> {
        let digest = |kek: &Kek| {
            let mut mac = <HmacSha256 as Mac>::new_from_slice(&kek.fingerprint_key)
                .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
            mac.update(message);
            hex::encode(mac.finalize().into_bytes())
        };
        let mut digests = vec![digest(self.current())];
        digests.extend(
            self.keys
                .iter()
                .filter(|(id, _)| **id != self.current)
                .map(|(_, kek)| digest(kek)),
        );
        digests
    }

    /// The KEK new keys are wrapped with.
    pub fn current(&self) -> &Kek {
        // The constructor always inserts the current KEK.
        &self.keys[&self.current]
    }

    /// The KEK with this id, if the keyring holds it.
    pub fn get(&self, id: &KekId) -> Option<&Kek> {
        self.keys.get(id)
    }

    /// Every KEK id held, current first.
    pub fn ids(&self) -> Vec<&KekId> {
        let mut ids = vec![&self.current];
        ids.extend(self.keys.keys().filter(|id| **id != self.current));
        ids
    }
}

impl fmt::Debug for Keyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyring")
            .field("current", &self.current)
            .field("ids", &self.ids())
            .finish()
    }
}

/// Parses `<id>:<base64>`, keeping every intermediate copy of the key zeroizing.
fn parse_entry(entry: &str) -> Result<Kek, KeyringProblem> {
    if entry.is_empty() {
        return Err(KeyringProblem::Empty);
    }
    let (id, key) = entry.split_once(':').ok_or(KeyringProblem::NoSeparator)?;
    let id = KekId::new(id.trim()).ok_or(KeyringProblem::InvalidId)?;
    let key = key.trim();
    let decoded = Zeroizing::new(
        STANDARD
            .decode(key)
            .or_else(|_| STANDARD_NO_PAD.decode(key))
            .map_err(|_| KeyringProblem::NotBase64)?,
    );
    let bytes: [u8; KEY_LEN] =
        decoded
            .as_slice()
            .try_into()
            .map_err(|_| KeyringProblem::WrongLength {
                found: decoded.len(),
            })?;
    Ok(Kek::new(id, bytes))
}

/// A setting that does not give a usable keyring. Its message names the setting and the
/// list entry; it never contains the setting's value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{setting}{}: {problem}", entry.map(|n| format!(" (entry {n})")).unwrap_or_default())]
pub struct KeyringError {
    /// `PII_KEK` or `PII_KEK_PREVIOUS`.
    pub setting: &'static str,
    /// The 1-based position in `PII_KEK_PREVIOUS`'s list; `None` for `PII_KEK`.
    pub entry: Option<usize>,
    /// What is wrong.
    pub problem: KeyringProblem,
}

/// What is wrong with a KEK setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyringProblem {
    /// The required setting is unset or blank.
    #[error("missing: set it to `<id>:<base64 of {KEY_LEN} random bytes>`")]
    Missing,
    /// An empty entry in the list (e.g. two commas in a row).
    #[error("empty entry in the comma-separated list")]
    Empty,
    /// No `:` between id and key.
    #[error("expected `<id>:<base64 key>` (no `:` found)")]
    NoSeparator,
    /// The id breaks the id rules.
    #[error("the key id must be 1–{MAX_ID_LEN} characters from A–Z a–z 0–9 . _ -")]
    InvalidId,
    /// The key part is not base64.
    #[error("the key is not valid base64")]
    NotBase64,
    /// The key decodes to the wrong number of bytes.
    #[error("the key must decode to {KEY_LEN} bytes, not {found}")]
    WrongLength {
        /// Bytes found.
        found: usize,
    },
    /// Two KEKs share an id.
    #[error("key id `{0}` is given more than once")]
    DuplicateId(KekId),
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const KEY_A: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    const KEY_B: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";

    /// Current, previous, then the setting, entry and problem reported.
    type Case = (
        Option<String>,
        Option<String>,
        &'static str,
        Option<usize>,
        KeyringProblem,
    );

    fn err(current: Option<&str>, previous: Option<&str>) -> KeyringError {
        Keyring::parse(current, previous).unwrap_err()
    }

    #[test]
    fn a_current_and_two_previous_keks_parse_with_their_ids() {
        let ring = Keyring::parse(
            Some(&format!("k3:{KEY_A}")),
            Some(&format!(" k1:{KEY_B} , k2:{}", KEY_B.trim_end_matches('='))),
        )
        .unwrap();
        assert_eq!(ring.current().id().as_str(), "k3");
        assert_eq!(ring.current().key_bytes()[1], 1);
        let ids: Vec<&str> = ring.ids().iter().map(|id| id.as_str()).collect();
        assert_eq!(ids, ["k3", "k1", "k2"]);
        assert_eq!(
            ring.get(&KekId::new("k1").unwrap()).unwrap().key_bytes()[0],
            0x20
        );
    }

    #[test]
    fn a_missing_or_blank_current_kek_names_the_setting() {
        for current in [None, Some(""), Some("   ")] {
            let e = err(current, None);
            assert_eq!(e.setting, "PII_KEK");
            assert_eq!(e.problem, KeyringProblem::Missing);
            assert!(e.to_string().starts_with("PII_KEK: missing"), "{e}");
        }
    }

    #[test]
    fn each_parse_error_names_the_setting_and_the_problem_and_never_the_key() {
        // A 32-byte key that is also a valid id: pasting it without an id must not echo it.
        let bare_key = KEY_A;
        let short = "c2hvcnQta2V5LW1hdGVyaWFs"; // 18 bytes
        let cases: Vec<Case> = vec![
            (
                Some(bare_key.into()),
                None,
                "PII_KEK",
                None,
                KeyringProblem::NoSeparator,
            ),
            (
                Some(format!("k1:{short}")),
                None,
                "PII_KEK",
                None,
                KeyringProblem::WrongLength { found: 18 },
            ),
            (
                Some("k1:not base64!!".into()),
                None,
                "PII_KEK",
                None,
                KeyringProblem::NotBase64,
            ),
            (
                Some(format!("bad id:{KEY_A}")),
                None,
                "PII_KEK",
                None,
                KeyringProblem::InvalidId,
            ),
            (
                Some(format!("{KEY_B}:{KEY_A}")),
                None,
                "PII_KEK",
                None,
                KeyringProblem::InvalidId,
            ),
            (
                Some(format!("k1:{KEY_A}")),
                Some(format!("k0:{KEY_B},k1:{KEY_B}")),
                "PII_KEK_PREVIOUS",
                Some(2),
                KeyringProblem::DuplicateId(KekId::new("k1").unwrap()),
            ),
            (
                Some(format!("k1:{KEY_A}")),
                Some(format!("k0:{KEY_B},,")),
                "PII_KEK_PREVIOUS",
                Some(2),
                KeyringProblem::Empty,
            ),
            (
                Some(format!("k1:{KEY_A}")),
                Some(format!("k0:{short}")),
                "PII_KEK_PREVIOUS",
                Some(1),
                KeyringProblem::WrongLength { found: 18 },
            ),
        ];
        for (current, previous, setting, entry, problem) in cases {
            let e = err(current.as_deref(), previous.as_deref());
            assert_eq!((e.setting, e.entry, &e.problem), (setting, entry, &problem));
            let message = e.to_string();
            assert!(message.starts_with(setting), "{message}");
            for secret in [KEY_A, KEY_B, short, "not base64"] {
                assert!(!message.contains(secret), "{message} echoes key material");
                assert!(
                    !format!("{e:?}").contains(secret),
                    "{e:?} echoes key material"
                );
            }
        }
    }

    #[test]
    fn debug_output_shows_ids_and_never_key_bytes() {
        let ring =
            Keyring::parse(Some(&format!("k1:{KEY_A}")), Some(&format!("k0:{KEY_B}"))).unwrap();
        let shown = format!("{ring:?} {:?}", ring.current());
        assert!(shown.contains("k1") && shown.contains("k0"), "{shown}");
        // The first key's bytes are 0, 1, 2, …: a byte array or its base64 would show them.
        assert!(
            !shown.contains(KEY_A) && !shown.contains("[0, 1, 2"),
            "{shown}"
        );
        assert!(!shown.contains("32, 33, 34"), "{shown}");
    }

    #[test]
    fn fingerprints_are_keyed_by_the_kek_and_still_match_after_a_rotation() {
        let old =
            Keyring::parse(Some("a:KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio="), None).unwrap();
        let rotated = Keyring::parse(
            Some("b:AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="),
            Some("a:KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio="),
        )
        .unwrap();
        let message = b"POST\n/v1/subjects\n{\"name\":\"Ada\"}";
        let before = old.fingerprints(message);
        let after = rotated.fingerprints(message);
        assert_eq!(before.len(), 1);
        assert_eq!(after.len(), 2);
        assert_ne!(after[0], before[0], "a new KEK gives a new digest");
        assert!(
            after.contains(&before[0]),
            "the old KEK's digest is still accepted"
        );
        assert_ne!(old.fingerprints(b"other")[0], before[0]);
        // Not the unkeyed hash anyone could compute.
        use sha2::Digest;
        assert_ne!(before[0], hex::encode(sha2::Sha256::digest(message)));
    }
}
