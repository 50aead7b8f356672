//! `edge-agent synth`: write a synthetic MVTec-AD-layout data set.

use anyhow::Result;
use clap::Args;
use insp_core::synthetic::{generate, SynthConfig};
use std::path::PathBuf;

/// Arguments of `synth`.
#[derive(Args)]
pub struct SynthArgs {
    /// Folder to write (created).
    #[arg(long)]
    out: PathBuf,
    /// Seed: the same seed writes the same images.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = SynthConfig::default().size)]
    size: u32,
    /// Good training images.
    #[arg(long, default_value_t = SynthConfig::default().train)]
    train: usize,
    /// Good test images.
    #[arg(long, default_value_t = SynthConfig::default().test_good)]
    test_good: usize,
    /// Defective test images per defect class.
    #[arg(long, default_value_t = SynthConfig::default().test_defect)]
    test_defect: usize,
}

/// Runs `synth`.
pub fn run(args: SynthArgs) -> Result<()> {
    let config = SynthConfig {
        size: args.size,
        train: args.train,
        test_good: args.test_good,
        test_defect: args.test_defect,
        seed: args.seed,
    };
    let n = generate(&args.out, &config)?;
    println!(
        "{n} images written to {} (classes: good, {})",
        args.out.display(),
        insp_core::synthetic::DEFECT_CLASSES.join(", ")
    );
    Ok(())
}
