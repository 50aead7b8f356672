//! Model bundles at the hub: the edge bundles that escalations name by version (found in
//! the models folder, verified and loaded on first use, a few kept in memory), and the
//! cloud models the judge ([`insp_cloud::judge`]) runs beside them, any
//! [`FrameModel`] (PatchCore, recon, flow).

use crate::db::api::ModelRow;
use crate::domain::ModelRole;
use anyhow::{Context, Result};
use insp_cloud::heavy::HeavyModel;
use insp_cloud::model::FrameModel;
use insp_core::bundle::{Manifest, MANIFEST};
use insp_core::memory_bank::Search;
use insp_core::patchcore::PatchCoreManifest;
use insp_core::patchcore::{PatchCore, SearchParams};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Edge models kept loaded at once.
const LOADED: usize = 4;

/// Opens and verifies a cloud bundle (`models.heavy_bundles` or `models.cloud_bundle`):
/// a recon or flow bundle from `cloud-hub train`, which must carry held-out good scores,
/// or a PatchCore bundle, which must carry calibrated thresholds. Returns the model and
/// its registry row.
pub fn open_cloud(
    dir: &Path,
    device: &candle_core::Device,
) -> Result<(Arc<dyn FrameModel>, ModelRow)> {
    if insp_core::bundle::model_kind(dir)? == "patchcore" {
        let model = PatchCore::open(dir, device).with_context(|| {
            format!(
                "cannot load the cloud bundle {} (make one with `edge-agent fit`)",
                dir.display()
            )
        })?;
        anyhow::ensure!(
            model.manifest().thresholds.is_some(),
            "the cloud bundle {} has no calibrated thresholds; refit it",
            dir.display()
        );
        let row = model_row(model.manifest(), dir, ModelRole::Cloud);
        Ok((Arc::new(model), row))
    } else {
        let model = HeavyModel::open(dir, device).with_context(|| {
            format!(
                "cannot load the heavy bundle {} (make one with `cloud-hub train`)",
                dir.display()
            )
        })?;
        anyhow::ensure!(
            !model.manifest().calibration.good_scores.is_empty(),
            "the heavy bundle {} has no held-out good scores to normalise with; retrain it with --holdout above 0",
            dir.display()
        );
        let row = ModelRow {
            kind: model.kind().to_string(),
            bank_rows: 0,
            ..row_of(model.manifest(), dir, ModelRole::Cloud)
        };
        Ok((Arc::new(model), row))
    }
}

/// The registry row of a PatchCore bundle.
pub fn model_row(manifest: &PatchCoreManifest, dir: &Path, role: ModelRole) -> ModelRow {
    ModelRow {
        kind: manifest.model.kind.clone(),
        bank_rows: manifest.model.bank_rows as i64,
        ..row_of(manifest, dir, role)
    }
}

/// The registry row of any bundle; `kind` and `bank_rows` are left for the caller.
fn row_of<M>(manifest: &Manifest<M>, dir: &Path, role: ModelRole) -> ModelRow {
    let size: u64 = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    ModelRow {
        version: manifest.version.clone(),
        role,
        kind: String::new(),
        backbone: manifest.backbone.variant.clone(),
        path: dir.display().to_string(),
        input_height: manifest.preprocessing.height as i64,
        input_width: manifest.preprocessing.width as i64,
        bank_rows: 0,
        ok_below: manifest.thresholds.map(|t| t.ok_below as f64),
        ng_above: manifest.thresholds.map(|t| t.ng_above as f64),
        parent_version: manifest.parent_version.clone(),
        size_bytes: size as i64,
        created_unix: manifest.created_unix as i64,
    }
}

/// Reads a bundle's manifest (without verifying its files).
pub fn read_manifest(dir: &Path) -> Result<PatchCoreManifest> {
    Ok(insp_core::bundle::read_manifest(dir)?)
}

/// Edge bundles by version.
pub struct EdgeBundles {
    dir: PathBuf,
    exact_search: bool,
    probes: Option<usize>,
    device: candle_core::Device,
    /// Folder and search parameters of each version, from its manifest.
    index: Mutex<HashMap<String, (PathBuf, SearchParams)>>,
    /// Loaded models by version and effective search, least recently used first.
    loaded: Mutex<Vec<(String, Search, Arc<PatchCore>)>>,
}

impl EdgeBundles {
    /// A registry of the bundles under `dir`; `exact_search` / `probes` are the search
    /// used for escalations that do not say how their edge searched.
    pub fn new(
        dir: &Path,
        exact_search: bool,
        probes: Option<usize>,
        device: candle_core::Device,
    ) -> EdgeBundles {
        EdgeBundles {
            dir: dir.to_path_buf(),
            exact_search,
            probes,
            device,
            index: Mutex::new(HashMap::new()),
            loaded: Mutex::new(Vec::new()),
        }
    }

    /// Re-reads the folder: every sub-folder (and the folder itself) with a manifest.
    pub fn scan(&self) -> Vec<(PatchCoreManifest, PathBuf)> {
        let mut found = Vec::new();
        let mut candidates = vec![self.dir.clone()];
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            candidates.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
        }
        for dir in candidates {
            if !dir.join(MANIFEST).is_file() {
                continue;
            }
            match read_manifest(&dir) {
                Ok(m) => found.push((m, dir)),
                Err(e) => tracing::warn!("skipping bundle: {e:#}"),
            }
        }
        if let Ok(mut index) = self.index.lock() {
            for (m, dir) in &found {
                index.insert(m.version.clone(), (dir.clone(), m.model.search));
            }
        }
        found
    }

    /// Where the bundle of `version` is, scanning again on a miss.
    pub fn path(&self, version: &str) -> Option<PathBuf> {
        self.located(version).map(|(dir, _)| dir)
    }

    /// The folder and search parameters of `version`, scanning again on a miss.
    fn located(&self, version: &str) -> Option<(PathBuf, SearchParams)> {
        let hit = self.index.lock().ok()?.get(version).cloned();
        hit.or_else(|| {
            self.scan();
            self.index.lock().ok()?.get(version).cloned()
        })
    }

    /// The loaded model of `version`, searching its bank as `search` says (the edge's
    /// own setting; `None`: the hub's `models.edge_*` settings), verifying and loading it
    /// on first use. Models are kept per version and effective search, the least
    /// recently used dropped first.
    pub fn model(&self, version: &str, search: Option<Search>) -> Result<Arc<PatchCore>> {
        let (dir, own) = self.located(version).with_context(|| {
            format!(
                "no bundle of version {version:?} in {}: copy the edge's bundle folder there",
                self.dir.display()
            )
        })?;
        let search = self.effective_search(own, search);
        if let Ok(mut loaded) = self.loaded.lock() {
            if let Some(i) = loaded
                .iter()
                .position(|(v, s, _)| v == version && *s == search)
            {
                let hit = loaded.remove(i);
                let model = hit.2.clone();
                loaded.push(hit);
                return Ok(model);
            }
        }
        let mut model = PatchCore::open(&dir, &self.device)
            .with_context(|| format!("cannot load the edge bundle {}", dir.display()))?;
        anyhow::ensure!(
            model.manifest().version == version,
            "bundle {} changed version while loading",
            dir.display()
        );
        model.set_search(search);
        let model = Arc::new(model);
        if let Ok(mut loaded) = self.loaded.lock() {
            if loaded.len() >= LOADED {
                loaded.remove(0);
            }
            loaded.push((version.to_string(), search, model.clone()));
        }
        Ok(model)
    }

    /// The search a bundle ends up with: the one asked for (else the hub's defaults, else
    /// the bundle's own), exact without inverted lists, probes clamped to the lists.
    fn effective_search(&self, own: SearchParams, search: Option<Search>) -> Search {
        let wanted = search.unwrap_or(if self.exact_search {
            Search::Exact
        } else {
            Search::Probes(self.probes.unwrap_or(own.probes))
        });
        match (own.lists, wanted) {
            (0, _) | (_, Search::Exact) => Search::Exact,
            (lists, Search::Probes(n)) => Search::Probes(n.clamp(1, lists)),
        }
    }
}
