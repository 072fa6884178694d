//! The database a service keeps its own state in: the SQLite file of its
//! data directory (the default), or a PostgreSQL database that all its
//! replicas share.
//!
//! Services write their SQL once, with `$1`-style placeholders that both
//! backends understand, and run it on whichever pool [`with_pool!`] picks.
//! Where the dialects differ (types in a schema, row locks), each backend
//! gets its own text.

use chrono::{DateTime, Utc};
use sqlx::{ColumnIndex, Decode, Row, Type};
use uuid::Uuid;

use crate::{BusError, Envelope, TraceContext, postgres, sqlite};

/// A versioned schema change, applied once per database.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    pub version: i64,
    pub description: &'static str,
    pub sql: &'static str,
}

/// A service's database.
#[derive(Debug, Clone)]
pub enum Db {
    Sqlite(sqlite::Database),
    Postgres(postgres::Database),
}

impl Db {
    /// Applies the `component`'s migrations written for this backend.
    pub async fn migrate(
        &self,
        component: &str,
        for_sqlite: &[Migration],
        for_postgres: &[Migration],
    ) -> Result<(), sqlx::Error> {
        match self {
            Db::Sqlite(db) => db.migrate(component, for_sqlite).await,
            Db::Postgres(db) => db.migrate(component, for_postgres).await,
        }
    }

    /// Whether the database answers and takes writes.
    pub async fn is_usable(&self) -> bool {
        match self {
            Db::Sqlite(db) => db.is_usable().await,
            Db::Postgres(db) => db.is_usable().await,
        }
    }

    pub async fn close(&self) {
        match self {
            Db::Sqlite(db) => db.close().await,
            Db::Postgres(db) => db.close().await,
        }
    }
}

/// Runs `$body` with `$pool` bound to the pool `$db` writes through: the
/// SQLite writer, or the PostgreSQL pool. The body must give the same type
/// on both, so map backend-specific results (`rows_affected()`) inside it.
///
/// ```ignore
/// let claimed = with_pool!(&db, |pool| sqlx::query("DELETE ...")
///     .bind(id)
///     .execute(pool)
///     .await
///     .map(|done| done.rows_affected()));
/// ```
#[macro_export]
macro_rules! with_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match $db {
            $crate::db::Db::Sqlite(db) => {
                let $pool = db.writer();
                $body
            }
            $crate::db::Db::Postgres(db) => {
                let $pool = db.pool();
                $body
            }
        }
    };
}

/// Whether `error` means the database cannot be reached or cannot take
/// the work right now (down, restarting, overloaded, locked), so that the
/// same request may succeed a little later.
pub fn is_unavailable(error: &sqlx::Error) -> bool {
    use sqlx::Error;
    match error {
        Error::PoolTimedOut
        | Error::PoolClosed
        | Error::Io(_)
        | Error::Tls(_)
        | Error::WorkerCrashed => true,
        Error::Database(e) => match e.code() {
            // A PostgreSQL SQLSTATE. A mistake in the data (22), a broken
            // constraint (23), in the SQL (42) or inside the server (XX)
            // will not go away on its own; anything else is the server or
            // the connection to it not being usable right now: shutting
            // down (57P01, 57P03), a lost connection (08), no resources
            // (53), a lock or statement timeout (55P03, 57014), a
            // database briefly missing in a failover (3D000).
            Some(code) if code.len() == 5 => {
                !["22", "23", "42", "XX"].iter().any(|c| code.starts_with(c))
            }
            // SQLite: another writer holds the lock.
            _ => e.message().contains("locked") || e.message().contains("busy"),
        },
        _ => false,
    }
}

/// Reads an envelope stored the way herald's tables store one, on either
/// backend: `event_id`, `source`, `event_type`, `subject`, `time` (RFC
/// 3339), `content_type`, `traceparent` and `payload`.
pub(crate) fn envelope_from_row<R>(row: &R) -> Result<Envelope, BusError>
where
    R: Row,
    for<'c> &'c str: ColumnIndex<R>,
    for<'r> String: Decode<'r, R::Database> + Type<R::Database>,
    for<'r> Vec<u8>: Decode<'r, R::Database> + Type<R::Database>,
{
    let id: String = row.try_get("event_id")?;
    let time: String = row.try_get("time")?;
    let traceparent: Option<String> = row.try_get("traceparent")?;
    Ok(Envelope {
        id: Uuid::parse_str(&id)
            .map_err(|e| BusError::Corrupt(format!("event id {id:?}: {e}")))?,
        source: row.try_get("source")?,
        event_type: row.try_get("event_type")?,
        subject: row.try_get("subject")?,
        time: DateTime::parse_from_rfc3339(&time)
            .map_err(|e| BusError::Corrupt(format!("time {time:?}: {e}")))?
            .with_timezone(&Utc),
        content_type: row.try_get("content_type")?,
        traceparent: traceparent.as_deref().and_then(TraceContext::parse),
        data: row.try_get("payload")?,
    })
}
