-- A score that is absent (no cloud model; the edge bundle missing; a model that gave a
-- non-finite score) is NULL. Before this, such scores were written as -1, which read
-- back any negative score (heavy-model scores can be negative) as absent; the -1 values
-- written that way become NULL.
ALTER TABLE verdicts ALTER COLUMN cloud_score DROP NOT NULL;
ALTER TABLE verdicts ALTER COLUMN edge_score_reproduced DROP NOT NULL;
ALTER TABLE inferences ALTER COLUMN score DROP NOT NULL;
UPDATE verdicts SET cloud_score = NULL WHERE cloud_score = -1;
UPDATE verdicts SET edge_score_reproduced = NULL WHERE edge_score_reproduced = -1;
UPDATE inferences SET score = NULL WHERE score = -1;
