//! The one AEAD every layer uses: XChaCha20-Poly1305 with a fresh random 24-byte nonce per
//! message (large enough that random nonces never repeat in practice), sealed output laid
//! out as `nonce || ciphertext || tag`, and associated data built from length-prefixed
//! parts so no two different contexts can produce the same bytes.

use chacha20poly1305::aead::rand_core::RngCore as _;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{Key, XChaCha20Poly1305, XNonce};

use crate::keyring::KEY_LEN;

/// Nonce length (XChaCha20).
pub(crate) const NONCE_LEN: usize = 24;
/// Tag length (Poly1305).
pub(crate) const TAG_LEN: usize = 16;

/// Associated data: a domain label, then each part as a 4-byte length and its bytes.
pub(crate) struct Context(Vec<u8>);

impl Context {
    pub(crate) fn new(label: &str) -> Self {
        let mut ctx = Self(Vec::with_capacity(96));
        ctx.part(label.as_bytes());
        ctx
    }

    pub(crate) fn part(&mut self, bytes: &[u8]) -> &mut Self {
        // Parts are ids and field names: far below 4 GiB.
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(bytes);
        self
    }

    pub(crate) fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Encrypts `plaintext` under `key`, binding `aad`; returns `nonce || ciphertext || tag`.
pub(crate) fn seal(key: &[u8; KEY_LEN], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key));
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let sealed = cipher
        .encrypt(
            &nonce,
            Payload {
                msg: plaintext,
                aad,
            },
        )
        // XChaCha20-Poly1305 fails only for messages over 256 GiB.
        .unwrap_or_default();
    let mut out = Vec::with_capacity(NONCE_LEN + sealed.len());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Why [`open`] failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OpenError {
    /// Shorter than a nonce and a tag.
    TooShort,
    /// The tag does not match: wrong key, wrong associated data, or altered bytes.
    Authentication,
}

/// Decrypts `nonce || ciphertext || tag` under `key` and `aad`.
pub(crate) fn open(key: &[u8; KEY_LEN], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return Err(OpenError::TooShort);
    }
    let (nonce, body) = sealed.split_at(NONCE_LEN);
    let cipher = XChaCha20Poly1305::new(Key::from_slice(key));
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad })
        .map_err(|_| OpenError::Authentication)
}

/// Fills `key` in place from the operating system's random source.
pub(crate) fn fill_random(key: &mut [u8; KEY_LEN]) {
    OsRng.fill_bytes(key);
}
