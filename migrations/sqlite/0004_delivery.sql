-- Delivery streams. Each spool queue of a device (results, escalations) numbers its
-- records from 0 without gaps; the hub keeps, per stream, up to where it has every record
-- and asks the device again for what a broker acknowledged and then lost.
CREATE TABLE delivery_streams (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    stream INTEGER NOT NULL,                 -- the device's random stream id (64 bits, as signed)
    queue TEXT NOT NULL,                    -- results or escalations
    contiguous_until INTEGER NOT NULL,        -- every record below it is here (or given up)
    highest_seen INTEGER NOT NULL,            -- one past the largest sequence number received
    announced_acked INTEGER NOT NULL DEFAULT 0, -- the device's broker-acknowledged position (metrics)
    kept_from INTEGER NOT NULL DEFAULT 0,     -- the oldest record the device still keeps (metrics)
    last_record_unix_ms INTEGER NOT NULL,     -- when the last record of the stream was stored
    gap_since_unix_ms INTEGER NOT NULL DEFAULT 0,
    resend_unix_ms INTEGER NOT NULL DEFAULT 0,
    resends INTEGER NOT NULL DEFAULT 0,       -- requests for the current gap
    lost INTEGER NOT NULL DEFAULT 0,          -- records given up for good
    first_seen_unix_ms INTEGER NOT NULL,
    PRIMARY KEY (site, device, stream)
);

-- Sequence numbers received at or above their stream's contiguous_until; pruned as it
-- advances, so the table holds only what a gap keeps apart.
CREATE TABLE delivered (
    site TEXT NOT NULL,
    device TEXT NOT NULL,
    stream INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (site, device, stream, seq)
);

-- Device states are ordered by the connection they belong to (DeviceState.connected_unix_ms,
-- OFFLINE after ONLINE), so a last will that arrives late never hides a newer ONLINE.
ALTER TABLE devices ADD COLUMN state_order INTEGER NOT NULL DEFAULT 0;
