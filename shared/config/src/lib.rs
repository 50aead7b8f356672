//! The one configuration mechanism of `edge-agent` and `cloud-hub`.
//!
//! A binary's settings are one typed struct read from a TOML file. Precedence, lowest
//! first: the struct's defaults, the file, environment variables
//! `PREFIX__SECTION__KEY=value` (e.g. `INSP_EDGE__MQTT__HOST=broker.local`), then
//! `--set section.key=value` flags. Override values are read as TOML literals where they
//! parse (`10`, `true`, `"x"`, `[1, 2]`) and as plain strings otherwise. Unknown keys are
//! errors (the structs deny them), so a typo never falls back to a default silently.
//!
//! ```
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Settings {
//!     #[serde(default)]
//!     port: u16,
//! }
//! let layers = insp_config::Layers::new("INSP_DOC__").set("port=8080");
//! let s: Settings = layers.load(None).unwrap();
//! assert_eq!(s.port, 8080);
//! ```

pub mod lenient;

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// Why a configuration could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// The file is not TOML.
    #[error("the configuration file {path} is not valid TOML: {source}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// Where and why.
        source: toml::de::Error,
    },
    /// An override is not `section.key=value`, or its key crosses a value.
    #[error("{origin}: {reason}")]
    Override {
        /// The flag or environment variable.
        origin: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The layered settings do not fit the typed configuration (unknown key, wrong type).
    #[error("invalid configuration: {0}")]
    Invalid(toml::de::Error),
}

/// The override layers of one binary: its environment prefix and its `--set` flags,
/// plus values set by the binary's own convenience flags.
#[derive(Debug, Clone)]
pub struct Layers {
    env_prefix: String,
    overrides: Vec<Override>,
}

/// One override after the environment's, in the order given.
#[derive(Debug, Clone)]
enum Override {
    /// A `--set section.key=value` flag, its value a TOML literal where it parses.
    Set(String),
    /// A value a typed flag gave (a path, a number), taken as it is.
    Value { key: String, value: toml::Value },
}

impl Layers {
    /// Layers reading environment variables that start with `env_prefix`
    /// (`INSP_EDGE__`, `INSP_HUB__`).
    pub fn new(env_prefix: &str) -> Layers {
        Layers {
            env_prefix: env_prefix.to_string(),
            overrides: Vec::new(),
        }
    }

    /// Adds a `--set section.key=value` flag (applied after the environment, in order).
    pub fn set(mut self, flag: &str) -> Layers {
        self.overrides.push(Override::Set(flag.to_string()));
        self
    }

    /// Adds every `--set` flag of a command line.
    pub fn sets(self, flags: &[String]) -> Layers {
        flags.iter().fold(self, |l, f| l.set(f))
    }

    /// Sets `dotted.key` to a typed value (what a convenience flag such as
    /// `--database-url` gave), applied with the `--set` flags in the order added.
    pub fn value(mut self, key: &str, value: impl Into<toml::Value>) -> Layers {
        self.overrides.push(Override::Value {
            key: key.to_string(),
            value: value.into(),
        });
        self
    }

    /// Reads `path` (if any), applies the environment and the flags, and deserializes.
    pub fn load<T: DeserializeOwned>(&self, path: Option<&Path>) -> Result<T, ConfigError> {
        let tree = self.tree(path, std::env::vars())?;
        tree.try_into().map_err(ConfigError::Invalid)
    }

    /// The layered TOML tree, with `env` standing for the process environment.
    pub fn tree(
        &self,
        path: Option<&Path>,
        env: impl Iterator<Item = (String, String)>,
    ) -> Result<toml::Table, ConfigError> {
        let mut tree = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_path_buf(),
                    source,
                })?;
                text.parse::<toml::Table>()
                    .map_err(|source| ConfigError::Syntax {
                        path: p.to_path_buf(),
                        source,
                    })?
            }
            None => toml::Table::new(),
        };
        let mut vars: Vec<(String, String)> = env
            .filter_map(|(k, v)| Some((k.strip_prefix(&self.env_prefix)?.to_string(), v)))
            .collect();
        vars.sort();
        for (key, value) in vars {
            let origin = format!("environment variable {}{key}", self.env_prefix);
            let key = key.to_ascii_lowercase().replace("__", ".");
            insert(&mut tree, &key, literal(&value))
                .map_err(|reason| ConfigError::Override { origin, reason })?;
        }
        for o in &self.overrides {
            let (origin, key, value) = match o {
                Override::Set(flag) => {
                    let origin = format!("--set {flag}");
                    let Some((key, raw)) = flag.split_once('=') else {
                        return Err(ConfigError::Override {
                            origin,
                            reason: "expected section.key=value".into(),
                        });
                    };
                    (origin, key.trim().to_string(), literal(raw.trim()))
                }
                Override::Value { key, value } => {
                    (format!("the flag for {key}"), key.clone(), value.clone())
                }
            };
            insert(&mut tree, &key, value)
                .map_err(|reason| ConfigError::Override { origin, reason })?;
        }
        Ok(tree)
    }
}

/// `raw` as a TOML literal where it parses (`10`, `true`, `"x"`, `[1, 2]`), else as text.
fn literal(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()))
}

/// Sets `dotted.key` in a TOML tree, making the sections on the way.
fn insert(tree: &mut toml::Table, key: &str, value: toml::Value) -> Result<(), String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("bad key {key:?}: expected section.key"));
    }
    let mut table = tree;
    for part in &parts[..parts.len() - 1] {
        let entry = table
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = match entry {
            toml::Value::Table(t) => t,
            _ => return Err(format!("{part} in {key:?} is a value, not a section")),
        };
    }
    table.insert(parts[parts.len() - 1].to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>()
            .into_iter()
    }

    #[test]
    fn file_then_environment_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.toml");
        std::fs::write(&path, "[mqtt]\nhost = \"file\"\nport = 1\n[a]\nb = 1\n").unwrap();
        let layers = Layers::new("P__")
            .set("mqtt.port=3")
            .value("db.url", "sqlite://x y")
            .set("list=[1, 2]");
        let tree = layers
            .tree(
                Some(&path),
                env(&[
                    ("P__MQTT__HOST", "env"),
                    ("P__MQTT__PORT", "2"),
                    ("OTHER", "x"),
                ]),
            )
            .unwrap();
        assert_eq!(tree["mqtt"]["host"].as_str(), Some("env"));
        assert_eq!(tree["mqtt"]["port"].as_integer(), Some(3));
        assert_eq!(tree["db"]["url"].as_str(), Some("sqlite://x y"));
        assert_eq!(tree["list"].as_array().map(|a| a.len()), Some(2));
        assert_eq!(tree["a"]["b"].as_integer(), Some(1));
        assert!(!tree.contains_key("other"));
    }

    #[test]
    fn bad_overrides_and_files_say_where() {
        let e = Layers::new("P__")
            .set("novalue")
            .tree(None, env(&[]))
            .unwrap_err();
        assert!(e.to_string().contains("--set novalue"), "{e}");
        let e = Layers::new("P__")
            .set("a=1")
            .set("a.b=2")
            .tree(None, env(&[]))
            .unwrap_err();
        assert!(e.to_string().contains("not a section"), "{e}");
        let e = Layers::new("P__")
            .tree(None, env(&[("P__A____B", "1")]))
            .unwrap_err();
        assert!(e.to_string().contains("P__A____B"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[[[").unwrap();
        let e = Layers::new("P__").tree(Some(&path), env(&[])).unwrap_err();
        assert!(matches!(e, ConfigError::Syntax { .. }), "{e}");
        let e = Layers::new("P__")
            .tree(Some(&dir.path().join("absent.toml")), env(&[]))
            .unwrap_err();
        assert!(matches!(e, ConfigError::Read { .. }), "{e}");
    }
}
