//! Field encryption: one personal field of one event, sealed with its subject's data key.
//!
//! The text form is `pii1.<key version>.<base64url(nonce || ciphertext || tag)>` (no
//! padding), so an encrypted field is an ordinary JSON string in events, snapshots and Kafka
//! messages. The associated data is `("ledger-pii/field/1", subject id, key version, event
//! id, field name)`: a ciphertext moved to another event, another field, another subject or
//! relabelled with another version fails authentication.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use uuid::Uuid;

use crate::aead::{self, Context, OpenError, NONCE_LEN, TAG_LEN};
use crate::data_key::SubjectKey;

/// The prefix of the current text form.
pub const PREFIX: &str = "pii1";

/// An encrypted field's text, parsed but not yet decrypted: enough to know which key
/// version to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ciphertext {
    key_version: u32,
    sealed: Vec<u8>,
}

impl Ciphertext {
    /// Parses `pii1.<version>.<base64url>`.
    ///
    /// # Errors
    /// [`FieldError::Malformed`] with what is wrong.
    pub fn parse(text: &str) -> Result<Self, FieldError> {
        let mut parts = text.splitn(3, '.');
        let (Some(prefix), Some(version), Some(body)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(FieldError::Malformed(
                "not of the form pii1.<version>.<data>",
            ));
        };
        if prefix != PREFIX {
            return Err(FieldError::Malformed("unknown prefix (expected pii1)"));
        }
        let canonical = !version.is_empty()
            && version.bytes().all(|b| b.is_ascii_digit())
            && !version.starts_with('0');
        let key_version = canonical
            .then(|| version.parse::<u32>().ok())
            .flatten()
            .ok_or(FieldError::Malformed(
                "the key version is not a positive integer",
            ))?;
        let sealed = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| FieldError::Malformed("the data is not unpadded base64url"))?;
        if sealed.len() < NONCE_LEN + TAG_LEN {
            return Err(FieldError::Malformed(
                "the data is shorter than a nonce and a tag",
            ));
        }
        Ok(Self {
            key_version,
            sealed,
        })
    }

    /// The data-key version that sealed it.
    pub fn key_version(&self) -> u32 {
        self.key_version
    }
}

/// Whether `text` looks like an encrypted field (has the `pii1.` prefix). The upcast of
/// old events uses it to tell plain text from ciphertext; [`Ciphertext::parse`] decides.
pub fn is_encrypted(text: &str) -> bool {
    text.strip_prefix(PREFIX)
        .is_some_and(|rest| rest.starts_with('.'))
}

impl SubjectKey {
    /// Encrypts one field of one event; returns the `pii1.…` text.
    pub fn encrypt(&self, event_id: Uuid, field: &str, plaintext: &str) -> String {
        let aad = field_context(self.subject(), self.version(), event_id, field);
        let sealed = aead::seal(self.key().bytes(), aad.bytes(), plaintext.as_bytes());
        format!(
            "{PREFIX}.{}.{}",
            self.version(),
            URL_SAFE_NO_PAD.encode(sealed)
        )
    }

    /// Decrypts a field [`SubjectKey::encrypt`] produced for this subject, event and field.
    ///
    /// # Errors
    /// [`FieldError`]: malformed text, a ciphertext of another key version, or one that
    /// does not authenticate (other key, event, field or subject, or altered). Never an
    /// empty string in place of the value.
    pub fn decrypt(&self, event_id: Uuid, field: &str, text: &str) -> Result<String, FieldError> {
        self.decrypt_parsed(event_id, field, &Ciphertext::parse(text)?)
    }

    /// As [`SubjectKey::decrypt`], for text already parsed.
    ///
    /// # Errors
    /// As [`SubjectKey::decrypt`].
    pub fn decrypt_parsed(
        &self,
        event_id: Uuid,
        field: &str,
        ciphertext: &Ciphertext,
    ) -> Result<String, FieldError> {
        if ciphertext.key_version != self.version() {
            return Err(FieldError::WrongKeyVersion {
                ciphertext: ciphertext.key_version,
                key: self.version(),
            });
        }
        let aad = field_context(self.subject(), self.version(), event_id, field);
        let plain = aead::open(self.key().bytes(), aad.bytes(), &ciphertext.sealed).map_err(
            |e| match e {
                OpenError::TooShort => {
                    FieldError::Malformed("the data is shorter than a nonce and a tag")
                }
                OpenError::Authentication => FieldError::AuthenticationFailed,
            },
        )?;
        // Only this crate seals, and only from a `&str`: authenticated bytes are UTF-8.
        String::from_utf8(plain)
            .map_err(|_| FieldError::Malformed("the authenticated plaintext is not UTF-8"))
    }
}

fn field_context(subject: Uuid, version: u32, event_id: Uuid, field: &str) -> Context {
    let mut aad = Context::new("ledger-pii/field/1");
    aad.part(subject.as_bytes())
        .part(&version.to_be_bytes())
        .part(event_id.as_bytes())
        .part(field.as_bytes());
    aad
}

/// Why an encrypted field could not be read. Messages never contain the ciphertext or any
/// plaintext.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    /// The text is not a `pii1.` ciphertext.
    #[error("malformed encrypted field: {0}")]
    Malformed(&'static str),
    /// The text was sealed with another version of the subject's key than the one given.
    #[error("the field was encrypted with key version {ciphertext}, not {key}")]
    WrongKeyVersion {
        /// The version the text names.
        ciphertext: u32,
        /// The version of the key given.
        key: u32,
    },
    /// The tag does not match: another subject's key, another event or field, or altered
    /// bytes.
    #[error("the encrypted field failed authentication (wrong key, event or field, or altered)")]
    AuthenticationFailed,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::data_key::DataKey;

    fn key(version: u32) -> SubjectKey {
        SubjectKey::new(Uuid::new_v4(), version, DataKey::generate())
    }

    #[test]
    fn a_field_round_trips_and_its_text_is_a_versioned_url_safe_string() {
        let k = key(7);
        let event = Uuid::new_v4();
        for plain in ["Zoë Ångström-Øre", "", "invoice 7: 🧾"] {
            let text = k.encrypt(event, "owner", plain);
            assert!(text.starts_with("pii1.7."), "{text}");
            assert!(is_encrypted(&text));
            assert!(text[7..]
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
            assert!(!text.contains(plain) || plain.is_empty());
            assert_eq!(Ciphertext::parse(&text).unwrap().key_version(), 7);
            assert_eq!(k.decrypt(event, "owner", &text).unwrap(), plain);
        }
        // Random nonces: the same value twice gives two texts.
        assert_ne!(
            k.encrypt(event, "owner", "Alice"),
            k.encrypt(event, "owner", "Alice")
        );
    }

    #[test]
    fn another_event_field_subject_or_key_fails_authentication() {
        let k = key(1);
        let event = Uuid::new_v4();
        let text = k.encrypt(event, "owner", "Alice");
        let fails = FieldError::AuthenticationFailed;
        assert_eq!(
            k.decrypt(Uuid::new_v4(), "owner", &text),
            Err(fails.clone())
        );
        assert_eq!(k.decrypt(event, "reference", &text), Err(fails.clone()));
        // Same key bytes, another subject: the subject is bound too.
        let other_subject = SubjectKey::new(Uuid::new_v4(), 1, k.key().clone());
        assert_eq!(
            other_subject.decrypt(event, "owner", &text),
            Err(fails.clone())
        );
        assert_eq!(key(1).decrypt(event, "owner", &text), Err(fails));
    }

    #[test]
    fn a_tampered_or_relabelled_ciphertext_fails_authentication() {
        let k = key(1);
        let event = Uuid::new_v4();
        let text = k.encrypt(event, "owner", "Alice");
        let mut sealed = URL_SAFE_NO_PAD.decode(&text[7..]).unwrap();
        for at in [0, NONCE_LEN, sealed.len() - 1] {
            sealed[at] ^= 0x01;
            let tampered = format!("pii1.1.{}", URL_SAFE_NO_PAD.encode(&sealed));
            assert_eq!(
                k.decrypt(event, "owner", &tampered),
                Err(FieldError::AuthenticationFailed)
            );
            sealed[at] ^= 0x01;
        }
        // Relabelled as version 2 and decrypted with a version-2 key of the same bytes.
        let v2 = SubjectKey::new(k.subject(), 2, k.key().clone());
        let relabelled = text.replacen("pii1.1.", "pii1.2.", 1);
        assert_eq!(
            v2.decrypt(event, "owner", &relabelled),
            Err(FieldError::AuthenticationFailed)
        );
        assert_eq!(
            k.decrypt(event, "owner", &relabelled),
            Err(FieldError::WrongKeyVersion {
                ciphertext: 2,
                key: 1
            })
        );
    }

    #[test]
    fn malformed_text_is_a_typed_error_never_a_panic_or_an_empty_string() {
        let k = key(1);
        let event = Uuid::new_v4();
        let valid = k.encrypt(event, "owner", "Alice");
        let body = &valid[7..];
        for text in [
            "Alice".to_owned(),
            String::new(),
            "pii1".into(),
            "pii1.1".into(),
            format!("pii2.1.{body}"),
            format!("pii1.0.{body}"),
            format!("pii1.01.{body}"),
            format!("pii1.+1.{body}"),
            format!("pii1.99999999999.{body}"),
            format!("pii1.1.{body}="),
            format!("pii1.1.{}", body.replace('-', "+")),
            "pii1.1.AAAA".into(),
            "pii1.1.".into(),
        ] {
            match k.decrypt(event, "owner", &text) {
                Err(FieldError::Malformed(_)) => {}
                // A body with a `-` turned into `+` may have none to turn.
                Ok(plain) if text == valid => assert_eq!(plain, "Alice"),
                other => panic!("{text:?} gave {other:?}"),
            }
        }
        assert!(!is_encrypted("Alice") && !is_encrypted("pii1") && !is_encrypted("pii10.x"));
    }
}
