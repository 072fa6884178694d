//! The transactional outbox on PostgreSQL, and its relay.
//!
//! A service that keeps its state in PostgreSQL stages each event in the
//! `herald_outbox` table, in the same transaction as the change the event
//! announces: both commit, or neither does. A [`Relay`] in every replica
//! then carries staged events to the broker. It locks a batch of rows with
//! `FOR UPDATE SKIP LOCKED` (so replicas relaying at once take different
//! rows), publishes them, and deletes each row only after the broker has
//! confirmed its event. A publish that fails leaves its row in place, to be
//! tried again after a backoff, for as long as the broker stays away.
//!
//! Events of one key (their subject) are relayed in the order they were
//! staged: a pass takes only the first waiting event of each key, so the
//! next one waits while it is being published or waiting for a retry,
//! in this replica or another.
//!
//! A crash between the confirm and the delete publishes the event again:
//! delivery is at least once, and consumers recognise a repeat by its id.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::PgConnection;
use sqlx::postgres::PgRow;
use tokio::sync::Notify;
use tokio::task::JoinSet;

use crate::db::Migration;
use crate::sqlite::now_millis;
use crate::{Broker, BusError, Envelope, postgres};

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "events staged for the broker",
        sql: "CREATE TABLE herald_outbox (
        seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        event_id     TEXT NOT NULL,
        event_type   TEXT NOT NULL,
        source       TEXT NOT NULL,
        subject      TEXT,
        time         TEXT NOT NULL,
        content_type TEXT NOT NULL,
        traceparent  TEXT,
        payload      BYTEA NOT NULL,
        staged_at    BIGINT NOT NULL,
        attempts     INTEGER NOT NULL DEFAULT 0,
        available_at BIGINT NOT NULL,
        last_error   TEXT
    );
    CREATE INDEX herald_outbox_available ON herald_outbox (available_at, seq);",
    },
    Migration {
        version: 2,
        description: "events of a key relayed in order",
        sql: "CREATE INDEX herald_outbox_key ON herald_outbox (subject, seq)
          WHERE subject IS NOT NULL;",
    },
];

/// Events one relay pass locks and publishes at most.
const BATCH: i64 = 64;

/// How often a relay looks for events staged by other processes (its own
/// wake it at once).
const POLL: Duration = Duration::from_millis(250);

/// Backoff between attempts to publish one event: doubling from the base
/// to the cap.
const RETRY_BASE: Duration = Duration::from_millis(500);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// How often the relay counts the backlog for the metrics.
const BACKLOG_SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// A service's outbox in its PostgreSQL database.
#[derive(Debug, Clone)]
pub struct Outbox {
    db: postgres::Database,
    staged: Arc<Notify>,
}

impl Outbox {
    /// Creates the outbox table if needed.
    pub async fn open(db: postgres::Database) -> Result<Self, sqlx::Error> {
        db.migrate("outbox", MIGRATIONS).await?;
        Ok(Outbox {
            db,
            staged: Arc::new(Notify::new()),
        })
    }

    pub fn database(&self) -> &postgres::Database {
        &self.db
    }

    /// Stages `envelope` in the transaction `tx` belongs to. Call
    /// [`wake`](Self::wake) once it has committed.
    pub async fn stage(
        tx: &mut PgConnection,
        envelope: &Envelope,
    ) -> Result<(), sqlx::Error> {
        let now = now_millis();
        sqlx::query(
            "INSERT INTO herald_outbox (event_id, event_type, source, subject,
                 time, content_type, traceparent, payload, staged_at,
                 available_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)",
        )
        .bind(envelope.id.to_string())
        .bind(&envelope.event_type)
        .bind(&envelope.source)
        .bind(&envelope.subject)
        .bind(envelope.time.to_rfc3339())
        .bind(&envelope.content_type)
        .bind(envelope.traceparent.map(|t| t.to_string()))
        .bind(&envelope.data)
        .bind(now)
        .execute(tx)
        .await?;
        Ok(())
    }

    /// Tells this process's relay that an event was committed.
    pub fn wake(&self) {
        self.staged.notify_one();
    }

    /// Events staged and not yet confirmed by the broker, from every
    /// replica.
    pub async fn backlog(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM herald_outbox")
            .fetch_one(self.db.pool())
            .await
    }

    /// Relays staged events to `target` until `stop` completes. The batch
    /// in hand when it does is finished first, so that what the broker
    /// confirmed is also deleted.
    pub async fn relay(
        &self,
        target: Arc<dyn Broker>,
        stop: impl Future<Output = ()>,
    ) -> Result<(), BusError> {
        let mut stop = std::pin::pin!(stop);
        let mut trouble = Duration::ZERO;
        let mut sampled: Option<Instant> = None;
        loop {
            if sampled.is_none_or(|at| at.elapsed() >= BACKLOG_SAMPLE_PERIOD) {
                sampled = Some(Instant::now());
                if let Ok(waiting) = self.backlog().await {
                    let waiting = u64::try_from(waiting).unwrap_or_default();
                    crate::metrics::outbox_backlog("postgres", waiting);
                }
            }
            let wait = match self.relay_batch(&target).await {
                Ok(relayed) if relayed > 0 => Duration::ZERO,
                Ok(_) => POLL,
                Err(error) => {
                    trouble = (trouble * 2).clamp(RETRY_BASE, RETRY_CAP);
                    tracing::warn!(
                        error = %crate::error_chain(&error),
                        "cannot read the outbox; trying again in {trouble:?}"
                    );
                    trouble
                }
            };
            if wait.is_zero() {
                trouble = Duration::ZERO;
            }
            tokio::select! {
                biased;
                _ = &mut stop => return Ok(()),
                _ = self.staged.notified(), if !wait.is_zero() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Publishes one batch of due events; returns how many were taken.
    async fn relay_batch(
        &self,
        target: &Arc<dyn Broker>,
    ) -> Result<usize, BusError> {
        let now = now_millis();
        let mut tx = self.db.begin().await?;
        let rows: Vec<PgRow> = sqlx::query(
            "SELECT seq, attempts, event_id, event_type, source, subject,
                    time, content_type, traceparent, payload
             FROM herald_outbox o
             WHERE available_at <= $1
               AND (subject IS NULL OR NOT EXISTS (
                   SELECT 1 FROM herald_outbox e
                   WHERE e.subject = o.subject AND e.seq < o.seq))
             ORDER BY seq
             LIMIT $2
             FOR UPDATE SKIP LOCKED",
        )
        .bind(now)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }

        let mut publishes = JoinSet::new();
        let mut failed = Vec::new();
        for row in &rows {
            use sqlx::Row;
            let seq: i64 = row.try_get("seq")?;
            let attempts: i32 = row.try_get("attempts")?;
            match crate::db::envelope_from_row(row) {
                Ok(envelope) => {
                    let target = target.clone();
                    publishes.spawn(async move {
                        let published = target.publish(&envelope).await;
                        (seq, attempts, published.map(|()| envelope))
                    });
                }
                Err(corrupt) => failed.push((seq, attempts, corrupt)),
            }
        }
        let (mut confirmed, mut relayed) = (Vec::new(), Vec::new());
        while let Some(joined) = publishes.join_next().await {
            let (seq, attempts, published) =
                joined.expect("a publish task does not panic");
            match published {
                Ok(envelope) => {
                    confirmed.push(seq);
                    relayed.push(envelope);
                }
                Err(error) => failed.push((seq, attempts, error)),
            }
        }

        sqlx::query("DELETE FROM herald_outbox WHERE seq = ANY($1)")
            .bind(&confirmed)
            .execute(&mut *tx)
            .await?;
        for (seq, attempts, error) in &failed {
            let delay = backoff(*attempts);
            sqlx::query(
                "UPDATE herald_outbox
                 SET attempts = attempts + 1, available_at = $2,
                     last_error = $3
                 WHERE seq = $1",
            )
            .bind(seq)
            .bind(now_millis().saturating_add(delay.as_millis() as i64))
            .bind(crate::error_chain(error))
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;

        for envelope in &relayed {
            let lag = crate::metrics::since(envelope.time);
            crate::metrics::relayed(&envelope.event_type, lag);
        }
        if let Some((_, attempts, error)) = failed.first() {
            tracing::warn!(
                failed = failed.len(),
                relayed = confirmed.len(),
                error = %crate::error_chain(error),
                "events stay in the outbox until the broker takes them; \
                 next try in {:?}",
                backoff(*attempts)
            );
        }
        Ok(rows.len())
    }
}

/// The wait before the next attempt at an event that failed `attempts`
/// times before this failure.
fn backoff(attempts: i32) -> Duration {
    let doublings = attempts.clamp(0, 16) as u32;
    RETRY_BASE.saturating_mul(1 << doublings).min(RETRY_CAP)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_the_base_up_to_the_cap() {
        assert_eq!(backoff(0), RETRY_BASE);
        assert_eq!(backoff(1), RETRY_BASE * 2);
        assert_eq!(backoff(3), RETRY_BASE * 8);
        assert_eq!(backoff(30), RETRY_CAP);
        assert_eq!(backoff(i32::MAX), RETRY_CAP);
    }
}
