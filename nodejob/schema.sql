-- nodejob's database schema. Loaded by store.py through importlib.resources.
-- PRAGMA user_version records the schema version (see store.SCHEMA_VERSION).

CREATE TABLE IF NOT EXISTS users (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL UNIQUE,
    token_hash  TEXT NOT NULL UNIQUE,   -- sha256 of the token; the token itself is never stored
    created_at  REAL NOT NULL
);

CREATE TABLE IF NOT EXISTS jobs (
    id                  TEXT PRIMARY KEY,
    user_id             TEXT NOT NULL,
    job_type            TEXT NOT NULL,
    status              TEXT NOT NULL,
    workflow_id         TEXT,
    execution_strategy  TEXT NOT NULL,
    params              TEXT NOT NULL,   -- JSON
    graph               TEXT,            -- JSON: the graph that runs
    created_at          REAL NOT NULL,
    started_at          REAL,
    finished_at         REAL,
    error               TEXT,
    result              TEXT,            -- JSON
    cost                REAL,
    last_seq            INTEGER NOT NULL DEFAULT 0,
    timeout_seconds     REAL,
    resources           TEXT,            -- JSON
    handle              TEXT             -- JSON: what an out-of-process execution needs to re-adopt
);
CREATE INDEX IF NOT EXISTS jobs_by_user ON jobs (user_id, created_at DESC, id DESC);
CREATE INDEX IF NOT EXISTS jobs_unfinished ON jobs (status) WHERE status IN ('starting', 'running');
-- Listing one workflow's jobs without walking the user's whole history.
CREATE INDEX IF NOT EXISTS jobs_by_workflow ON jobs (user_id, workflow_id, created_at DESC, id DESC);

-- The bounded ring of each job's messages: body is the exact JSON sent to clients.
CREATE TABLE IF NOT EXISTS messages (
    job_id  TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    type    TEXT NOT NULL,
    body    TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;

CREATE TABLE IF NOT EXISTS workflows (
    user_id     TEXT NOT NULL,
    id          TEXT NOT NULL,
    name        TEXT NOT NULL,
    graph       TEXT NOT NULL,
    created_at  REAL NOT NULL,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (user_id, id)
);
