-- The hub's schema (PostgreSQL). Times are Unix milliseconds, UUIDs text, flags 0/1,
-- so that the same runtime queries run on PostgreSQL and SQLite through sqlx's Any driver.

CREATE TABLE devices (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'unknown',
    model_version TEXT NOT NULL DEFAULT '',
    agent_version TEXT NOT NULL DEFAULT '',
    state_since_unix_ms BIGINT NOT NULL DEFAULT 0,
    first_seen_unix_ms BIGINT NOT NULL,
    last_seen_unix_ms BIGINT NOT NULL,
    frames BIGINT NOT NULL DEFAULT 0,
    escalations BIGINT NOT NULL DEFAULT 0,
    metrics BYTEA,
    metrics_unix_ms BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (site, device)
);

CREATE TABLE frames (
    frame_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    source TEXT NOT NULL,
    captured_unix_ms BIGINT NOT NULL,
    scored_unix_ms BIGINT NOT NULL,
    received_unix_ms BIGINT NOT NULL,
    stored_unix_ms BIGINT NOT NULL,
    edge_score DOUBLE PRECISION NOT NULL,
    band TEXT NOT NULL,
    model_version TEXT NOT NULL,
    latency_ms DOUBLE PRECISION NOT NULL
);
CREATE INDEX frames_device_captured ON frames (site, device, captured_unix_ms);

CREATE TABLE escalations (
    frame_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    source TEXT NOT NULL,
    captured_unix_ms BIGINT NOT NULL,
    edge_score DOUBLE PRECISION NOT NULL,
    model_version TEXT NOT NULL,
    frame_key TEXT NOT NULL,
    frame_format TEXT NOT NULL,
    edge_map_key TEXT,
    received_unix_ms BIGINT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    error TEXT
);
CREATE INDEX escalations_state ON escalations (state, received_unix_ms);

CREATE TABLE inferences (
    frame_id TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    ok_below DOUBLE PRECISION NOT NULL,
    ng_above DOUBLE PRECISION NOT NULL,
    map_key TEXT,
    latency_ms DOUBLE PRECISION NOT NULL,
    created_unix_ms BIGINT NOT NULL,
    PRIMARY KEY (frame_id, model)
);

CREATE TABLE verdicts (
    frame_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    band TEXT NOT NULL,
    fused DOUBLE PRECISION NOT NULL,
    cloud_score DOUBLE PRECISION NOT NULL,
    edge_score_reported DOUBLE PRECISION NOT NULL,
    edge_score_reproduced DOUBLE PRECISION NOT NULL,
    edge_exact BIGINT NOT NULL,
    model_versions TEXT NOT NULL,
    rule TEXT NOT NULL,
    received_unix_ms BIGINT NOT NULL,
    decided_unix_ms BIGINT NOT NULL
);

CREATE TABLE reviews (
    id BIGSERIAL PRIMARY KEY,
    frame_id TEXT NOT NULL,
    label TEXT NOT NULL,
    operator TEXT NOT NULL,
    note TEXT NOT NULL,
    created_unix_ms BIGINT NOT NULL
);
CREATE INDEX reviews_frame ON reviews (frame_id);

CREATE TABLE models (
    version TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    kind TEXT NOT NULL,
    backbone TEXT NOT NULL,
    path TEXT NOT NULL,
    input_height BIGINT NOT NULL,
    input_width BIGINT NOT NULL,
    bank_rows BIGINT NOT NULL,
    ok_below DOUBLE PRECISION,
    ng_above DOUBLE PRECISION,
    parent_version TEXT,
    size_bytes BIGINT NOT NULL,
    created_unix BIGINT NOT NULL,
    registered_unix_ms BIGINT NOT NULL
);

-- Which device has run which bundle, as its state messages report it (rollout,
-- canaries and rollback extend this table later).
CREATE TABLE deployments (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    model_version TEXT NOT NULL,
    first_seen_unix_ms BIGINT NOT NULL,
    last_seen_unix_ms BIGINT NOT NULL,
    PRIMARY KEY (site, device, model_version)
);

CREATE TABLE dead_letters (
    id BIGSERIAL PRIMARY KEY,
    topic TEXT NOT NULL,
    reason TEXT NOT NULL,
    payload_bytes BIGINT NOT NULL,
    payload BYTEA NOT NULL,
    received_unix_ms BIGINT NOT NULL
);
