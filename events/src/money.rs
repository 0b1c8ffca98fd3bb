//! Money: an ISO 4217 currency and a positive amount in integer minor units.
//!
//! Floats never appear: amounts are `i64` minor units (cents for EUR), and every arithmetic
//! step that could overflow is checked.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An ISO 4217 alphabetic currency code, validated against the standard's list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency(iso_currency::Currency);

/// Why a currency code was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not an ISO 4217 currency code (three upper-case letters, e.g. EUR)")]
pub struct CurrencyError(pub String);

impl Currency {
    /// The three-letter code, e.g. `EUR`.
    pub fn code(&self) -> &'static str {
        self.0.code()
    }
}

impl FromStr for Currency {
    type Err = CurrencyError;

    fn from_str(code: &str) -> Result<Self, Self::Err> {
        // The standard's codes are upper case; accepting `eur` would let two spellings of one
        // currency into the log.
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(CurrencyError(code.to_owned()));
        }
        iso_currency::Currency::from_code(code)
            .map(Self)
            .ok_or_else(|| CurrencyError(code.to_owned()))
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        code.parse().map_err(serde::de::Error::custom)
    }
}

/// A strictly positive amount of minor units (e.g. cents).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Amount(i64);

/// Why an amount was refused. Each variant has a stable machine-readable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    /// Zero or negative.
    #[error("amount must be a positive number of minor units, got {0}")]
    NotPositive(String),
    /// Larger than the largest representable amount (2^63 - 1 minor units).
    #[error("amount {0} exceeds the largest supported amount ({max})", max = i64::MAX)]
    Overflow(String),
    /// Not a whole number of minor units.
    #[error("amount must be written as an integer number of minor units (no fraction, no exponent), got {0}")]
    NotInteger(String),
}

impl AmountError {
    /// The stable code clients may match on.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotPositive(_) => "amount_not_positive",
            Self::Overflow(_) => "amount_overflow",
            Self::NotInteger(_) => "amount_not_integer",
        }
    }
}

impl Amount {
    /// A positive amount, or why not.
    pub fn new(minor_units: i64) -> Result<Self, AmountError> {
        if minor_units <= 0 {
            return Err(AmountError::NotPositive(minor_units.to_string()));
        }
        Ok(Self(minor_units))
    }

    /// Reads an amount from any JSON number, telling apart the three ways it can be wrong.
    pub fn from_json_number(number: &serde_json::Number) -> Result<Self, AmountError> {
        if let Some(value) = number.as_i64() {
            return Self::new(value);
        }
        if number.as_u64().is_some() {
            return Err(AmountError::Overflow(number.to_string()));
        }
        // A float: either an integer too large for u64 (serde_json falls back to f64), or a
        // fraction, or an exponent form. Huge magnitudes are overflow, the rest not integers.
        let value = number.as_f64().unwrap_or(f64::NAN);
        // Zero however written (`-0`, which serde_json reads as the float -0.0, or `0.0`)
        // is zero: not positive, like `0`.
        if value == 0.0 {
            return Err(AmountError::NotPositive("0".into()));
        }
        if value.is_finite() && value.fract() == 0.0 && value.abs() >= 9.223_372_036_854_775e18 {
            if value < 0.0 {
                return Err(AmountError::NotPositive(number.to_string()));
            }
            return Err(AmountError::Overflow(number.to_string()));
        }
        Err(AmountError::NotInteger(number.to_string()))
    }

    /// The number of minor units.
    pub fn minor_units(self) -> i64 {
        self.0
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let number = serde_json::Number::deserialize(deserializer)?;
        Self::from_json_number(&number).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn number(text: &str) -> serde_json::Number {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn currency_accepts_iso_codes_and_refuses_the_rest() {
        assert_eq!("EUR".parse::<Currency>().unwrap().code(), "EUR");
        assert_eq!("JPY".parse::<Currency>().unwrap().to_string(), "JPY");
        for bad in ["eur", "EU", "EURO", "XYZ", "", "€€€", "E R"] {
            assert!(bad.parse::<Currency>().is_err(), "{bad:?} was accepted");
        }
    }

    #[test]
    fn amounts_are_positive_integers_within_i64() {
        assert_eq!(
            Amount::from_json_number(&number("1"))
                .unwrap()
                .minor_units(),
            1
        );
        assert_eq!(
            Amount::from_json_number(&number("9223372036854775807"))
                .unwrap()
                .minor_units(),
            i64::MAX
        );
        let cases = [
            ("0", "amount_not_positive"),
            ("-5", "amount_not_positive"),
            ("9223372036854775808", "amount_overflow"),
            ("18446744073709551616", "amount_overflow"),
            ("100000000000000000000000000", "amount_overflow"),
            ("-100000000000000000000000000", "amount_not_positive"),
            ("-0", "amount_not_positive"),
            ("-0.0", "amount_not_positive"),
            ("0.0", "amount_not_positive"),
            ("0e3", "amount_not_positive"),
            ("1.5", "amount_not_integer"),
            ("1e3", "amount_not_integer"),
        ];
        for (text, code) in cases {
            let err = Amount::from_json_number(&number(text)).unwrap_err();
            assert_eq!(err.code(), code, "for {text}");
        }
    }
}
