-- The hub's schema (SQLite). Times are Unix milliseconds, UUIDs text, flags 0/1,
-- so that the same runtime queries run on PostgreSQL and SQLite through sqlx's Any driver.

CREATE TABLE devices (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'unknown',
    model_version TEXT NOT NULL DEFAULT '',
    agent_version TEXT NOT NULL DEFAULT '',
    state_since_unix_ms INTEGER NOT NULL DEFAULT 0,
    first_seen_unix_ms INTEGER NOT NULL,
    last_seen_unix_ms INTEGER NOT NULL,
    frames INTEGER NOT NULL DEFAULT 0,
    escalations INTEGER NOT NULL DEFAULT 0,
    metrics BLOB,
    metrics_unix_ms INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (site, device)
);

CREATE TABLE frames (
    frame_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    source TEXT NOT NULL,
    captured_unix_ms INTEGER NOT NULL,
    scored_unix_ms INTEGER NOT NULL,
    received_unix_ms INTEGER NOT NULL,
    stored_unix_ms INTEGER NOT NULL,
    edge_score REAL NOT NULL,
    band TEXT NOT NULL,
    model_version TEXT NOT NULL,
    latency_ms REAL NOT NULL
);
CREATE INDEX frames_device_captured ON frames (site, device, captured_unix_ms);

CREATE TABLE escalations (
    frame_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    source TEXT NOT NULL,
    captured_unix_ms INTEGER NOT NULL,
    edge_score REAL NOT NULL,
    model_version TEXT NOT NULL,
    frame_key TEXT NOT NULL,
    frame_format TEXT NOT NULL,
    edge_map_key TEXT,
    received_unix_ms INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    error TEXT
);
CREATE INDEX escalations_state ON escalations (state, received_unix_ms);

CREATE TABLE inferences (
    frame_id TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    score REAL NOT NULL,
    ok_below REAL NOT NULL,
    ng_above REAL NOT NULL,
    map_key TEXT,
    latency_ms REAL NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (frame_id, model)
);

CREATE TABLE verdicts (
    frame_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    band TEXT NOT NULL,
    fused REAL NOT NULL,
    cloud_score REAL NOT NULL,
    edge_score_reported REAL NOT NULL,
    edge_score_reproduced REAL NOT NULL,
    edge_exact INTEGER NOT NULL,
    model_versions TEXT NOT NULL,
    rule TEXT NOT NULL,
    received_unix_ms INTEGER NOT NULL,
    decided_unix_ms INTEGER NOT NULL
);

CREATE TABLE reviews (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    frame_id TEXT NOT NULL,
    label TEXT NOT NULL,
    operator TEXT NOT NULL,
    note TEXT NOT NULL,
    created_unix_ms INTEGER NOT NULL
);
CREATE INDEX reviews_frame ON reviews (frame_id);

CREATE TABLE models (
    version TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    kind TEXT NOT NULL,
    backbone TEXT NOT NULL,
    path TEXT NOT NULL,
    input_height INTEGER NOT NULL,
    input_width INTEGER NOT NULL,
    bank_rows INTEGER NOT NULL,
    ok_below REAL,
    ng_above REAL,
    parent_version TEXT,
    size_bytes INTEGER NOT NULL,
    created_unix INTEGER NOT NULL,
    registered_unix_ms INTEGER NOT NULL
);

-- Which device has run which bundle, as its state messages report it (rollout,
-- canaries and rollback extend this table later).
CREATE TABLE deployments (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    model_version TEXT NOT NULL,
    first_seen_unix_ms INTEGER NOT NULL,
    last_seen_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (site, device, model_version)
);

CREATE TABLE dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload_bytes INTEGER NOT NULL,
    payload BLOB NOT NULL,
    received_unix_ms INTEGER NOT NULL
);
