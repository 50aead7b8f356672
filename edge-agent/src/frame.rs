//! A frame on its way through the agent, and how frames get their ids.
//!
//! Every frame gets a UUID at the edge, and every consumer (hub, spool replay, reviewers)
//! de-duplicates by it, since delivery is at-least-once. A file's id is derived from the
//! device, the file's path and a hash of its bytes, so the same file scored again after a
//! restart gets the same id and its second result is recognised as a duplicate.

use crate::decisions::Decision;
use sha2::{Digest, Sha256};
use std::time::Instant;
use tokio::sync::oneshot;
use uuid::Uuid;

/// Namespace of frame ids derived from content (a fixed random UUID, never change it).
const FRAME_NAMESPACE: Uuid = Uuid::from_u128(0x6d1f_3c2a_9b4e_4f0a_8e57_1c2d_9a0b_7e31);

/// The stable id of a frame read from a file: same device, path and bytes, same id.
/// `round` separates repeated plays of the same file (replay with `repeat`).
pub fn file_frame_id(device: &str, path: &str, bytes: &[u8], round: u64) -> Uuid {
    let mut name = Vec::with_capacity(device.len() + path.len() + 48);
    name.extend_from_slice(device.as_bytes());
    name.push(0);
    name.extend_from_slice(path.as_bytes());
    name.push(0);
    name.extend_from_slice(&Sha256::digest(bytes));
    name.extend_from_slice(&round.to_le_bytes());
    Uuid::new_v5(&FRAME_NAMESPACE, &name)
}

/// A time-ordered random id for a pushed frame whose caller gave none.
pub fn fresh_frame_id() -> Uuid {
    Uuid::now_v7()
}

/// What the scorer tells the source of a frame once the frame is handled.
#[derive(Debug, Clone)]
pub enum Handled {
    /// Scored; its result is in the spool (durable).
    Scored(Decision),
    /// Could not be decoded: nothing was published.
    Rejected(String),
}

/// A frame waiting to be scored.
#[derive(Debug)]
pub struct Frame {
    /// The frame's UUID.
    pub id: Uuid,
    /// Where it came from, for people (a file path relative to the source folder, or the
    /// caller's label).
    pub source: String,
    /// The encoded image exactly as received.
    pub bytes: Vec<u8>,
    /// When the camera took it (Unix milliseconds), or when it arrived.
    pub captured_unix_ms: i64,
    /// When it entered the agent.
    pub arrived: Instant,
    /// Told once the frame is handled (its result durably spooled, or rejected).
    pub reply: Option<oneshot::Sender<Handled>>,
}

/// Longest `source` label accepted, in bytes.
pub const MAX_SOURCE_BYTES: usize = 1024;

/// Checks a frame's `source` label (a push's `source=`, a file's path in its folder): at
/// most [`MAX_SOURCE_BYTES`] bytes of text without control characters. Such text is
/// stored as it is by every consumer (PostgreSQL refuses a NUL byte); anything else is
/// refused, not rewritten, so a label always means what its sender wrote.
pub fn check_source(source: &str) -> Result<(), String> {
    if source.len() > MAX_SOURCE_BYTES {
        return Err(format!(
            "source is {} bytes long: at most {MAX_SOURCE_BYTES}",
            source.len()
        ));
    }
    if let Some((at, c)) = source.char_indices().find(|(_, c)| c.is_control()) {
        return Err(format!(
            "source contains a control character (U+{:04X}) at byte {at}: use printable text",
            c as u32
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_ids_are_stable_and_distinguish_what_matters() {
        let a = file_frame_id("cam-1", "a.png", b"bytes", 0);
        assert_eq!(a, file_frame_id("cam-1", "a.png", b"bytes", 0));
        assert_ne!(a, file_frame_id("cam-2", "a.png", b"bytes", 0));
        assert_ne!(a, file_frame_id("cam-1", "b.png", b"bytes", 0));
        assert_ne!(a, file_frame_id("cam-1", "a.png", b"other", 0));
        assert_ne!(a, file_frame_id("cam-1", "a.png", b"bytes", 1));
        assert_ne!(fresh_frame_id(), fresh_frame_id());
    }

    #[test]
    fn sources_are_printable_text_of_bounded_length() {
        assert!(check_source("line-3/cam 1 café.png").is_ok());
        for bad in ["a\0b", "tab\there", "del\u{7f}", "c1\u{85}"] {
            let err = check_source(bad).unwrap_err();
            assert!(err.contains("control character"), "{bad:?}: {err}");
        }
        assert!(check_source("a\0")
            .unwrap_err()
            .contains("U+0000) at byte 1"));
        assert!(check_source(&"x".repeat(MAX_SOURCE_BYTES)).is_ok());
        assert!(check_source(&"x".repeat(MAX_SOURCE_BYTES + 1)).is_err());
    }
}
