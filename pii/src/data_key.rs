//! Per-subject data keys: generated from the OS's randomness, stored only wrapped by a KEK.
//!
//! A wrapped key is `nonce || ciphertext || tag` (72 bytes) under the KEK it names, with
//! associated data `("ledger-pii/data-key/1", kek id, subject id, key version)`: a wrapped
//! key copied to another subject's row, to another version, or relabelled with another KEK
//! id fails to unwrap.

use std::fmt;

use uuid::Uuid;
use zeroize::{Zeroize, ZeroizeOnDrop};

use crate::aead::{self, Context, OpenError};
use crate::keyring::{KekId, Keyring, KEY_LEN};

/// A subject's data key: 32 secret bytes, zeroized on drop, never printed.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_LEN]);

impl DataKey {
    /// A fresh key from the operating system's random source.
    pub fn generate() -> Self {
        let mut key = Self([0; KEY_LEN]);
        aead::fill_random(&mut key.0);
        key
    }

    pub(crate) fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey(<redacted>)")
    }
}

/// One version of one subject's data key, ready to encrypt and decrypt fields
/// ([`SubjectKey::encrypt`], [`SubjectKey::decrypt`]).
#[derive(Clone)]
pub struct SubjectKey {
    subject: Uuid,
    version: u32,
    key: DataKey,
}

impl SubjectKey {
    /// Puts a subject's id and key version beside its key.
    pub fn new(subject: Uuid, version: u32, key: DataKey) -> Self {
        Self {
            subject,
            version,
            key,
        }
    }

    /// The data subject.
    pub fn subject(&self) -> Uuid {
        self.subject
    }

    /// The key's version (1 for a subject's first key).
    pub fn version(&self) -> u32 {
        self.version
    }

    pub(crate) fn key(&self) -> &DataKey {
        &self.key
    }

    /// Wraps this key with the keyring's current KEK.
    pub fn wrap(&self, keyring: &Keyring) -> WrappedKey {
        let kek = keyring.current();
        let aad = wrap_context(kek.id(), self.subject, self.version);
        WrappedKey {
            kek_id: kek.id().clone(),
            bytes: aead::seal(kek.key_bytes(), aad.bytes(), self.key.bytes()),
        }
    }

    /// Unwraps `wrapped`, the key of `subject` at `version`, with the KEK it names.
    ///
    /// # Errors
    /// [`UnwrapError`]: the keyring lacks that KEK, or the bytes do not authenticate under it
    /// for this subject and version.
    pub fn unwrap(
        keyring: &Keyring,
        subject: Uuid,
        version: u32,
        wrapped: &WrappedKey,
    ) -> Result<Self, UnwrapError> {
        let kek = keyring
            .get(&wrapped.kek_id)
            .ok_or_else(|| UnwrapError::UnknownKek(wrapped.kek_id.clone()))?;
        let aad = wrap_context(kek.id(), subject, version);
        let plain = zeroize::Zeroizing::new(
            aead::open(kek.key_bytes(), aad.bytes(), &wrapped.bytes).map_err(|e| match e {
                OpenError::TooShort => UnwrapError::Malformed,
                OpenError::Authentication => UnwrapError::AuthenticationFailed(kek.id().clone()),
            })?,
        );
        let mut key = DataKey([0; KEY_LEN]);
        if plain.len() != KEY_LEN {
            return Err(UnwrapError::Malformed);
        }
        key.0.copy_from_slice(&plain);
        Ok(Self::new(subject, version, key))
    }
}

impl fmt::Debug for SubjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SubjectKey")
            .field("subject", &self.subject)
            .field("version", &self.version)
            .field("key", &self.key)
            .finish()
    }
}

fn wrap_context(kek: &KekId, subject: Uuid, version: u32) -> Context {
    let mut aad = Context::new("ledger-pii/data-key/1");
    aad.part(kek.as_str().as_bytes())
        .part(subject.as_bytes())
        .part(&version.to_be_bytes());
    aad
}

/// A data key as stored: the id of the KEK that wrapped it and the sealed bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct WrappedKey {
    /// The KEK that wrapped it.
    pub kek_id: KekId,
    /// `nonce || ciphertext || tag`.
    pub bytes: Vec<u8>,
}

impl fmt::Debug for WrappedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WrappedKey")
            .field("kek_id", &self.kek_id)
            .field("len", &self.bytes.len())
            .finish()
    }
}

/// Why a wrapped key could not be unwrapped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UnwrapError {
    /// The key names a KEK the keyring does not hold (add it to `PII_KEK_PREVIOUS`).
    #[error(
        "the data key is wrapped by KEK `{0}`, which is neither PII_KEK nor in PII_KEK_PREVIOUS"
    )]
    UnknownKek(KekId),
    /// The bytes do not authenticate under the named KEK for this subject and version: a
    /// different key was configured under that id, or the row was altered or moved.
    #[error("the data key does not authenticate under KEK `{0}`: the key configured under that id in PII_KEK or PII_KEK_PREVIOUS is not the one that wrapped it (or the row was altered)")]
    AuthenticationFailed(KekId),
    /// The stored bytes are not a wrapped key at all.
    #[error("the stored data key is malformed")]
    Malformed,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::keyring::Kek;

    fn kek(id: &str, byte: u8) -> Kek {
        Kek::new(KekId::new(id).unwrap(), [byte; KEY_LEN])
    }

    fn ring(current: Kek, previous: Vec<Kek>) -> Keyring {
        Keyring::new(current, previous).unwrap()
    }

    #[test]
    fn a_wrapped_key_unwraps_to_the_same_key_under_the_kek_it_names() {
        let subject = Uuid::new_v4();
        let key = SubjectKey::new(subject, 1, DataKey::generate());
        let old = ring(kek("k1", 1), vec![]);
        let wrapped = key.wrap(&old);
        assert_eq!(wrapped.kek_id.as_str(), "k1");
        assert_eq!(wrapped.bytes.len(), 24 + 32 + 16);
        // After rotation the previous KEK still unwraps it.
        let rotated = ring(kek("k2", 2), vec![kek("k1", 1)]);
        let back = SubjectKey::unwrap(&rotated, subject, 1, &wrapped).unwrap();
        assert_eq!(back.key().bytes(), key.key().bytes());
        assert_eq!(key.wrap(&rotated).kek_id.as_str(), "k2");
    }

    #[test]
    fn a_key_wrapped_by_a_kek_the_keyring_lacks_is_an_unknown_kek() {
        let subject = Uuid::new_v4();
        let wrapped =
            SubjectKey::new(subject, 1, DataKey::generate()).wrap(&ring(kek("k1", 1), vec![]));
        let err =
            SubjectKey::unwrap(&ring(kek("k2", 2), vec![]), subject, 1, &wrapped).unwrap_err();
        assert_eq!(err, UnwrapError::UnknownKek(KekId::new("k1").unwrap()));
        assert!(err.to_string().contains("PII_KEK_PREVIOUS"), "{err}");
    }

    #[test]
    fn a_wrapped_key_moved_to_another_subject_version_or_kek_id_fails_authentication() {
        let subject = Uuid::new_v4();
        let keys = ring(kek("k1", 1), vec![kek("k0", 1)]); // same bytes, other id
        let wrapped = SubjectKey::new(subject, 1, DataKey::generate()).wrap(&keys);
        let auth = |id: &str| UnwrapError::AuthenticationFailed(KekId::new(id).unwrap());
        assert_eq!(
            SubjectKey::unwrap(&keys, Uuid::new_v4(), 1, &wrapped).unwrap_err(),
            auth("k1")
        );
        assert_eq!(
            SubjectKey::unwrap(&keys, subject, 2, &wrapped).unwrap_err(),
            auth("k1")
        );
        let relabelled = WrappedKey {
            kek_id: KekId::new("k0").unwrap(),
            ..wrapped.clone()
        };
        assert_eq!(
            SubjectKey::unwrap(&keys, subject, 1, &relabelled).unwrap_err(),
            auth("k0")
        );
        let mut tampered = wrapped.clone();
        tampered.bytes[30] ^= 1;
        assert_eq!(
            SubjectKey::unwrap(&keys, subject, 1, &tampered).unwrap_err(),
            auth("k1")
        );
        let short = WrappedKey {
            bytes: vec![0; 10],
            ..wrapped
        };
        assert_eq!(
            SubjectKey::unwrap(&keys, subject, 1, &short).unwrap_err(),
            UnwrapError::Malformed
        );
    }

    #[test]
    fn generated_keys_differ_and_debug_never_prints_them() {
        let (a, b) = (DataKey::generate(), DataKey::generate());
        assert_ne!(a.bytes(), b.bytes());
        let key = SubjectKey::new(Uuid::nil(), 3, a.clone());
        let shown = format!("{key:?} {a:?}");
        assert!(
            shown.contains("redacted") && shown.contains("version: 3"),
            "{shown}"
        );
        assert!(!shown.contains(&format!("{:?}", a.bytes())), "{shown}");
    }
}
