"""The peer's users table: one SQLite file in WAL mode, via ``sqlite3``.

User ids are unique ignoring letter case (the column's NOCASE collation);
addresses are unique by ``email_key``, the address in lower case. Each
gunicorn worker opens a connection per request, as Flask's tutorial does;
concurrent writers wait for each other through SQLite's busy timeout.
"""

import sqlite3
from datetime import datetime, timezone

# How long a writer waits for another's lock before giving up, in seconds.
BUSY_TIMEOUT_SECS = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    user_id       TEXT PRIMARY KEY COLLATE NOCASE,
    user_name     TEXT NOT NULL,
    email         TEXT NOT NULL,
    email_key     TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    locale        TEXT NOT NULL,
    registered_at TEXT NOT NULL
)
"""


class Taken(Exception):
    """The user id or the address is registered already."""

    def __init__(self, field):
        super().__init__(f"this {field} is already registered")
        self.field = field


def connect(path):
    connection = sqlite3.connect(path, timeout=BUSY_TIMEOUT_SECS)
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


def create_schema(path):
    """Creates the table and switches the file to WAL. Run once, before
    the workers start, so that they never race to change the journal."""
    with connect(path) as connection:
        connection.execute("PRAGMA journal_mode = WAL")
        connection.execute(SCHEMA)
    connection.close()


def find_taken(connection, registration):
    """Which field of ``registration`` is taken, or None."""
    row = connection.execute(
        "SELECT user_id = ? COLLATE NOCASE FROM users"
        " WHERE user_id = ? COLLATE NOCASE OR email_key = ? LIMIT 1",
        (
            registration.user_id,
            registration.user_id,
            registration.email_key,
        ),
    ).fetchone()
    if row is None:
        return None
    return "user_id" if row[0] else "email"


def insert_user(connection, registration, password_hash):
    """Stores the user and commits, or raises Taken when a concurrent
    registration won the race for the same id or address."""
    try:
        with connection:
            connection.execute(
                "INSERT INTO users (user_id, user_name, email, email_key,"
                " password_hash, locale, registered_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    registration.user_id,
                    registration.user_name,
                    registration.email,
                    registration.email_key,
                    password_hash,
                    registration.locale,
                    datetime.now(timezone.utc).isoformat(),
                ),
            )
    except sqlite3.IntegrityError as error:
        field = "email" if "email_key" in str(error) else "user_id"
        raise Taken(field) from error
