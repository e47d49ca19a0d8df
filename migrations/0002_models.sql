-- The model store: every model version added to kiln, its blob in the
-- content-addressed store, and which version of each name is active.

CREATE TABLE models (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    version      INTEGER NOT NULL,            -- 1, 2, … per name
    sha256       TEXT    NOT NULL,
    blob_path    TEXT    NOT NULL,            -- $KILN_HOME/models/blobs/sha256-<hex>
    architecture TEXT    NOT NULL,
    quant_type   TEXT    NOT NULL,            -- e.g. f16, q4_0, mixed (q4_k, q6_k)
    size_bytes   INTEGER NOT NULL,
    parent_id    INTEGER REFERENCES models (id),  -- the source, when made by kiln quantize
    state        TEXT    NOT NULL CHECK (state IN ('active', 'inactive')),
    added_at     TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    UNIQUE (name, version)
);
CREATE UNIQUE INDEX models_one_active ON models (name) WHERE state = 'active';
CREATE INDEX models_by_sha ON models (sha256);

-- The rollback stack of model activations, as for plugins.
CREATE TABLE model_activations (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    model_id     INTEGER NOT NULL REFERENCES models (id),
    activated_at TEXT    NOT NULL,
    rolled_back  INTEGER NOT NULL DEFAULT 0
);

-- The audit log now records models too.
ALTER TABLE audit_log ADD COLUMN kind TEXT NOT NULL DEFAULT 'plugin';
