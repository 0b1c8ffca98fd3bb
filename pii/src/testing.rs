//! The key-encryption key every test and benchmark of the ledger runs with: id `test`, 32
//! bytes of 0x2a. Never a production value: a deployment reads its own from `PII_KEK`.

use sqlx::PgPool;

use crate::keyring::Keyring;
use crate::store::{CacheSettings, KeyStore};

/// `PII_KEK`'s value in tests and benchmarks.
pub const TEST_KEK: &str = "test:KioqKioqKioqKioqKioqKioqKioqKioqKioqKioqKio=";

/// The keyring of [`TEST_KEK`] alone.
///
/// # Panics
/// Never: the constant parses.
pub fn test_keyring() -> Keyring {
    Keyring::parse(Some(TEST_KEK), None).unwrap_or_else(|err| panic!("{err}"))
}

/// A key store over `pool` with [`test_keyring`] and the default cache.
pub fn test_key_store(pool: &PgPool) -> KeyStore {
    KeyStore::new(pool.clone(), test_keyring(), CacheSettings::default())
}
