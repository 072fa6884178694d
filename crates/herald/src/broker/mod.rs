//! The broker: where events wait between their producer and their
//! consumers.
//!
//! A producer publishes an [`Envelope`]; the broker copies it into every
//! queue bound to its type. A consumer receives [`Delivery`]s from one
//! queue and settles each one exactly once: acknowledged (done, gone),
//! retried (back to the queue after a delay) or dead-lettered (set aside
//! with the reason, for a person to look at).
//!
//! Every backend gives the same promises: publish is durable when it
//! returns; delivery is at least once, so work held by a consumer that dies
//! comes back; a delivery's attempt count survives crashes.

pub mod amqp;
pub mod embedded;
mod group_commit;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::envelope::Envelope;

/// A boxed future, so that brokers can be chosen at run time.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A message handed to a consumer, to be settled by it.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub envelope: Envelope,
    pub queue: String,
    /// 1 on the first delivery, counted by the broker, so that a consumer
    /// crashing does not reset it.
    pub attempt: u32,
    /// The broker's handle on this delivery.
    pub(crate) tag: DeliveryTag,
}

/// Identifies one delivery to the broker that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct DeliveryTag {
    pub(crate) seq: i64,
    pub(crate) lease: i64,
    /// When the message first failed (Unix ms), where the broker keeps it
    /// in the message rather than in a table.
    pub(crate) first_failed_at: Option<i64>,
}

/// A message set aside after it could not be handled.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub envelope: Envelope,
    /// The queue it was taken from, and goes back to when replayed.
    pub queue: String,
    pub attempts: u32,
    /// Why it was set aside: the last error.
    pub reason: String,
    pub first_failed_at: DateTime<Utc>,
    pub dead_at: DateTime<Utc>,
    /// What else the message carried, as text, where the backend keeps
    /// more than the envelope (RabbitMQ: headers and properties).
    pub headers: Vec<(String, String)>,
}

/// Which dead letters of a queue an operation is for: one, by its event
/// id, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    One(uuid::Uuid),
    All,
}

impl Which {
    pub fn includes(&self, event_id: uuid::Uuid) -> bool {
        match self {
            Which::One(id) => *id == event_id,
            Which::All => true,
        }
    }
}

/// The dead letters a backend keeps, for people to look at, send back to
/// their queue, or throw away (`herald dlq`).
pub trait DeadLetters: Send + Sync {
    /// The dead letters of `queue`, oldest first.
    fn list<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>>;

    /// Puts dead letters back on `queue` with a fresh attempt count, to be
    /// delivered at once; returns how many.
    fn replay<'a>(
        &'a self,
        queue: &'a str,
        which: Which,
    ) -> BoxFuture<'a, Result<usize, BusError>>;

    /// Deletes dead letters for good; returns how many.
    fn purge<'a>(
        &'a self,
        queue: &'a str,
        which: Which,
    ) -> BoxFuture<'a, Result<usize, BusError>>;
}

/// A backend of the bus.
pub trait Broker: Send + Sync + 'static {
    /// Makes sure `queue` exists and receives every event whose type is in
    /// `event_types`. Declaring the same binding again changes nothing.
    fn bind<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// Binds like [`bind`](Self::bind), and makes `queue` hand out the
    /// events of one key (their `subject`) one at a time, in publish order:
    /// the next event of a key waits while the one before it is in flight
    /// or waiting for a retry, and only events of that key wait. Events
    /// without a subject are not held back.
    fn bind_ordered<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// Whether a retried delivery of an ordered queue still comes before
    /// the later events of its key. When not, workers retry such events
    /// in place.
    fn keeps_order_across_retries(&self) -> bool {
        false
    }

    /// Stores `envelope` in every queue bound to its type. Returns once the
    /// event is durable; an event no queue is bound to is an error.
    fn publish<'a>(
        &'a self,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// Waits until `queue` has messages ready, then returns up to `max` of
    /// them. Dropping the future gives nothing up: messages are only taken
    /// when it completes.
    fn receive<'a>(
        &'a self,
        queue: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BusError>>;

    /// The delivery was handled: remove it.
    fn ack<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// The delivery failed for now: offer it again after `delay`.
    /// Returns the wait actually scheduled, which a backend may round.
    fn retry<'a>(
        &'a self,
        delivery: &'a Delivery,
        delay: Duration,
        error: &'a str,
    ) -> BoxFuture<'a, Result<Duration, BusError>>;

    /// The delivery was never handled (the consumer is stopping): offer it
    /// again at once, without counting the attempt.
    fn release<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// The delivery cannot be handled: move it to the dead letters with
    /// `reason`.
    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>>;

    /// Whether the broker can take and hand out messages now.
    fn is_ready(&self) -> BoxFuture<'_, bool>;

    /// How many messages wait in `queue` (not held by a consumer), and
    /// how long ago the oldest of them happened, when the backend can
    /// tell.
    fn queue_depth<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<QueueDepth, BusError>>;
}

/// A queue's waiting messages, as [`Broker::queue_depth`] sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueDepth {
    pub waiting: u64,
    /// Time since the oldest waiting event's own time, zero when none
    /// waits; `None` when the backend cannot tell (RabbitMQ cannot).
    pub oldest: Option<Duration>,
}

/// What can go wrong on the bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("no queue is bound to event type {event_type}")]
    Unroutable { event_type: String },
    #[error("message {seq} is no longer held by this consumer")]
    LeaseLost { seq: i64 },
    #[error("the bus database failed")]
    Database(#[from] sqlx::Error),
    #[error("the bus database failed")]
    Shared(#[source] std::sync::Arc<sqlx::Error>),
    #[error("the bus is shut down")]
    Closed,
    #[error("RabbitMQ failed")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not confirm the message")]
    Nacked,
    #[error("RabbitMQ did not answer in time to {what}")]
    Timeout { what: &'static str },
    #[error("a stored message is corrupt: {0}")]
    Corrupt(String),
}
