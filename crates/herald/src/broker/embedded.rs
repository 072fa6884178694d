//! The embedded broker: queues in the service's own SQLite database.
//!
//! Nothing to install and nothing to run beside the process. Tables:
//!
//! - `bus_bindings`: which queue receives which event type.
//! - `bus_messages`: one row per event per bound queue, waiting or in
//!   flight. A row is *ready* when its `available_at` has passed.
//! - `bus_dead_letters`: messages set aside, with the reason.
//!
//! Receiving a message leases it: the row gets a lease id and its
//! `available_at` moves to the end of the lease, so no other consumer sees
//! it until then. While the message is in flight the broker keeps renewing
//! the lease; if the process dies, the lease runs out and the message is
//! ready again. Acknowledging deletes the row, retrying moves
//! `available_at` to the retry time.
//!
//! Publishing inside the caller's own transaction ([`EmbeddedBroker::stage`])
//! is what makes the service's database its outbox: the change and its
//! event commit together or not at all.
//!
//! Consumers in this process are woken as soon as a message is published
//! or staged here; messages written by another process sharing the file
//! are found by polling, at most [`EmbeddedOptions::poll_interval`] late.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use chrono::DateTime;
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, SqliteConnection};
use tokio::sync::watch;

use super::group_commit::{GroupCommit, Op};
use super::{
    BoxFuture, Broker, BusError, DeadLetter, DeadLetters, Delivery,
    DeliveryTag, QueueDepth, Which,
};
use crate::envelope::Envelope;
use crate::sqlite::{Database, Migration, now_millis};

const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        description: "bus bindings, messages and dead letters",
        sql: include_str!("embedded_schema.sql"),
    },
    Migration {
        version: 2,
        description: "queues ordered by key",
        sql: "CREATE TABLE bus_ordered_queues (
                  queue TEXT PRIMARY KEY
              ) WITHOUT ROWID;
              CREATE INDEX bus_messages_key ON bus_messages (queue, subject, seq)
                  WHERE subject IS NOT NULL;",
    },
];

/// The messages of a queue that may be handed out: in an ordered queue,
/// only the first waiting message of each key (subject), so that the next
/// one waits while it is in flight or waiting for a retry. Messages
/// without a key are never held back.
const HEAD_OF_KEY: &str = "(m.subject IS NULL OR NOT EXISTS (
        SELECT 1 FROM bus_messages e
        WHERE e.queue = m.queue AND e.subject = m.subject AND e.seq < m.seq))";

/// Tuning of the embedded broker.
#[derive(Debug, Clone, Copy)]
pub struct EmbeddedOptions {
    /// How long a received message stays invisible to other consumers
    /// without a renewal. A consumer that dies holds its messages this long.
    pub lease: Duration,
    /// The longest a waiting consumer sleeps before looking again, for
    /// messages published by other processes.
    pub poll_interval: Duration,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions {
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(500),
        }
    }
}

/// The SQLite-backed broker. Cheap to clone; clones share one state.
#[derive(Debug, Clone)]
pub struct EmbeddedBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    db: Database,
    options: EmbeddedOptions,
    /// Bumped after every commit that adds messages, so that consumers in
    /// this process wake at once.
    published: watch::Sender<u64>,
    /// Lease ids of received batches still in flight, with how many of the
    /// batch's messages are unsettled. The renewal task keeps these alive.
    leases: Mutex<HashMap<i64, usize>>,
    /// Publishes and acknowledgements, committed in groups.
    writes: GroupCommit,
    /// Whether each queue looked at so far is ordered by key.
    ordered: Mutex<HashMap<String, bool>>,
}

impl EmbeddedBroker {
    /// Prepares the bus tables in `db` and starts renewing leases.
    pub async fn open(
        db: Database,
        options: EmbeddedOptions,
    ) -> Result<Self, BusError> {
        db.migrate("bus", MIGRATIONS).await?;
        let published = watch::Sender::new(0u64);
        let wake = published.clone();
        let writes = GroupCommit::start(db.clone(), move || {
            wake.send_modify(|n| *n = n.wrapping_add(1));
        });
        let inner = Arc::new(Inner {
            db,
            options,
            published,
            leases: Mutex::new(HashMap::new()),
            writes,
            ordered: Mutex::new(HashMap::new()),
        });
        tokio::spawn(renew_leases(Arc::downgrade(&inner)));
        Ok(EmbeddedBroker { inner })
    }

    pub fn database(&self) -> &Database {
        &self.inner.db
    }

    /// Writes `envelope` to the queues bound to its type, inside the
    /// caller's transaction: the event exists if and only if that
    /// transaction commits. Call [`wake`](Self::wake) after the commit.
    pub async fn stage(
        tx: &mut SqliteConnection,
        envelope: &Envelope,
    ) -> Result<(), BusError> {
        let inserted = sqlx::query(
            "INSERT INTO bus_messages (queue, event_id, event_type, source,
                 subject, time, content_type, traceparent, payload,
                 available_at)
             SELECT queue, ?, ?, ?, ?, ?, ?, ?, ?, ?
             FROM bus_bindings WHERE event_type = ?",
        )
        .bind(envelope.id.to_string())
        .bind(&envelope.event_type)
        .bind(&envelope.source)
        .bind(&envelope.subject)
        .bind(envelope.time.to_rfc3339())
        .bind(&envelope.content_type)
        .bind(envelope.traceparent.map(|t| t.to_string()))
        .bind(&envelope.data)
        .bind(now_millis())
        .bind(&envelope.event_type)
        .execute(&mut *tx)
        .await?
        .rows_affected();

        if inserted == 0 {
            return Err(BusError::Unroutable {
                event_type: envelope.event_type.clone(),
            });
        }
        Ok(())
    }

    /// Wakes this process's consumers after new messages were committed.
    pub fn wake(&self) {
        self.inner.published.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Messages waiting or in flight in `queue`.
    pub async fn depth(&self, queue: &str) -> Result<u64, BusError> {
        let count: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM bus_messages WHERE queue = ?",
        )
        .bind(queue)
        .fetch_one(self.inner.db.reader())
        .await?;
        Ok(count as u64)
    }

    /// The dead letters of `queue`, oldest first.
    pub async fn dead_letters(
        &self,
        queue: &str,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let rows = sqlx::query(
            "SELECT * FROM bus_dead_letters WHERE queue = ? ORDER BY id",
        )
        .bind(queue)
        .fetch_all(self.inner.db.reader())
        .await?;
        rows.iter().map(dead_letter_from_row).collect()
    }

    /// Moves dead letters of `queue` back onto it, ready now, their attempt
    /// count reset, and wakes this process's consumers (others find them
    /// at their next poll).
    async fn replay_dead(
        &self,
        queue: &str,
        which: Which,
    ) -> Result<usize, BusError> {
        let (all, id) = which_params(which);
        let mut tx = self.inner.db.begin().await?;
        let replayed = sqlx::query(
            "INSERT INTO bus_messages (queue, event_id, event_type, source,
                 subject, time, content_type, traceparent, payload,
                 available_at)
             SELECT queue, event_id, event_type, source, subject, time,
                 content_type, traceparent, payload, ?4
             FROM bus_dead_letters
             WHERE queue = ?1 AND (?2 OR event_id = ?3)
             ORDER BY id",
        )
        .bind(queue)
        .bind(all)
        .bind(&id)
        .bind(now_millis())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query(
            "DELETE FROM bus_dead_letters
             WHERE queue = ?1 AND (?2 OR event_id = ?3)",
        )
        .bind(queue)
        .bind(all)
        .bind(&id)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.wake();
        Ok(replayed as usize)
    }

    async fn purge_dead(
        &self,
        queue: &str,
        which: Which,
    ) -> Result<usize, BusError> {
        let (all, id) = which_params(which);
        let purged = sqlx::query(
            "DELETE FROM bus_dead_letters
             WHERE queue = ?1 AND (?2 OR event_id = ?3)",
        )
        .bind(queue)
        .bind(all)
        .bind(&id)
        .execute(self.inner.db.writer())
        .await?
        .rows_affected();
        Ok(purged as usize)
    }

    /// Leases up to `max` ready messages of `queue`.
    async fn claim(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Delivery>, BusError> {
        let lease = fastrand::i64(1..);
        let now = now_millis();
        let lease_end = after(now, self.inner.options.lease);
        let held_back = self.held_back_by_key(queue).await?;
        let claim = format!(
            "UPDATE bus_messages
             SET attempts = attempts + 1, lease = ?1, available_at = ?2
             WHERE seq IN (
                 SELECT seq FROM bus_messages m
                 WHERE queue = ?3 AND available_at <= ?4 AND {held_back}
                 ORDER BY available_at, seq LIMIT ?5)
             RETURNING *"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(claim))
            .bind(lease)
            .bind(lease_end)
            .bind(queue)
            .bind(now)
            .bind(max as i64)
            .fetch_all(self.inner.db.writer())
            .await?;
        if rows.is_empty() {
            return Ok(Vec::new());
        }

        self.inner.leases.lock().unwrap().insert(lease, rows.len());
        let mut deliveries = rows
            .iter()
            .map(delivery_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        deliveries.sort_by_key(|d| d.tag.seq);
        Ok(deliveries)
    }

    /// When the next message of `queue` becomes ready, if any is there.
    async fn next_ready_at(
        &self,
        queue: &str,
    ) -> Result<Option<i64>, BusError> {
        let held_back = self.held_back_by_key(queue).await?;
        let next = format!(
            "SELECT MIN(available_at) FROM bus_messages m
             WHERE queue = ? AND {held_back}"
        );
        let at = sqlx::query_scalar(sqlx::AssertSqlSafe(next))
            .bind(queue)
            .fetch_one(self.inner.db.reader())
            .await?;
        Ok(at)
    }

    async fn wait_and_claim(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Delivery>, BusError> {
        let poll = self.inner.options.poll_interval;
        loop {
            // Subscribe before looking, so a publish between the look and
            // the wait still wakes us.
            let mut published = self.inner.published.subscribe();
            let batch = self.claim(queue, max).await?;
            if !batch.is_empty() {
                return Ok(batch);
            }

            let wait = match self.next_ready_at(queue).await? {
                Some(at) => Duration::from_millis(
                    at.saturating_sub(now_millis()).max(1) as u64,
                )
                .min(poll),
                None => poll,
            };
            tokio::select! {
                _ = published.changed() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The SQL condition that holds messages back in `queue`: by key when
    /// the queue is ordered, none otherwise.
    async fn held_back_by_key(
        &self,
        queue: &str,
    ) -> Result<&'static str, BusError> {
        let known = self.inner.ordered.lock().unwrap().get(queue).copied();
        let ordered = match known {
            Some(ordered) => ordered,
            None => {
                let found: Option<String> = sqlx::query_scalar(
                    "SELECT queue FROM bus_ordered_queues WHERE queue = ?",
                )
                .bind(queue)
                .fetch_optional(self.inner.db.reader())
                .await?;
                let mut ordered = self.inner.ordered.lock().unwrap();
                ordered.insert(queue.to_owned(), found.is_some());
                found.is_some()
            }
        };
        Ok(if ordered { HEAD_OF_KEY } else { "1" })
    }

    /// Forgets a settled delivery, so that its lease is no longer renewed.
    fn settled(&self, delivery: &Delivery) {
        let mut leases = self.inner.leases.lock().unwrap();
        if let Some(left) = leases.get_mut(&delivery.tag.lease) {
            *left -= 1;
            if *left == 0 {
                leases.remove(&delivery.tag.lease);
            }
        }
    }

    fn lost(delivery: &Delivery) -> BusError {
        BusError::LeaseLost {
            seq: delivery.tag.seq,
        }
    }

    async fn update_held(
        &self,
        delivery: &Delivery,
        available_at: i64,
        attempts_delta: i64,
        error: Option<&str>,
    ) -> Result<(), BusError> {
        let updated = sqlx::query(
            "UPDATE bus_messages
             SET available_at = ?3, lease = NULL,
                 attempts = attempts + ?4,
                 last_error = COALESCE(?5, last_error),
                 first_failed_at = CASE WHEN ?5 IS NULL THEN first_failed_at
                     ELSE COALESCE(first_failed_at, ?6) END
             WHERE seq = ?1 AND lease = ?2",
        )
        .bind(delivery.tag.seq)
        .bind(delivery.tag.lease)
        .bind(available_at)
        .bind(attempts_delta)
        .bind(error)
        .bind(now_millis())
        .execute(self.inner.db.writer())
        .await?
        .rows_affected();
        self.settled(delivery);
        if updated == 0 {
            return Err(Self::lost(delivery));
        }
        self.wake();
        Ok(())
    }
}

impl Broker for EmbeddedBroker {
    fn bind<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let mut tx = self.inner.db.begin().await?;
            for event_type in event_types {
                sqlx::query(
                    "INSERT INTO bus_bindings (queue, event_type)
                     VALUES (?, ?) ON CONFLICT DO NOTHING",
                )
                .bind(queue)
                .bind(event_type)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn bind_ordered<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.bind(queue, event_types).await?;
            sqlx::query(
                "INSERT INTO bus_ordered_queues (queue) VALUES (?)
                 ON CONFLICT DO NOTHING",
            )
            .bind(queue)
            .execute(self.inner.db.writer())
            .await?;
            let mut ordered = self.inner.ordered.lock().unwrap();
            ordered.insert(queue.to_owned(), true);
            Ok(())
        })
    }

    /// A retried event stays the first of its key, holding the rest back.
    fn keeps_order_across_retries(&self) -> bool {
        true
    }

    fn publish<'a>(
        &'a self,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.inner.writes.run(Op::Publish(envelope.clone())).await?;
            crate::metrics::published(&envelope.event_type);
            Ok(())
        })
    }

    fn receive<'a>(
        &'a self,
        queue: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BusError>> {
        Box::pin(self.wait_and_claim(queue, max.max(1)))
    }

    fn ack<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let acked = self.inner.writes.run(Op::Ack(delivery.tag)).await;
            self.settled(delivery);
            acked
        })
    }

    fn retry<'a>(
        &'a self,
        delivery: &'a Delivery,
        delay: Duration,
        error: &'a str,
    ) -> BoxFuture<'a, Result<Duration, BusError>> {
        let at = after(now_millis(), delay);
        Box::pin(async move {
            self.update_held(delivery, at, 0, Some(error)).await?;
            Ok(delay)
        })
    }

    fn release<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(self.update_held(delivery, now_millis(), -1, None))
    }

    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let mut tx = self.inner.db.begin().await?;
            let moved = sqlx::query(
                "INSERT INTO bus_dead_letters (queue, event_id, event_type,
                     source, subject, time, content_type, traceparent,
                     payload, attempts, reason, first_failed_at, dead_at)
                 SELECT queue, event_id, event_type, source, subject, time,
                     content_type, traceparent, payload, attempts, ?3,
                     COALESCE(first_failed_at, ?4), ?4
                 FROM bus_messages WHERE seq = ?1 AND lease = ?2",
            )
            .bind(delivery.tag.seq)
            .bind(delivery.tag.lease)
            .bind(reason)
            .bind(now_millis())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            sqlx::query("DELETE FROM bus_messages WHERE seq = ? AND lease = ?")
                .bind(delivery.tag.seq)
                .bind(delivery.tag.lease)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            self.settled(delivery);
            if moved == 0 {
                return Err(Self::lost(delivery));
            }
            Ok(())
        })
    }

    fn is_ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(self.inner.db.is_usable())
    }

    fn queue_depth<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<QueueDepth, BusError>> {
        Box::pin(async move {
            let (waiting, oldest): (i64, Option<String>) = sqlx::query_as(
                "SELECT COUNT(*), MIN(time) FROM bus_messages
                 WHERE queue = ? AND lease IS NULL",
            )
            .bind(queue)
            .fetch_one(self.inner.db.reader())
            .await?;
            let oldest = oldest
                .and_then(|time| DateTime::parse_from_rfc3339(&time).ok())
                .map(|time| crate::metrics::since(time.to_utc()))
                .or((waiting == 0).then_some(Duration::ZERO));
            Ok(QueueDepth {
                waiting: u64::try_from(waiting).unwrap_or_default(),
                oldest,
            })
        })
    }
}

/// Keeps the leases of in-flight messages alive, a third of a lease at a
/// time, until the broker is dropped.
async fn renew_leases(inner: Weak<Inner>) {
    let period = match inner.upgrade() {
        Some(inner) => inner.options.lease / 3,
        None => return,
    };
    let mut ticks = tokio::time::interval(period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = inner.upgrade() else { return };
        let held: Vec<i64> =
            inner.leases.lock().unwrap().keys().copied().collect();
        if held.is_empty() {
            continue;
        }

        let lease_end = after(now_millis(), inner.options.lease);
        let renewed = sqlx::query(
            "UPDATE bus_messages SET available_at = ?
             WHERE lease IN (SELECT value FROM json_each(?))",
        )
        .bind(lease_end)
        .bind(serde_json::to_string(&held).expect("ids serialise"))
        .execute(inner.db.writer())
        .await;
        if let Err(error) = renewed {
            tracing::warn!(
                error = %error,
                "could not renew leases; in-flight messages may be \
                 delivered again"
            );
        }
    }
}

/// `duration` after the time `millis`, saturating rather than wrapping.
fn after(millis: i64, duration: Duration) -> i64 {
    let duration = i64::try_from(duration.as_millis()).unwrap_or(i64::MAX);
    millis.saturating_add(duration)
}

fn delivery_from_row(row: &SqliteRow) -> Result<Delivery, BusError> {
    let attempts: i64 = row.try_get("attempts")?;
    Ok(Delivery {
        envelope: crate::db::envelope_from_row(row)?,
        queue: row.try_get("queue")?,
        attempt: u32::try_from(attempts).unwrap_or(u32::MAX),
        tag: DeliveryTag {
            seq: row.try_get("seq")?,
            lease: row.try_get("lease")?,
            first_failed_at: None,
        },
    })
}

fn dead_letter_from_row(row: &SqliteRow) -> Result<DeadLetter, BusError> {
    let attempts: i64 = row.try_get("attempts")?;
    let time = |column| -> Result<_, BusError> {
        let millis: i64 = row.try_get(column)?;
        Ok(DateTime::from_timestamp_millis(millis).unwrap_or_default())
    };
    Ok(DeadLetter {
        envelope: crate::db::envelope_from_row(row)?,
        queue: row.try_get("queue")?,
        attempts: u32::try_from(attempts).unwrap_or(u32::MAX),
        reason: row.try_get("reason")?,
        first_failed_at: time("first_failed_at")?,
        dead_at: time("dead_at")?,
        headers: Vec::new(),
    })
}

/// `which` as SQL parameters: whether all rows match, else which event id.
fn which_params(which: Which) -> (bool, String) {
    match which {
        Which::All => (true, String::new()),
        Which::One(id) => (false, id.to_string()),
    }
}

impl DeadLetters for EmbeddedBroker {
    fn list<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>> {
        Box::pin(self.dead_letters(queue))
    }

    fn replay<'a>(
        &'a self,
        queue: &'a str,
        which: Which,
    ) -> BoxFuture<'a, Result<usize, BusError>> {
        Box::pin(self.replay_dead(queue, which))
    }

    fn purge<'a>(
        &'a self,
        queue: &'a str,
        which: Which,
    ) -> BoxFuture<'a, Result<usize, BusError>> {
        Box::pin(self.purge_dead(queue, which))
    }
}
