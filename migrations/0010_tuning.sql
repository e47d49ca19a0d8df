-- kiln tune: each search (the model, the sampler, the knobs searched) and
-- its trials (a setting, how often it was measured, what was measured); a
-- trial still `running` was cut short (a kill) and is measured again on
-- resume. config_versions keeps every change kiln made to config.toml
-- (the text before and after), so `kiln tune rollback` can undo one.

CREATE TABLE tune_runs (
    id            INTEGER PRIMARY KEY,
    model         TEXT    NOT NULL,
    sampler       TEXT    NOT NULL,
    space         TEXT    NOT NULL,  -- JSON: the knobs and their ranges
    objective     TEXT    NOT NULL,  -- JSON: prompt tokens, memory cap, repeats
    trials_wanted INTEGER NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('running', 'done')),
    verdict       TEXT,              -- JSON: the best against the default, paired
    created_at    TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL
);

CREATE TABLE tune_trials (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES tune_runs (id),
    setting     TEXT    NOT NULL,  -- JSON: knob -> value
    repeats     INTEGER NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('running', 'done', 'failed')),
    metrics     TEXT,              -- JSON: per repeat and medians, or the error
    started_at  TEXT    NOT NULL,
    finished_at TEXT
);
CREATE INDEX tune_trials_by_run ON tune_trials (run_id, id);

CREATE TABLE config_versions (
    id          INTEGER PRIMARY KEY,
    at          TEXT    NOT NULL,
    actor       TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    before      TEXT    NOT NULL,  -- config.toml's text before ('' when absent)
    after       TEXT    NOT NULL,
    rolled_back INTEGER NOT NULL DEFAULT 0
);
