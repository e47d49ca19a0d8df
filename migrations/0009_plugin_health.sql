-- Plugin health: every death of a plugin's worker process, and the
-- quarantine of a version that crashed repeatedly (not loaded again until
-- `kiln plugins release` or a new version).

CREATE TABLE plugin_crashes (
    id        INTEGER PRIMARY KEY,
    plugin_id INTEGER NOT NULL REFERENCES plugins (id),
    at        TEXT    NOT NULL,
    during    TEXT    NOT NULL,  -- the call it died in
    cause     TEXT    NOT NULL   -- how: the signal, the watchdog, the memory limit
);
CREATE INDEX plugin_crashes_by_plugin ON plugin_crashes (plugin_id, id);

ALTER TABLE plugins ADD COLUMN quarantined_at TEXT;
