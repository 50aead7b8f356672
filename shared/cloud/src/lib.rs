//! The cloud tier, linked by `cloud-hub` alone: the heavier models that judge what the
//! edge escalates (feature reconstruction, a normalizing flow), their training, the
//! fusion of member scores, the [`model::FrameModel`] seam every scoring model
//! implements (PatchCore included), and the one [`judge::Judge`] that both `cloud-hub
//! serve` and `cloud-hub eval` call.
//!
//! The edge agent depends on `insp-core` only, so its binary carries none of this.

pub mod corruption;
pub mod flow;
pub mod fusion;
pub mod heavy;
pub mod judge;
pub mod model;
pub mod recon;
pub mod training;
