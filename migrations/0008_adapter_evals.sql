-- `kiln finetune eval` of a registered adapter version: every run's
-- held-out numbers against the base model, kept with the version they
-- measured (the whole report as JSON beside the headline columns).

CREATE TABLE adapter_evals (
    id               INTEGER PRIMARY KEY,
    adapter_id       INTEGER NOT NULL REFERENCES adapters (id),
    model            TEXT    NOT NULL,     -- the base model, as `--model` resolved it
    model_sha256     TEXT    NOT NULL,
    data             TEXT    NOT NULL,     -- the data directory evaluated
    sequences        INTEGER NOT NULL,
    target_tokens    INTEGER NOT NULL,
    holes            INTEGER NOT NULL,
    base_nll         REAL    NOT NULL,     -- nats per target token
    adapter_nll      REAL    NOT NULL,
    delta_nll        REAL    NOT NULL,     -- adapter less base, paired
    delta_nll_lo     REAL    NOT NULL,     -- its 95% bootstrap interval
    delta_nll_hi     REAL    NOT NULL,
    report           TEXT    NOT NULL,
    measured_at      TEXT    NOT NULL
);
CREATE INDEX adapter_evals_by_adapter ON adapter_evals (adapter_id, id);
