-- A/B experiments between two versions of a model (the seed's
-- `model_versions` and `ab_experiments`), which arm each unit (a
-- workspace, an HTTP client) was given, and what became of each
-- completion served in one.

CREATE VIEW model_versions AS
    SELECT id, name, version, sha256, quant_type, state, added_at FROM models;

CREATE TABLE ab_experiments (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    model       TEXT    NOT NULL,                         -- the name both versions share
    a_id        INTEGER NOT NULL REFERENCES models (id),  -- the control
    b_id        INTEGER NOT NULL REFERENCES models (id),  -- the treatment
    split       REAL    NOT NULL CHECK (split > 0 AND split < 1),  -- share of units given b
    metric      TEXT    NOT NULL CHECK (metric IN ('acceptance', 'latency')),
    state       TEXT    NOT NULL CHECK (state IN ('running', 'stopped')),
    winner      TEXT    CHECK (winner IN ('a', 'b')),
    reason      TEXT,                                     -- why it stopped
    started_at  TEXT    NOT NULL,
    stopped_at  TEXT
);
CREATE UNIQUE INDEX ab_one_running_per_model ON ab_experiments (model) WHERE state = 'running';

CREATE TABLE ab_assignments (
    experiment_id INTEGER NOT NULL REFERENCES ab_experiments (id),
    unit          TEXT    NOT NULL,
    arm           TEXT    NOT NULL CHECK (arm IN ('a', 'b')),
    assigned_at   TEXT    NOT NULL,
    PRIMARY KEY (experiment_id, unit)
);

-- One row per completion served in an experiment: shown when served (with
-- its latency), then accepted (with the characters kept and the time to
-- accept), superseded (the editor asked again without accepting it) or an
-- error.
CREATE TABLE ab_outcomes (
    id             INTEGER PRIMARY KEY,
    experiment_id  INTEGER NOT NULL REFERENCES ab_experiments (id),
    arm            TEXT    NOT NULL CHECK (arm IN ('a', 'b')),
    unit           TEXT    NOT NULL,
    completion     TEXT    NOT NULL,
    outcome        TEXT    NOT NULL CHECK (outcome IN ('shown', 'accepted', 'superseded', 'error')),
    latency_ms     REAL,
    accepted_chars INTEGER,
    accept_ms      REAL,
    served_at      TEXT    NOT NULL,
    UNIQUE (experiment_id, completion)
);
CREATE INDEX ab_outcomes_by_arm ON ab_outcomes (experiment_id, arm, outcome);
