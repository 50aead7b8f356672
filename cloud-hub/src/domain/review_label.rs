//! The label an operator gives an escalated frame, converted to and from its database
//! and page name and the gRPC enum here only.

use insp_proto::hub;

/// A label an operator gives an escalated frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReviewLabel {
    /// The part is good.
    Good,
    /// The part is defective.
    Defect,
    /// The frame shows a camera problem, not the part.
    CameraFault,
    /// The operator cannot tell.
    Unsure,
}

impl ReviewLabel {
    /// Every label, in the order the pages show them.
    pub const ALL: [ReviewLabel; 4] = [
        ReviewLabel::Good,
        ReviewLabel::Defect,
        ReviewLabel::CameraFault,
        ReviewLabel::Unsure,
    ];

    /// The label's name as the database, the CLI and the pages write it (`good`,
    /// `defect`, `camera-fault`, `unsure`).
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewLabel::Good => "good",
            ReviewLabel::Defect => "defect",
            ReviewLabel::CameraFault => "camera-fault",
            ReviewLabel::Unsure => "unsure",
        }
    }
}

impl std::fmt::Display for ReviewLabel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A label name or wire value that names no label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("label {0:?}: use \"good\", \"defect\", \"camera-fault\" or \"unsure\"")]
pub struct UnknownLabel(pub String);

impl std::str::FromStr for ReviewLabel {
    type Err = UnknownLabel;

    /// Reads the names [`ReviewLabel::as_str`] writes.
    fn from_str(s: &str) -> Result<ReviewLabel, UnknownLabel> {
        ReviewLabel::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| UnknownLabel(s.to_string()))
    }
}

impl TryFrom<&str> for ReviewLabel {
    type Error = UnknownLabel;

    fn try_from(s: &str) -> Result<ReviewLabel, UnknownLabel> {
        s.parse()
    }
}

/// The one place the label crosses to the gRPC API.
impl From<ReviewLabel> for hub::ReviewLabel {
    fn from(label: ReviewLabel) -> Self {
        match label {
            ReviewLabel::Good => hub::ReviewLabel::Good,
            ReviewLabel::Defect => hub::ReviewLabel::Defect,
            ReviewLabel::CameraFault => hub::ReviewLabel::CameraFault,
            ReviewLabel::Unsure => hub::ReviewLabel::Unsure,
        }
    }
}

/// The one place the label comes from the gRPC API: `REVIEW_LABEL_UNSPECIFIED` (an
/// absent or unknown value) is refused.
impl TryFrom<hub::ReviewLabel> for ReviewLabel {
    type Error = UnknownLabel;

    fn try_from(label: hub::ReviewLabel) -> Result<ReviewLabel, UnknownLabel> {
        match label {
            hub::ReviewLabel::Good => Ok(ReviewLabel::Good),
            hub::ReviewLabel::Defect => Ok(ReviewLabel::Defect),
            hub::ReviewLabel::CameraFault => Ok(ReviewLabel::CameraFault),
            hub::ReviewLabel::Unsure => Ok(ReviewLabel::Unsure),
            hub::ReviewLabel::Unspecified => Err(UnknownLabel("REVIEW_LABEL_UNSPECIFIED".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_round_trip_through_their_names_and_the_wire() {
        for label in ReviewLabel::ALL {
            assert_eq!(label.as_str().parse::<ReviewLabel>(), Ok(label));
            assert_eq!(
                ReviewLabel::try_from(hub::ReviewLabel::from(label)),
                Ok(label)
            );
        }
        assert_eq!(
            "camera-fault".parse::<ReviewLabel>(),
            Ok(ReviewLabel::CameraFault)
        );
        let unknown = "maybe".parse::<ReviewLabel>().unwrap_err();
        assert!(
            unknown.to_string().contains("\"camera-fault\""),
            "{unknown}"
        );
        assert_eq!(
            ReviewLabel::try_from(hub::ReviewLabel::Unspecified),
            Err(UnknownLabel("REVIEW_LABEL_UNSPECIFIED".into()))
        );
    }
}
