//! The typed values the hub stores, serves and shows: each is an enum in memory, converted
//! to and from its database text (`as_str`/`FromStr`) and its gRPC enum (`From`/`TryFrom`,
//! the unspecified value refused) in one place, its module.

mod escalation_state;
mod model_role;
mod review_label;

pub use escalation_state::{EscalationState, UnknownEscalationState};
pub use model_role::{ModelRole, UnknownModelRole};
pub use review_label::{ReviewLabel, UnknownLabel};
