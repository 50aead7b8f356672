//! A secret text (a password, a token): readable only through [`Secret::expose`].

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a [`Secret`] shows wherever it is printed or serialized.
pub const REDACTED: &str = "<redacted>";

/// A secret text. `Debug`, `Display` and serialization print [`REDACTED`], so showing a
/// configuration (`--print-config`, a log line) never leaks it; the value is read only
/// through [`Secret::expose`], where it is used.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret text.
    pub fn new(text: impl Into<String>) -> Secret {
        Secret(text.into())
    }

    /// The secret text itself, for the one place that needs it (a connect packet).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    /// Any text is a secret (command-line flags and environment variables).
    fn from_str(text: &str) -> Result<Secret, Self::Err> {
        Ok(Secret::new(text))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(REDACTED)
    }
}

/// A secret given as a string, or as a number or boolean (an override such as
/// `INSP_EDGE__MQTT__PASSWORD=123456` is read as a TOML literal first), taken as its text.
#[derive(Deserialize)]
#[serde(untagged)]
enum Scalar {
    Text(String),
    Integer(i64),
    Float(f64),
    Boolean(bool),
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
        Ok(Secret(match Scalar::deserialize(d)? {
            Scalar::Text(s) => s,
            Scalar::Integer(i) => i.to_string(),
            Scalar::Float(f) => f.to_string(),
            Scalar::Boolean(b) => b.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, Deserialize)]
    struct Holder {
        password: Secret,
    }

    #[test]
    fn a_secret_is_never_shown() {
        let h: Holder = toml::from_str("password = \"hunter2\"").unwrap();
        assert_eq!(h.password.expose(), "hunter2");
        let shown = toml::to_string(&h).unwrap();
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains(REDACTED), "{shown}");
        assert!(!format!("{:?} {}", h.password, h.password).contains("hunter2"));
        let h: Holder = toml::from_str("password = 123456").unwrap();
        assert_eq!(h.password.expose(), "123456");
    }
}
