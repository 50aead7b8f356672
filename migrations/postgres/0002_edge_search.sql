-- How the edge searched its memory bank for an escalated frame (`exact`, `probes=N`;
-- NULL from agents that do not say), so the hub reproduces its score the same way.
ALTER TABLE escalations ADD COLUMN edge_search TEXT;
