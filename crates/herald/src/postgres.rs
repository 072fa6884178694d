//! A PostgreSQL database shared by the replicas of a service.
//!
//! Where SQLite keeps one machine's state in a file, PostgreSQL lets
//! several processes, on several machines, share it: the users of every
//! users replica, the outbox they all relay from, the mailer's record of
//! what it sent. Every wait on it is bounded: a connection is given up
//! after [`ACQUIRE_TIMEOUT`], a statement after [`STATEMENT_TIMEOUT`], so
//! a database that is down or stuck turns into an error, never a hang.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection, Postgres, Transaction};

use crate::db::Migration;

/// How long a caller waits for a connection, including opening one.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the server lets one statement run, and wait for a lock.
const STATEMENT_TIMEOUT: &str = "10s";
const LOCK_TIMEOUT: &str = "5s";

const MAX_CONNECTIONS: u32 = 16;

/// The advisory lock that serialises migrations, so that replicas
/// starting together do not apply the same one twice.
const MIGRATION_LOCK: i64 = 0x6865_7261_6c64; // "herald"

/// An open PostgreSQL database: a pool of connections.
#[derive(Debug, Clone)]
pub struct Database {
    pool: PgPool,
}

impl Database {
    /// Connects to the database at `url` (`postgres://user:pass@host/db`).
    pub async fn open(url: &str) -> Result<Self, sqlx::Error> {
        let options: PgConnectOptions = url.parse()?;
        let options = options.application_name("herald").options([
            ("statement_timeout", STATEMENT_TIMEOUT),
            ("lock_timeout", LOCK_TIMEOUT),
            // Notices such as "already exists, skipping" are not news.
            ("client_min_messages", "warning"),
        ]);
        // One connection first, so that a server that is down or refuses
        // us says why, rather than the pool saying it timed out.
        let first = tokio::time::timeout(
            ACQUIRE_TIMEOUT,
            PgConnection::connect_with(&options),
        )
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
        first.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .idle_timeout(Duration::from_secs(60))
            .connect_lazy_with(options);
        Ok(Database { pool })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub async fn begin(
        &self,
    ) -> Result<Transaction<'static, Postgres>, sqlx::Error> {
        self.pool.begin().await
    }

    /// Applies the `component`'s migrations that this database has not seen
    /// yet, all in one transaction, under a lock that other processes
    /// migrating at the same moment wait for.
    pub async fn migrate(
        &self,
        component: &str,
        migrations: &[Migration],
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS herald_migrations (
                component   TEXT NOT NULL,
                version     BIGINT NOT NULL,
                description TEXT NOT NULL,
                applied_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
                PRIMARY KEY (component, version)
            )",
        )
        .execute(&mut *tx)
        .await?;

        for migration in migrations {
            let applied: Option<i64> = sqlx::query_scalar(
                "SELECT version FROM herald_migrations
                 WHERE component = $1 AND version = $2",
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
                "INSERT INTO herald_migrations (component, version, description)
                 VALUES ($1, $2, $3)",
            )
            .bind(component)
            .bind(migration.version)
            .bind(migration.description)
            .execute(&mut *tx)
            .await?;
            tracing::info!(
                component,
                version = migration.version,
                description = migration.description,
                "applied migration"
            );
        }
        tx.commit().await
    }

    /// Whether the database answers.
    pub async fn is_usable(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}
