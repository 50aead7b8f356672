//! Labelling an escalation: the one code path behind the gRPC `SubmitReview` and the
//! review page's buttons and keys. The operator recorded is the authenticated principal;
//! the label and its audit row land in one transaction.

use crate::auth::{AuthError, Principal, Role};
use crate::db::api::ReviewRow;
use crate::db::Db;
use crate::domain::{ReviewLabel, UnknownLabel};

/// Longest note, in bytes.
pub const MAX_NOTE_BYTES: usize = 4096;

/// Why a label is not recorded.
#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    /// The principal may not label.
    #[error(transparent)]
    Denied(#[from] AuthError),
    /// Not a [`ReviewLabel`].
    #[error(transparent)]
    UnknownLabel(#[from] UnknownLabel),
    /// A note longer than [`MAX_NOTE_BYTES`].
    #[error("the note has {0} bytes; at most {MAX_NOTE_BYTES}")]
    NoteTooLong(usize),
    /// No escalation with this frame id.
    #[error("no escalation {0:?}")]
    NoEscalation(String),
    /// The database failed.
    #[error("cannot record the label: {0:#}")]
    Database(anyhow::Error),
}

/// Records `label` (a [`ReviewLabel`], or what names one: a page's form value, a gRPC
/// enum) with `note` on the escalation `frame_id`, given by `who` (an operator or above;
/// the role is checked before the label).
pub async fn submit(
    db: &Db,
    who: &Principal,
    frame_id: &str,
    label: impl TryInto<ReviewLabel, Error = UnknownLabel>,
    note: &str,
) -> Result<ReviewRow, LabelError> {
    who.require(Role::Operator)?;
    let label = label.try_into()?;
    if note.len() > MAX_NOTE_BYTES {
        return Err(LabelError::NoteTooLong(note.len()));
    }
    if db
        .escalation_summary(frame_id)
        .await
        .map_err(LabelError::Database)?
        .is_none()
    {
        return Err(LabelError::NoEscalation(frame_id.to_string()));
    }
    let review = db
        .add_review(frame_id, label, &who.user, note)
        .await
        .map_err(LabelError::Database)?;
    tracing::info!(
        "label {label} on {frame_id} by {} (review {})",
        who.user,
        review.id
    );
    Ok(review)
}

/// Takes back `who`'s latest label on `frame_id` (an operator's own, never another's);
/// the removed review's id, or None if they gave none.
pub async fn undo(db: &Db, who: &Principal, frame_id: &str) -> Result<Option<i64>, LabelError> {
    who.require(Role::Operator)?;
    let undone = db
        .undo_review(frame_id, &who.user)
        .await
        .map_err(LabelError::Database)?;
    if let Some((id, label)) = &undone {
        tracing::info!(
            "label {label} on {frame_id} taken back by {} (review {id})",
            who.user
        );
    }
    Ok(undone.map(|(id, _)| id))
}
