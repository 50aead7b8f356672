//! What a registered model bundle is for, converted to and from its database name and
//! the gRPC enum here only.

use insp_proto::hub;

/// What a registered model bundle is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelRole {
    /// A bundle devices run (in the hub's models folder).
    Edge,
    /// One of the hub's re-scoring models.
    Cloud,
}

impl ModelRole {
    /// Every role.
    pub const ALL: [ModelRole; 2] = [ModelRole::Edge, ModelRole::Cloud];

    /// The role's name as the database and the CLI write it (`edge`, `cloud`).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelRole::Edge => "edge",
            ModelRole::Cloud => "cloud",
        }
    }
}

impl std::fmt::Display for ModelRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A role name or wire value that names no model role.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a model role (edge or cloud)")]
pub struct UnknownModelRole(pub String);

impl std::str::FromStr for ModelRole {
    type Err = UnknownModelRole;

    /// Reads the names [`ModelRole::as_str`] writes.
    fn from_str(s: &str) -> Result<ModelRole, UnknownModelRole> {
        ModelRole::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownModelRole(s.to_string()))
    }
}

/// The one place the role crosses to the gRPC API.
impl From<ModelRole> for hub::ModelRole {
    fn from(role: ModelRole) -> Self {
        match role {
            ModelRole::Edge => hub::ModelRole::Edge,
            ModelRole::Cloud => hub::ModelRole::Cloud,
        }
    }
}

/// The one place the role comes from the gRPC API: `MODEL_ROLE_UNSPECIFIED` (an absent
/// or unknown value) is refused.
impl TryFrom<hub::ModelRole> for ModelRole {
    type Error = UnknownModelRole;

    fn try_from(role: hub::ModelRole) -> Result<ModelRole, UnknownModelRole> {
        match role {
            hub::ModelRole::Edge => Ok(ModelRole::Edge),
            hub::ModelRole::Cloud => Ok(ModelRole::Cloud),
            hub::ModelRole::Unspecified => Err(UnknownModelRole("MODEL_ROLE_UNSPECIFIED".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip_through_their_names_and_the_wire() {
        for role in ModelRole::ALL {
            assert_eq!(role.as_str().parse::<ModelRole>(), Ok(role));
            assert_eq!(ModelRole::try_from(hub::ModelRole::from(role)), Ok(role));
        }
        assert_eq!(
            "heavy".parse::<ModelRole>(),
            Err(UnknownModelRole("heavy".into()))
        );
        assert!(ModelRole::try_from(hub::ModelRole::Unspecified).is_err());
    }
}
