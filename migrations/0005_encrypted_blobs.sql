-- Encryption at rest: a model version whose blob is stored encrypted in
-- the age format (`sha256-<hex>.age`; sha256 stays the plaintext's).

ALTER TABLE models ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0;
