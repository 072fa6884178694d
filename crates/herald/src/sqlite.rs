//! The SQLite database a process keeps in its data directory.
//!
//! One file holds everything of the embedded form: each service's tables,
//! the bus's queues and its dead letters. That is what lets a service
//! commit its own change and the event announcing it in one transaction.
//!
//! SQLite runs one writer at a time, so a [`Database`] has a pool of one
//! writer connection, whose transactions all start with `BEGIN IMMEDIATE`
//! (taking the write lock up front, so they never fail half-way on a lock),
//! and a separate pool of read-only connections. WAL mode with
//! `synchronous = NORMAL` makes every commit survive the process being
//! killed; only a power loss can roll back the last few commits.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{Sqlite, Transaction};

/// How long a statement waits for another process's write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a caller waits for the writer connection. Longer than
/// [`BUSY_TIMEOUT`] so that a caller sees the lock wait, not a pool timeout.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

const READERS: u32 = 4;

pub use crate::db::Migration;

/// An open SQLite database: one writer, several readers.
#[derive(Debug, Clone)]
pub struct Database {
    path: PathBuf,
    writer: SqlitePool,
    reader: SqlitePool,
}

impl Database {
    /// Opens (creating if needed) the database file at `path`.
    pub async fn open(path: &Path) -> Result<Self, sqlx::Error> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true);

        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.clone())
            .await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(READERS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options.read_only(true))
            .await?;

        Ok(Database {
            path: path.to_owned(),
            writer,
            reader,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pool of the one writer connection. Never hold it across slow
    /// work (hashing, network calls): every writer in the process waits.
    pub fn writer(&self) -> &SqlitePool {
        &self.writer
    }

    pub fn reader(&self) -> &SqlitePool {
        &self.reader
    }

    /// Starts a write transaction holding the write lock from its first
    /// statement.
    pub async fn begin(
        &self,
    ) -> Result<Transaction<'static, Sqlite>, sqlx::Error> {
        self.writer.begin_with("BEGIN IMMEDIATE").await
    }

    /// Applies the `component`'s migrations that this database has not seen
    /// yet, each in its own transaction, in version order.
    pub async fn migrate(
        &self,
        component: &str,
        migrations: &[Migration],
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS herald_migrations (
                component   TEXT NOT NULL,
                version     INTEGER NOT NULL,
                description TEXT NOT NULL,
                applied_at  TEXT NOT NULL DEFAULT CURRENT_TIMESTAMP,
                PRIMARY KEY (component, version)
            )",
        )
        .execute(&self.writer)
        .await?;

        for migration in migrations {
            let mut tx = self.begin().await?;
            let applied: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM herald_migrations
                 WHERE component = ? AND version = ?",
            )
            .bind(component)
            .bind(migration.version)
            .fetch_optional(&mut *tx)
            .await?;
            if applied.is_some() {
                continue;
            }

            sqlx::raw_sql(migration.sql).execute(&mut *tx).await?;
            sqlx::query(
                "INSERT INTO herald_migrations
                 (component, version, description) VALUES (?, ?, ?)",
            )
            .bind(component)
            .bind(migration.version)
            .bind(migration.description)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            tracing::info!(
                component,
                version = migration.version,
                description = migration.description,
                "applied migration"
            );
        }
        Ok(())
    }

    /// Whether the database answers a query and accepts the write lock.
    pub async fn is_usable(&self) -> bool {
        let read = sqlx::query("SELECT 1").execute(&self.reader).await;
        let write = self.begin().await;
        read.is_ok() && write.is_ok()
    }

    /// Closes both pools, waiting for connections in use to come back.
    pub async fn close(&self) {
        self.writer.close().await;
        self.reader.close().await;
    }
}

/// Milliseconds since the Unix epoch: how herald's tables store time.
pub fn now_millis() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIGRATIONS: &[Migration] = &[
        Migration {
            version: 1,
            description: "create things",
            sql: "CREATE TABLE things (id INTEGER PRIMARY KEY)",
        },
        Migration {
            version: 2,
            description: "name things",
            sql: "ALTER TABLE things ADD COLUMN name TEXT",
        },
    ];

    #[tokio::test]
    async fn migrations_apply_once_and_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("herald.db");

        let db = Database::open(&path).await.unwrap();
        db.migrate("test", MIGRATIONS).await.unwrap();
        db.close().await;

        let db = Database::open(&path).await.unwrap();
        db.migrate("test", MIGRATIONS).await.unwrap();
        let applied: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM herald_migrations WHERE component = 'test'",
        )
        .fetch_one(db.reader())
        .await
        .unwrap();
        assert_eq!(applied, 2);

        let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
            .fetch_one(db.reader())
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
