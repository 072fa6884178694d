CREATE TABLE bus_bindings (
    queue      TEXT NOT NULL,
    event_type TEXT NOT NULL,
    PRIMARY KEY (queue, event_type)
) WITHOUT ROWID;

-- One row per event per bound queue. available_at (Unix ms) is when the
-- row may next be received: now for a new event, the end of the lease for
-- one in flight, the retry time for one that failed.
CREATE TABLE bus_messages (
    seq             INTEGER PRIMARY KEY,
    queue           TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    source          TEXT NOT NULL,
    subject         TEXT,
    time            TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    traceparent     TEXT,
    payload         BLOB NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    available_at    INTEGER NOT NULL,
    lease           INTEGER,
    last_error      TEXT,
    first_failed_at INTEGER
);
CREATE INDEX bus_messages_ready ON bus_messages (queue, available_at);
CREATE INDEX bus_messages_lease ON bus_messages (lease)
    WHERE lease IS NOT NULL;

CREATE TABLE bus_dead_letters (
    id              INTEGER PRIMARY KEY,
    queue           TEXT NOT NULL,
    event_id        TEXT NOT NULL,
    event_type      TEXT NOT NULL,
    source          TEXT NOT NULL,
    subject         TEXT,
    time            TEXT NOT NULL,
    content_type    TEXT NOT NULL,
    traceparent     TEXT,
    payload         BLOB NOT NULL,
    attempts        INTEGER NOT NULL,
    reason          TEXT NOT NULL,
    first_failed_at INTEGER NOT NULL,
    dead_at         INTEGER NOT NULL
);
CREATE INDEX bus_dead_letters_queue ON bus_dead_letters (queue);
