-- The plugin registry: installed plugin versions, which one of each is
-- active, the history of activations (for rollback), cached device
-- scores, and the audit log of every change.

CREATE TABLE plugins (
    id            INTEGER PRIMARY KEY,
    name          TEXT    NOT NULL,
    version       TEXT    NOT NULL,
    kind          TEXT    NOT NULL,
    sha256        TEXT    NOT NULL,
    manifest_path TEXT    NOT NULL,
    library_path  TEXT    NOT NULL,
    abi_major     INTEGER NOT NULL,
    abi_minor     INTEGER NOT NULL,
    state         TEXT    NOT NULL CHECK (state IN ('active', 'inactive', 'disabled')),
    conformance   TEXT    NOT NULL,  -- JSON summary of the conformance run
    installed_at  TEXT    NOT NULL,
    updated_at    TEXT    NOT NULL,
    UNIQUE (name, version)
);

-- At most one active version per plugin name.
CREATE UNIQUE INDEX plugins_one_active ON plugins (name) WHERE state = 'active';

-- Every time a version becomes active. Rollback pops this stack: it marks
-- the newest live row rolled back and re-activates the one before it.
CREATE TABLE plugin_activations (
    id           INTEGER PRIMARY KEY,
    name         TEXT    NOT NULL,
    plugin_id    INTEGER NOT NULL REFERENCES plugins (id),
    activated_at TEXT    NOT NULL,
    rolled_back  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX plugin_activations_by_name ON plugin_activations (name, id);

-- Microbenchmark results, keyed by what was measured: the backend build
-- (plugin sha256, or the built-in backend's identity) and the device.
CREATE TABLE device_scores (
    backend_key TEXT NOT NULL,
    device_key  TEXT NOT NULL,
    score       REAL NOT NULL,
    details     TEXT NOT NULL,  -- JSON
    measured_at TEXT NOT NULL,
    PRIMARY KEY (backend_key, device_key)
);

CREATE TABLE audit_log (
    id      INTEGER PRIMARY KEY,
    at      TEXT NOT NULL,
    actor   TEXT NOT NULL,
    action  TEXT NOT NULL,
    subject TEXT NOT NULL,
    before  TEXT,
    after   TEXT,
    detail  TEXT
);
