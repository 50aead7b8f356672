//! PatchCore (Roth et al., "Towards Total Recall in Industrial Anomaly Detection", 2022):
//! pretrained mid-level features, locally averaged, concatenated at the finest stage's
//! resolution; a coreset of the training patches as the memory bank; each test patch
//! scored by the distance to its nearest bank row. The image score is the largest patch
//! score (optionally re-weighted as in the paper), the map is the patch scores upsampled
//! to the input and Gaussian-blurred.
//!
//! The model's parameters and the feature pipeline both halves share live here; the
//! scorer is [`scorer`] and the fit [`fit`].

mod fit;
mod scorer;

pub use fit::{fit, FitConfig, FitStage};
pub use scorer::PatchCore;

use crate::anomaly_map::AnomalyMap;
use crate::backbone::EfficientNetLite;
use crate::bundle::{Bundle, Manifest, ModelKind};
use crate::error::{Error, Result};
use crate::memory_bank::BankDtype;
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// How the image score is derived from the patch scores.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum ScoreRule {
    /// The largest patch score.
    #[default]
    Max,
    /// The largest value of the anomaly map (patch scores upsampled and blurred, exactly
    /// the map the frame gets): a lone odd patch counts for less than one among odd
    /// neighbours. The fit default: image AUROC 0.983 against 0.976 for `Max` on
    /// mtd-dev, same bundle (README, "Measured results").
    MapMax,
    /// The largest patch score times PatchCore's weight, which lowers it when the matched
    /// bank row lies in a dense region of the bank (paper, eq. 7).
    Reweighted {
        /// Bank neighbours of the matched row considered.
        neighbours: usize,
    },
}

impl std::fmt::Display for ScoreRule {
    /// The rule as `fit --score` takes it: `max`, `map-max` or `reweighted:K`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScoreRule::Max => f.write_str("max"),
            ScoreRule::MapMax => f.write_str("map-max"),
            ScoreRule::Reweighted { neighbours } => write!(f, "reweighted:{neighbours}"),
        }
    }
}

impl std::str::FromStr for ScoreRule {
    type Err = Error;

    /// Reads `map-max`, `max` or `reweighted:K` (what [`ScoreRule`]'s `Display` writes).
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once(':') {
            None if s == "max" => Ok(ScoreRule::Max),
            None if s == "map-max" => Ok(ScoreRule::MapMax),
            Some(("reweighted", k)) => Ok(ScoreRule::Reweighted {
                neighbours: k.parse().map_err(|_| {
                    Error::Config(format!("score rule {s:?}: reweighted:K needs a number"))
                })?,
            }),
            _ => Err(Error::Config(format!(
                "score rule {s:?}: use `map-max`, `max` or `reweighted:K`"
            ))),
        }
    }
}

/// PatchCore parameters stored in the manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchCoreParams {
    /// Always `patchcore` for this model.
    pub kind: String,
    /// Side of the local averaging window over feature cells.
    pub pool: usize,
    /// Dimension of a patch feature (sum of the stages' channels).
    pub feature_dims: usize,
    /// Rows of the memory bank.
    pub bank_rows: usize,
    /// Bank file inside the bundle.
    pub bank_file: String,
    /// Precision of the bank file.
    pub bank_dtype: BankDtype,
    /// Gaussian blur of the map, in input pixels.
    pub blur_sigma: f32,
    /// Image score rule.
    pub score: ScoreRule,
    /// Nearest-neighbour search: inverted lists of the bank (0 = exact search) and the
    /// lists probed per query.
    #[serde(default)]
    pub search: SearchParams,
}

impl ModelKind for PatchCoreParams {
    const KINDS: &'static [&'static str] = &["patchcore"];
}

/// The manifest of a PatchCore bundle.
pub type PatchCoreManifest = Manifest<PatchCoreParams>;

/// A verified PatchCore bundle.
pub type PatchCoreBundle = Bundle<PatchCoreParams>;

/// How the memory bank is searched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SearchParams {
    /// Inverted lists (k-means groups) of the bank; 0 searches every row.
    pub lists: usize,
    /// Lists probed per query.
    pub probes: usize,
}

/// Automatic inverted lists: one per this many bank rows.
pub const ROWS_PER_LIST: usize = 128;
/// Automatic inverted lists only for banks of at least this many rows.
pub const INDEX_FROM_ROWS: usize = 4096;

/// Time spent in each part of scoring, summed over the frames scored.
#[derive(Debug, Clone, Copy, Default)]
pub struct Timings {
    /// Decode is the caller's; this is resize and normalisation.
    pub preprocess: Duration,
    /// Backbone forward pass and feature aggregation.
    pub backbone: Duration,
    /// Nearest-neighbour search.
    pub knn: Duration,
    /// Upsampling and blur of the map, and the image score.
    pub map: Duration,
}

/// One scored frame.
#[derive(Debug, Clone)]
pub struct Scored {
    /// Image anomaly score (higher is more anomalous).
    pub score: f32,
    /// Anomaly map at the model input size, covering the whole frame.
    pub map: AnomalyMap,
}

/// Stage outputs -> (N, h*w, D) patch features at the first stage's resolution.
pub(crate) fn embed(
    backbone: &EfficientNetLite,
    stages: &[usize],
    pool: usize,
    x: &Tensor,
) -> Result<(Tensor, usize, usize)> {
    let features = backbone.forward_stages_averaged(x, stages, pool)?;
    let (n, _, h, w) = features[0].dims4()?;
    let mut parts = Vec::with_capacity(features.len());
    for f in features {
        let (_, _, fh, fw) = f.dims4()?;
        parts.push(if (fh, fw) != (h, w) {
            f.upsample_bilinear2d(h, w, false)?
        } else {
            f
        });
    }
    let cat = Tensor::cat(&parts, 1)?;
    let dims = cat.dim(1)?;
    let patches = cat
        .reshape((n, dims, h * w))?
        .transpose(1, 2)?
        .contiguous()?;
    Ok((patches, h, w))
}
