//! The flags that choose a bundle and how its memory bank is searched, shared by the
//! commands that score with it.

use clap::Args;
use insp_core::patchcore::PatchCore;
use std::path::PathBuf;

/// Which bundle to load and how to search its bank.
#[derive(Args)]
pub struct ModelArgs {
    /// Bundle folder written by `fit`.
    #[arg(long)]
    pub bundle: PathBuf,
    /// Search every bank row instead of the bundle's inverted lists (the exact baseline).
    #[arg(long)]
    pub exact_search: bool,
    /// Override the inverted lists probed per query.
    #[arg(long)]
    pub probes: Option<usize>,
}

impl ModelArgs {
    /// Opens and verifies the bundle and applies the search flags.
    pub fn load(&self, device: &candle_core::Device) -> anyhow::Result<PatchCore> {
        let mut model = PatchCore::open(&self.bundle, device)?;
        model.set_exact_search(self.exact_search);
        if let Some(p) = self.probes {
            model.set_probes(p);
        }
        Ok(model)
    }
}
