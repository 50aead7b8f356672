//! Storage of the bundle registry (`registry_bundles`: what `cloud-hub models upload`
//! stored) and of each device's model (`device_models`: the version it runs, the one it
//! is assigned, the last step it reported). Uploads, deletions and assignments are
//! recorded in the audit trail in the same transaction as the change.

use super::audit::AuditEntry;
use super::Db;
use anyhow::{Context, Result};
use serde_json::json;
use sqlx::any::AnyRow;
use sqlx::Row;

/// A bundle in the registry.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleRow {
    /// Version (the manifest's).
    pub version: String,
    /// Model kind (`patchcore`, `recon`, `flow`).
    pub kind: String,
    /// The version it was derived from, if any.
    pub parent_version: Option<String>,
    /// Id of the key that signed it; `None`: unsigned.
    pub signer_key_id: Option<String>,
    /// The manifest's creation time.
    pub created_unix_ms: i64,
    /// When it was uploaded.
    pub uploaded_unix_ms: i64,
    /// The manifest file, byte for byte as signed.
    pub manifest: String,
    /// sha256 (hex) of the manifest file: what an assignment names.
    pub manifest_sha256: String,
    /// `signature.json`, if signed.
    pub signature: Option<String>,
    /// Bytes of every file (manifest and signature included).
    pub size_bytes: i64,
}

/// A device's model state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceModelRow {
    /// Site.
    pub site: String,
    /// Device.
    pub device: String,
    /// What it scores with now (as it last reported).
    pub running_version: Option<String>,
    /// What it was last assigned.
    pub assigned_version: Option<String>,
    /// The last step: `assigned`, or what the device reported (`downloading`,
    /// `verifying`, `active`, `refused`, `self_test_failed`, `rolled_back`).
    pub state: String,
    /// Why, when refused.
    pub reason: String,
    /// When the row last changed.
    pub updated_unix_ms: i64,
}

/// A model-status report from a device, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelStatusRow {
    /// Site (from the topic).
    pub site: String,
    /// Device (from the topic).
    pub device: String,
    /// The version the report is about.
    pub version: String,
    /// The step (`downloading`, `active`, ...).
    pub state: String,
    /// The reason kind and text, when refused.
    pub reason: String,
    /// What the device scores with now.
    pub running_version: String,
    /// When the hub received it.
    pub received_unix_ms: i64,
}

/// What [`Db::add_bundle`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// Stored now.
    New,
    /// The same manifest was stored already under this version.
    Same,
}

/// Why [`Db::delete_bundle`] deleted nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deleted {
    /// Deleted (its row; the caller removes its objects).
    Yes,
    /// No such version.
    Missing,
    /// Devices run it or are assigned it (`site/device`).
    InUse(Vec<String>),
}

const BUNDLE_COLUMNS: &str = "version, kind, parent_version, signer_key_id, created_unix_ms, \
    uploaded_unix_ms, manifest, manifest_sha256, signature, size_bytes";

fn bundle_from(r: &AnyRow) -> Result<BundleRow> {
    Ok(BundleRow {
        version: r.try_get("version")?,
        kind: r.try_get("kind")?,
        parent_version: r.try_get("parent_version")?,
        signer_key_id: r.try_get("signer_key_id")?,
        created_unix_ms: r.try_get("created_unix_ms")?,
        uploaded_unix_ms: r.try_get("uploaded_unix_ms")?,
        manifest: r.try_get("manifest")?,
        manifest_sha256: r.try_get("manifest_sha256")?,
        signature: r.try_get("signature")?,
        size_bytes: r.try_get("size_bytes")?,
    })
}

fn device_model_from(r: &AnyRow) -> Result<DeviceModelRow> {
    Ok(DeviceModelRow {
        site: r.try_get("site")?,
        device: r.try_get("device")?,
        running_version: r.try_get("running_version")?,
        assigned_version: r.try_get("assigned_version")?,
        state: r.try_get("state")?,
        reason: r.try_get("reason")?,
        updated_unix_ms: r.try_get("updated_unix_ms")?,
    })
}

impl Db {
    /// Records an uploaded bundle (audited as `model.uploaded`). A version stored with
    /// the same manifest is [`Added::Same`]; with another manifest, an error.
    pub async fn add_bundle(&self, actor: &str, b: &BundleRow) -> Result<Added> {
        let row = b.clone();
        let found = self
            .audited(
                || {
                    sqlx::query(
                        "INSERT INTO registry_bundles (version, kind, parent_version, signer_key_id, \
                         created_unix_ms, uploaded_unix_ms, manifest, manifest_sha256, signature, size_bytes) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                         ON CONFLICT (version) DO NOTHING RETURNING version",
                    )
                    .bind(row.version.clone())
                    .bind(row.kind.clone())
                    .bind(row.parent_version.clone())
                    .bind(row.signer_key_id.clone())
                    .bind(row.created_unix_ms)
                    .bind(row.uploaded_unix_ms)
                    .bind(row.manifest.clone())
                    .bind(row.manifest_sha256.clone())
                    .bind(row.signature.clone())
                    .bind(row.size_bytes)
                },
                |_| {
                    Ok(AuditEntry::new(
                        actor,
                        "model.uploaded",
                        json!({
                            "version": b.version,
                            "kind": b.kind,
                            "parent": b.parent_version,
                            "signer": b.signer_key_id,
                            "manifest_sha256": b.manifest_sha256,
                            "bytes": b.size_bytes,
                        }),
                    ))
                },
            )
            .await
            .with_context(|| format!("cannot record the bundle {}", b.version))?;
        if found.is_some() {
            return Ok(Added::New);
        }
        match self.bundle(&b.version).await? {
            Some(old) if old.manifest_sha256 == b.manifest_sha256 => Ok(Added::Same),
            Some(old) => anyhow::bail!(
                "the registry holds another bundle of version {} (manifest sha256 {}, this one {}): a version names one bundle; delete it first",
                b.version,
                old.manifest_sha256,
                b.manifest_sha256
            ),
            None => anyhow::bail!("bundle {} neither stored nor found", b.version),
        }
    }

    /// Every bundle, newest first.
    pub async fn bundles(&self) -> Result<Vec<BundleRow>> {
        let rows = sqlx::query(super::sql(format!(
            "SELECT {BUNDLE_COLUMNS} FROM registry_bundles ORDER BY created_unix_ms DESC, version"
        )))
        .fetch_all(self.pool())
        .await
        .context("cannot read the bundle registry")?;
        rows.iter().map(bundle_from).collect()
    }

    /// One bundle.
    pub async fn bundle(&self, version: &str) -> Result<Option<BundleRow>> {
        let row = sqlx::query(super::sql(format!(
            "SELECT {BUNDLE_COLUMNS} FROM registry_bundles WHERE version = $1"
        )))
        .bind(version.to_string())
        .fetch_optional(self.pool())
        .await
        .context("cannot read the bundle registry")?;
        row.as_ref().map(bundle_from).transpose()
    }

    /// Deletes a bundle's row (audited as `model.deleted`), refused while any device runs
    /// it or is assigned it.
    pub async fn delete_bundle(&self, actor: &str, version: &str) -> Result<Deleted> {
        let v = version.to_string();
        let found = self
            .audited(
                || {
                    sqlx::query(
                        "DELETE FROM registry_bundles WHERE version = $1 AND NOT EXISTS \
                         (SELECT 1 FROM device_models WHERE running_version = $1 OR assigned_version = $1) \
                         RETURNING version, manifest_sha256",
                    )
                    .bind(v.clone())
                },
                |r| {
                    let sha: String = r.try_get("manifest_sha256")?;
                    Ok(AuditEntry::new(
                        actor,
                        "model.deleted",
                        json!({"version": version, "manifest_sha256": sha}),
                    ))
                },
            )
            .await
            .with_context(|| format!("cannot delete the bundle {version}"))?;
        if found.is_some() {
            return Ok(Deleted::Yes);
        }
        if self.bundle(version).await?.is_none() {
            return Ok(Deleted::Missing);
        }
        let users = self
            .device_models()
            .await?
            .into_iter()
            .filter(|d| {
                d.running_version.as_deref() == Some(version)
                    || d.assigned_version.as_deref() == Some(version)
            })
            .map(|d| format!("{}/{}", d.site, d.device))
            .collect();
        Ok(Deleted::InUse(users))
    }

    /// Records that `site/device` is assigned `version` (audited as `model.assigned`).
    pub async fn assign_model(
        &self,
        actor: &str,
        site: &str,
        device: &str,
        version: &str,
    ) -> Result<()> {
        let (s, d, v) = (site.to_string(), device.to_string(), version.to_string());
        let now = super::unix_ms();
        self.audited(
            || {
                sqlx::query(
                    "INSERT INTO device_models (site, device, running_version, assigned_version, state, reason, updated_unix_ms) \
                     VALUES ($1, $2, NULL, $3, 'assigned', '', $4) ON CONFLICT (site, device) DO UPDATE SET \
                     assigned_version = excluded.assigned_version, state = 'assigned', reason = '', \
                     updated_unix_ms = excluded.updated_unix_ms RETURNING site",
                )
                .bind(s.clone())
                .bind(d.clone())
                .bind(v.clone())
                .bind(now)
            },
            |_| {
                Ok(AuditEntry::new(
                    actor,
                    "model.assigned",
                    json!({"site": site, "device": device, "version": version}),
                ))
            },
        )
        .await
        .with_context(|| format!("cannot record the assignment of {version} to {site}/{device}"))?;
        Ok(())
    }

    /// The devices the hub knows at `site`, by name.
    pub async fn site_devices(&self, site: &str) -> Result<Vec<String>> {
        let rows = sqlx::query("SELECT device FROM devices WHERE site = $1 ORDER BY device")
            .bind(site.to_string())
            .fetch_all(self.pool())
            .await
            .context("cannot read the devices")?;
        rows.iter()
            .map(|r| Ok(r.try_get::<String, _>(0)?))
            .collect()
    }

    /// Every device's model state, by site and device.
    pub async fn device_models(&self) -> Result<Vec<DeviceModelRow>> {
        let rows = sqlx::query(
            "SELECT site, device, running_version, assigned_version, state, reason, updated_unix_ms \
             FROM device_models ORDER BY site, device",
        )
        .fetch_all(self.pool())
        .await
        .context("cannot read the device models")?;
        rows.iter().map(device_model_from).collect()
    }

    /// Records model-status reports: each device's running version and last step.
    pub async fn record_model_statuses(&self, reports: &[ModelStatusRow]) -> Result<()> {
        for m in reports {
            let running = (!m.running_version.is_empty()).then(|| m.running_version.clone());
            sqlx::query(
                "INSERT INTO device_models (site, device, running_version, assigned_version, state, reason, updated_unix_ms) \
                 VALUES ($1, $2, $3, NULL, $4, $5, $6) ON CONFLICT (site, device) DO UPDATE SET \
                 running_version = COALESCE(excluded.running_version, device_models.running_version), \
                 state = excluded.state, reason = excluded.reason, updated_unix_ms = excluded.updated_unix_ms",
            )
            .bind(m.site.clone())
            .bind(m.device.clone())
            .bind(running)
            .bind(m.state.clone())
            .bind(super::escape_text(&m.reason).into_owned())
            .bind(m.received_unix_ms)
            .execute(self.pool())
            .await
            .with_context(|| format!("cannot record the model status of {}/{}", m.site, m.device))?;
        }
        Ok(())
    }
}
