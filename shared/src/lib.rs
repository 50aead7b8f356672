//! The scoring core shared by `edge-agent` and `cloud-hub`: image preprocessing, the
//! EfficientNet-Lite backbone, PatchCore, model bundles, metrics and data sets.
//!
//! Both binaries score frames through the same code, so a frame escalated from the edge
//! gets the identical edge score when the hub recomputes it with the same bundle.

pub mod anomaly_map;
pub mod backbone;
pub mod bundle;
pub mod coreset;
pub mod dataset;
pub mod depthwise;
pub mod error;
pub mod evaluation;
pub mod image;
pub mod memory_bank;
pub mod metrics;
pub mod overlay;
pub mod patchcore;
pub mod rng;
pub mod synthetic;
pub mod weights;

pub use error::{Error, Result};
