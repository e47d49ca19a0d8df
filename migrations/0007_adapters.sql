-- LoRA adapters beside models: every `kiln adapters add` of a name is a
-- new version (1, 2, …) pointing at a blob in $KILN_HOME/adapters/blobs,
-- one version per name active, with the same rollback stack and audit log.

CREATE TABLE adapters (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    sha256       TEXT    NOT NULL,
    blob_path    TEXT    NOT NULL,
    architecture TEXT    NOT NULL,            -- the models it applies to
    rank         INTEGER NOT NULL,
    alpha        REAL    NOT NULL,
    size_bytes   INTEGER NOT NULL,
    base_sha256  TEXT,                        -- the model it was checked against, if any
    dp_epsilon   REAL,                        -- trained with differential privacy: (ε, δ) spent
    dp_delta     REAL,
    state        TEXT    NOT NULL CHECK (state IN ('active', 'inactive', 'disabled')),
    added_at     TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    UNIQUE (name, version)
);
CREATE UNIQUE INDEX adapters_one_active ON adapters (name) WHERE state = 'active';

CREATE TABLE adapter_activations (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    adapter_id   INTEGER NOT NULL REFERENCES adapters (id),
    activated_at TEXT    NOT NULL,
    rolled_back  INTEGER NOT NULL DEFAULT 0
);
