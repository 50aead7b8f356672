//! The MQTT connection settings both binaries share.
//!
//! The edge agent (`[mqtt]` in `edge.toml`) and the hub (`[mqtt]` in `hub.toml`) connect
//! the same way: plain TCP on loopback by default (the zero-configuration demo), or TLS
//! with the broker's certificate verified against a CA file and, for mutual TLS, a client
//! certificate whose identity (its common name) the broker maps to the user name that
//! its ACL checks. Passwords are [`Secret`]s: never printed, redacted when a
//! configuration is shown.
//!
//! TLS runs on rustls with the *ring* provider only.

pub mod pem;
mod secret;
mod tls;

pub use secret::Secret;
pub use tls::{client_config, transport, TlsError, TlsSettings};
