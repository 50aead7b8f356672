-- The bundle registry and each device's model (the fleet model updates issue): bundles
-- uploaded with `cloud-hub models upload` (their files are in the object store under
-- bundles/<version>/), and per device the version it runs, the one it is assigned and the
-- last step it reported on its model-status topic.
CREATE TABLE registry_bundles (
    version TEXT PRIMARY KEY,
    kind TEXT NOT NULL,                      -- patchcore, recon, flow
    parent_version TEXT,
    signer_key_id TEXT,                      -- NULL: unsigned
    created_unix_ms INTEGER NOT NULL,             -- the manifest's creation time
    uploaded_unix_ms INTEGER NOT NULL,
    manifest TEXT NOT NULL,                  -- the manifest file, exactly as signed (JSON)
    manifest_sha256 TEXT NOT NULL,
    signature TEXT,                          -- signature.json, if signed
    size_bytes INTEGER NOT NULL                   -- every file, manifest and signature included
);

CREATE TABLE device_models (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    running_version TEXT,
    assigned_version TEXT,
    state TEXT NOT NULL,                     -- assigned, downloading, verifying, active, refused, ...
    reason TEXT NOT NULL DEFAULT '',
    updated_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (site, device)
);
CREATE INDEX device_models_running ON device_models (running_version);
CREATE INDEX device_models_assigned ON device_models (assigned_version);
