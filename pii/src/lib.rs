//! Crypto-shredding of personal data (issue 17, ADR 0019): every personal field is
//! encrypted with its data subject's own key, and forgetting a subject is destroying that
//! key. The event log stays immutable; what it holds about an erased subject becomes noise.
//!
//! # The envelope scheme
//!
//! ```text
//! PII_KEK / PII_KEK_PREVIOUS (configuration)      one per deployment, rotated by operators
//!   └─ wraps ─→ data key of subject S, version v   one per subject; table `subject_keys`
//!                 └─ seals ─→ field F of event E   "pii1.<v>.<base64url(nonce‖ct‖tag)>"
//! ```
//!
//! - **Key-encryption keys** ([`keyring`]): 32-byte keys with public ids, from the
//!   `PII_KEK` (current) and `PII_KEK_PREVIOUS` (older, for rotation) settings. They never
//!   touch the database.
//! - **Data keys** ([`data_key`]): 32 random bytes per subject (and version), generated from
//!   the operating system's randomness and stored only wrapped by a KEK: XChaCha20-Poly1305
//!   with a random 24-byte nonce, the associated data binding the KEK id, the subject id
//!   and the key version, so a wrapped key copied to another row does not unwrap.
//! - **Fields** ([`field`]): each personal value of each event is sealed on its own with
//!   XChaCha20-Poly1305 under the subject's data key and a random nonce; the associated data
//!   binds the subject, the key version, the **event id** and the **field name**, so a
//!   ciphertext moved to another event or field fails authentication. The text form is
//!   `pii1.<key version>.<base64url>`: a JSON string, so events, snapshots and Kafka
//!   messages stay JSON, and a reader can tell which key version to load.
//! - **Erasure** ([`store::KeyStore::erase`]): the wrapped key bytes are deleted and the
//!   row kept as a tombstone (erasing again answers the same; an unknown subject is told
//!   apart). Every copy of every ciphertext of that subject — events, snapshots, Kafka,
//!   dead letters, backups of those — is then unreadable. Read models show
//!   [`ERASED_MARKER`] in place of each personal field.
//! - **Rotation** ([`store::KeyStore::rewrap_all`]): a new `PII_KEK`, the old one moved to
//!   `PII_KEK_PREVIOUS`, then every live data key rewrapped under the new KEK; the data
//!   keys themselves, and so every ciphertext, stay as they are.
//!
//! Key material is zeroized on drop (the `zeroize` crate; the cipher instances zeroize
//! their own copy) and no `Debug` output prints it; error messages never contain key
//! material, ciphertext or plaintext.
//!
//! # Layout
//!
//! - [`keyring`]: [`Kek`], [`Keyring`], parsing the settings ([`KeyringError`] names the
//!   setting).
//! - [`data_key`]: [`DataKey`], [`SubjectKey`], wrapping and unwrapping.
//! - [`field`]: [`SubjectKey::encrypt`] / [`SubjectKey::decrypt`], the `pii1.` text form.
//! - [`store`]: [`KeyStore`] on the `subject_keys` table (migration
//!   `20261130092001_subject_keys.sql`) with a moka cache of unwrapped keys.
//! - [`legacy`]: moving names and references written in clear before subjects existed
//!   into subjects and ciphertext (`ledger-admin pii migrate-legacy`).
//! - `aead` (private): the one AEAD construction all of the above use.

mod aead;
pub mod data_key;
pub mod field;
pub mod keyring;
pub mod legacy;
pub mod store;
pub mod testing;

pub use data_key::{DataKey, SubjectKey, UnwrapError, WrappedKey};
pub use field::{is_encrypted, Ciphertext, FieldError};
pub use keyring::{Kek, KekId, Keyring, KeyringError, KeyringProblem};
pub use store::{
    CacheSettings, DecryptError, Erasure, KeyStore, RewrapFailure, RewrapReport, StoreError,
    ERASURE_CHANNEL,
};

/// What read models show in place of a personal field whose subject was erased (owner
/// name, statement reference, …). A fixed string, not an empty one, so a reader can tell
/// "erased" from "never given"; the brackets keep it from being mistaken for a name.
/// Projections write it when they apply a subject's erasure event, and whenever they
/// decrypt a field and get [`DecryptError::KeyErased`] (a rebuild or replay after the
/// erasure), so a rebuild gives the same rows as live.
pub const ERASED_MARKER: &str = "[erased]";
