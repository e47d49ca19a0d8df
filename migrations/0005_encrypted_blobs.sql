-- Encryption at rest: a model version whose blob is stored encrypted in
-- the age format (`sha256-<hex>.age`; sha256 stays the plaintext's), and
-- a logged policy decision whose input and output bytes are each an age
-- file (they hold the user's code).

ALTER TABLE models ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0;
ALTER TABLE policy_decisions ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0;
