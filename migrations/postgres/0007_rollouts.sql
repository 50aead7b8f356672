-- Staged rollouts (cloud-hub rollouts create|list|show|pause|resume|abort): the plan,
-- where the hub's rollout driver stands, a fleet manager's pending request, and per
-- device the phase it belongs to, the version it ran before, and when it was assigned,
-- acknowledged or refused the new one.
CREATE TABLE rollouts (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    site TEXT NOT NULL,
    plan TEXT NOT NULL,                      -- JSON: phases, gates, public URL
    state TEXT NOT NULL,                     -- running, paused, done, aborted
    phase INTEGER NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    request TEXT NOT NULL DEFAULT '',        -- pause, resume, abort (consumed by the driver)
    figures TEXT NOT NULL DEFAULT '',        -- JSON: the last behaviour figures measured
    created_by TEXT NOT NULL,
    created_unix_ms BIGINT NOT NULL,
    updated_unix_ms BIGINT NOT NULL
);
CREATE INDEX rollouts_state ON rollouts (state);

CREATE TABLE rollout_devices (
    rollout_id TEXT NOT NULL,
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    phase INTEGER NOT NULL,
    previous_version TEXT NOT NULL DEFAULT '',
    assigned_unix_ms BIGINT,
    acked_unix_ms BIGINT,
    failed_reason TEXT,
    rolled_back_unix_ms BIGINT,
    PRIMARY KEY (rollout_id, site, device)
);
