-- Per device and minute (of the hub's receipt time), what the fleet pages show: frames
-- stored, frames escalated, frames per edge band, and the edge scores as a fixed histogram
-- of 48 bins (see cloud-hub's score_bins: quarter octaves from 1/8 up, the first bin every
-- score below, the last every score above) with their sum, minimum and maximum, and the
-- agent's verdict counters from its metrics. Written by
-- the same transaction that stores the frames (one upsert per device and minute of a batch),
-- deleted after `fleet.minutes_retention_days`.
CREATE TABLE device_minutes (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    minute_unix_ms BIGINT NOT NULL,
    frames BIGINT NOT NULL,
    escalated BIGINT NOT NULL,
    band_ok BIGINT NOT NULL,
    band_uncertain BIGINT NOT NULL,
    band_ng BIGINT NOT NULL,
    scored BIGINT NOT NULL,                  -- frames with a finite score (the histogram's total)
    score_sum DOUBLE PRECISION NOT NULL,
    score_min DOUBLE PRECISION,              -- NULL: no finite score this minute
    score_max DOUBLE PRECISION,
    fallbacks_total BIGINT,                  -- the agent's verdict fallbacks and late verdicts since
    late_total BIGINT,                       -- it started, as its last metrics of the minute said
    h00 BIGINT NOT NULL DEFAULT 0,
    h01 BIGINT NOT NULL DEFAULT 0,
    h02 BIGINT NOT NULL DEFAULT 0,
    h03 BIGINT NOT NULL DEFAULT 0,
    h04 BIGINT NOT NULL DEFAULT 0,
    h05 BIGINT NOT NULL DEFAULT 0,
    h06 BIGINT NOT NULL DEFAULT 0,
    h07 BIGINT NOT NULL DEFAULT 0,
    h08 BIGINT NOT NULL DEFAULT 0,
    h09 BIGINT NOT NULL DEFAULT 0,
    h10 BIGINT NOT NULL DEFAULT 0,
    h11 BIGINT NOT NULL DEFAULT 0,
    h12 BIGINT NOT NULL DEFAULT 0,
    h13 BIGINT NOT NULL DEFAULT 0,
    h14 BIGINT NOT NULL DEFAULT 0,
    h15 BIGINT NOT NULL DEFAULT 0,
    h16 BIGINT NOT NULL DEFAULT 0,
    h17 BIGINT NOT NULL DEFAULT 0,
    h18 BIGINT NOT NULL DEFAULT 0,
    h19 BIGINT NOT NULL DEFAULT 0,
    h20 BIGINT NOT NULL DEFAULT 0,
    h21 BIGINT NOT NULL DEFAULT 0,
    h22 BIGINT NOT NULL DEFAULT 0,
    h23 BIGINT NOT NULL DEFAULT 0,
    h24 BIGINT NOT NULL DEFAULT 0,
    h25 BIGINT NOT NULL DEFAULT 0,
    h26 BIGINT NOT NULL DEFAULT 0,
    h27 BIGINT NOT NULL DEFAULT 0,
    h28 BIGINT NOT NULL DEFAULT 0,
    h29 BIGINT NOT NULL DEFAULT 0,
    h30 BIGINT NOT NULL DEFAULT 0,
    h31 BIGINT NOT NULL DEFAULT 0,
    h32 BIGINT NOT NULL DEFAULT 0,
    h33 BIGINT NOT NULL DEFAULT 0,
    h34 BIGINT NOT NULL DEFAULT 0,
    h35 BIGINT NOT NULL DEFAULT 0,
    h36 BIGINT NOT NULL DEFAULT 0,
    h37 BIGINT NOT NULL DEFAULT 0,
    h38 BIGINT NOT NULL DEFAULT 0,
    h39 BIGINT NOT NULL DEFAULT 0,
    h40 BIGINT NOT NULL DEFAULT 0,
    h41 BIGINT NOT NULL DEFAULT 0,
    h42 BIGINT NOT NULL DEFAULT 0,
    h43 BIGINT NOT NULL DEFAULT 0,
    h44 BIGINT NOT NULL DEFAULT 0,
    h45 BIGINT NOT NULL DEFAULT 0,
    h46 BIGINT NOT NULL DEFAULT 0,
    h47 BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (site, device, minute_unix_ms)
);
CREATE INDEX device_minutes_minute ON device_minutes (minute_unix_ms);
-- `/frames` lists the newest captures first, over every device.
CREATE INDEX frames_captured ON frames (captured_unix_ms);
