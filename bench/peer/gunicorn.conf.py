"""gunicorn's settings for the peer's users service.

Sync workers, one request at a time each. On 2 cores the peer runs 5,
gunicorn's own rule of thumb (2 x cores + 1): each request spends tens
of milliseconds of one core in Argon2, and the spare workers take the
next requests (and /healthz) while others hash or wait on SQLite and
the broker. More workers would only queue for the same two cores, each
holding another 19 MiB while it hashes. ``PEER_WORKERS`` overrides it.
"""

import os

import store

bind = f"127.0.0.1:{os.environ.get('PEER_PORT', '5100')}"
workers = int(os.environ.get("PEER_WORKERS", "5"))
worker_class = "sync"
timeout = 30
graceful_timeout = 5
# Connections the kernel holds while every worker is busy.
backlog = 2048
errorlog = "-"
loglevel = "warning"


def on_starting(server):
    """Creates the users table in the master, before any worker forks."""
    store.create_schema(os.environ.get("PEER_DATABASE", "peer.db"))
