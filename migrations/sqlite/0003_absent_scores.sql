-- A score that is absent (no cloud model; the edge bundle missing; a model that gave a
-- non-finite score) is NULL. Before this, such scores were written as -1, which read
-- back any negative score (heavy-model scores can be negative) as absent; the -1 values
-- written that way become NULL. SQLite cannot drop NOT NULL in place: the two tables are
-- rebuilt with the same columns.
CREATE TABLE verdicts_0003 (
    frame_id TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    band TEXT NOT NULL,
    fused REAL NOT NULL,
    cloud_score REAL,
    edge_score_reported REAL NOT NULL,
    edge_score_reproduced REAL,
    edge_exact INTEGER NOT NULL,
    model_versions TEXT NOT NULL,
    rule TEXT NOT NULL,
    received_unix_ms INTEGER NOT NULL,
    decided_unix_ms INTEGER NOT NULL
);
INSERT INTO verdicts_0003 (frame_id, site, device, band, fused, cloud_score,
    edge_score_reported, edge_score_reproduced, edge_exact, model_versions, rule,
    received_unix_ms, decided_unix_ms)
SELECT frame_id, site, device, band, fused, NULLIF(cloud_score, -1), edge_score_reported,
    NULLIF(edge_score_reproduced, -1), edge_exact, model_versions, rule, received_unix_ms,
    decided_unix_ms
FROM verdicts;
DROP TABLE verdicts;
ALTER TABLE verdicts_0003 RENAME TO verdicts;

CREATE TABLE inferences_0003 (
    frame_id TEXT NOT NULL,
    model TEXT NOT NULL,
    model_version TEXT NOT NULL,
    score REAL,
    ok_below REAL NOT NULL,
    ng_above REAL NOT NULL,
    map_key TEXT,
    latency_ms REAL NOT NULL,
    created_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (frame_id, model)
);
INSERT INTO inferences_0003 (frame_id, model, model_version, score, ok_below, ng_above,
    map_key, latency_ms, created_unix_ms)
SELECT frame_id, model, model_version, NULLIF(score, -1), ok_below, ng_above, map_key,
    latency_ms, created_unix_ms
FROM inferences;
DROP TABLE inferences;
ALTER TABLE inferences_0003 RENAME TO inferences;
