//! Where an escalation is in the hub's scoring, converted to and from its database name
//! and the gRPC enum here only.

use insp_proto::hub;

/// Where an escalation is in the hub's scoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EscalationState {
    /// Stored, not scored yet.
    Pending,
    /// Scored: its verdict is recorded.
    Decided,
    /// Scoring failed (the escalation's error says why).
    Failed,
}

impl EscalationState {
    /// Every state.
    pub const ALL: [EscalationState; 3] = [
        EscalationState::Pending,
        EscalationState::Decided,
        EscalationState::Failed,
    ];

    /// The state's name as the database, the CLI and the pages write it (`pending`,
    /// `decided`, `failed`).
    pub fn as_str(self) -> &'static str {
        match self {
            EscalationState::Pending => "pending",
            EscalationState::Decided => "decided",
            EscalationState::Failed => "failed",
        }
    }
}

impl std::fmt::Display for EscalationState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name or wire value that names no escalation state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an escalation state (pending, decided or failed)")]
pub struct UnknownEscalationState(pub String);

impl std::str::FromStr for EscalationState {
    type Err = UnknownEscalationState;

    /// Reads the names [`EscalationState::as_str`] writes.
    fn from_str(s: &str) -> Result<EscalationState, UnknownEscalationState> {
        EscalationState::ALL
            .into_iter()
            .find(|e| e.as_str() == s)
            .ok_or_else(|| UnknownEscalationState(s.to_string()))
    }
}

/// The one place the state crosses to the gRPC API.
impl From<EscalationState> for hub::EscalationState {
    fn from(state: EscalationState) -> Self {
        match state {
            EscalationState::Pending => hub::EscalationState::Pending,
            EscalationState::Decided => hub::EscalationState::Decided,
            EscalationState::Failed => hub::EscalationState::Failed,
        }
    }
}

/// The one place the state comes from the gRPC API: `ESCALATION_STATE_UNSPECIFIED` (an
/// absent or unknown value) is refused.
impl TryFrom<hub::EscalationState> for EscalationState {
    type Error = UnknownEscalationState;

    fn try_from(state: hub::EscalationState) -> Result<EscalationState, UnknownEscalationState> {
        match state {
            hub::EscalationState::Pending => Ok(EscalationState::Pending),
            hub::EscalationState::Decided => Ok(EscalationState::Decided),
            hub::EscalationState::Failed => Ok(EscalationState::Failed),
            hub::EscalationState::Unspecified => Err(UnknownEscalationState(
                "ESCALATION_STATE_UNSPECIFIED".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_their_names_and_the_wire() {
        for state in EscalationState::ALL {
            assert_eq!(state.as_str().parse::<EscalationState>(), Ok(state));
            assert_eq!(
                EscalationState::try_from(hub::EscalationState::from(state)),
                Ok(state)
            );
        }
        assert_eq!(
            "Decided".parse::<EscalationState>(),
            Err(UnknownEscalationState("Decided".into()))
        );
        assert!(EscalationState::try_from(hub::EscalationState::Unspecified).is_err());
    }
}
