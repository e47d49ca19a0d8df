-- WebAssembly policies: versions of each name, one active version per
-- name and one active policy per kind (the ranker and the tuner in use),
-- consecutive run-time failures for the circuit breaker, and the decision
-- log that `kiln policy replay` re-runs.

CREATE TABLE policies (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    version      TEXT    NOT NULL,
    kind         TEXT    NOT NULL CHECK (kind IN ('rank', 'tune')),
    sha256       TEXT    NOT NULL,
    blob_path    TEXT    NOT NULL,
    abi_major    INTEGER NOT NULL,
    abi_minor    INTEGER NOT NULL,
    state        TEXT    NOT NULL CHECK (state IN ('active', 'inactive', 'disabled')),
    limits       TEXT    NOT NULL,            -- JSON PolicyLimits
    quality      TEXT    NOT NULL,            -- JSON quality-gate report
    failures     INTEGER NOT NULL DEFAULT 0,  -- consecutive run-time failures
    installed_at TEXT    NOT NULL,
    updated_at   TEXT    NOT NULL,
    UNIQUE (name, version)
);
CREATE UNIQUE INDEX policies_one_active ON policies (name) WHERE state = 'active';
CREATE UNIQUE INDEX policies_one_active_kind ON policies (kind) WHERE state = 'active';

CREATE TABLE policy_activations (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    policy_id    INTEGER NOT NULL REFERENCES policies (id),
    activated_at TEXT    NOT NULL,
    rolled_back  INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE policy_decisions (
    id            INTEGER PRIMARY KEY,
    at            TEXT    NOT NULL,
    policy        TEXT    NOT NULL,  -- name@version
    policy_sha256 TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    input         BLOB    NOT NULL,  -- the exact bytes the policy received
    output        BLOB,              -- the exact bytes it returned, if it returned
    error         TEXT,
    fuel_used     INTEGER,
    elapsed_us    INTEGER
);
