//! The RabbitMQ broker: the bus across machines, over AMQP 0.9.1.
//!
//! Topology, declared idempotently by [`Broker::bind`]:
//!
//! - `herald.events`: a durable topic exchange; events are published to it
//!   with their type as the routing key.
//! - One durable queue per subscribing service, bound by event type.
//! - `<queue>.dead`: the queue's dead letters, with the reason, the
//!   attempt count and the times of the first and the last failure in
//!   their headers (see [`dead_letters`] for `herald dlq`).
//! - `<queue>.retry.<N>s`: delay queues with a fixed message TTL that
//!   dead-letter back to `<queue>` when it runs out, doubling from 1 s to
//!   an hour. A retry waits in the tier nearest the delay it asks for
//!   (within a factor of 1.5), so no broker plugin is needed and a long
//!   delay never blocks a short one.
//!
//! Every message is persistent and every publish waits for the broker's
//! confirm; a nack, a return (nothing bound) or a timeout is an error. A
//! delivery is acknowledged only when settled, so the messages of a
//! consumer that dies return to the queue. The attempt count travels in
//! the `x-herald-attempts` header; a redelivered message counts the
//! attempt that was interrupted.
//!
//! An [`AmqpBroker`] is one connection: when it drops, operations fail
//! with an error (never a silent success) and [`Broker::is_ready`] turns
//! false. [`ReconnectingAmqp`] wraps it for services: it connects again on
//! the next operation and declares the topology anew.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_lite::StreamExt;

use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};

use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection,
    ConnectionProperties, Consumer, ExchangeKind,
};
use uuid::Uuid;

mod dead_letters;
mod ordered;

pub use ordered::PARTITIONS;

use super::{BoxFuture, Broker, BusError, Delivery, DeliveryTag, QueueDepth};
use crate::envelope::Envelope;
use crate::trace::TraceContext;

/// Deliveries from one queue, or from the partitions of an ordered one.
type Deliveries =
    futures_lite::stream::Boxed<Result<lapin::message::Delivery, lapin::Error>>;

/// The exchange every event is published to.
pub const EXCHANGE: &str = "herald.events";

/// Delay tiers of the retry queues, in seconds: doubling, so that any
/// wait up to the longest is kept within a factor of 1.5, and the
/// jitter of a backoff survives.
pub(crate) const RETRY_TIERS: [u64; 13] =
    [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 3600];

/// The tier nearest to `delay`, compared on a log scale: the longest tier
/// at most 1.5 times `delay` (the shortest when `delay` is shorter still).
fn retry_tier(delay: Duration) -> u64 {
    let limit = delay.as_secs_f64() * 1.5;
    RETRY_TIERS
        .iter()
        .copied()
        .take_while(|tier| *tier as f64 <= limit)
        .last()
        .unwrap_or(RETRY_TIERS[0])
}

pub(crate) const ATTEMPTS: &str = "x-herald-attempts";
pub(crate) const REASON: &str = "x-herald-reason";
/// When the message first failed, and when it was dead-lettered (Unix ms).
pub(crate) const FIRST_FAILED: &str = "x-herald-first-failed-at";
pub(crate) const DEAD_AT: &str = "x-herald-dead-at";
const SUBJECT: &str = "ce-subject";
const TIME: &str = "ce-time";
const TRACEPARENT: &str = "traceparent";

/// Tuning of the RabbitMQ broker.
#[derive(Debug, Clone, Copy)]
pub struct AmqpOptions {
    /// Deliveries a consumer holds unacknowledged at most.
    pub prefetch: u16,
    /// The longest any one broker operation may take: connecting, a
    /// declaration, a publish and its confirm, an acknowledgement.
    pub timeout: Duration,
}

impl Default for AmqpOptions {
    fn default() -> Self {
        AmqpOptions {
            prefetch: 64,
            timeout: Duration::from_secs(10),
        }
    }
}

/// A connection to RabbitMQ. Cheap to clone; clones share it.
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    /// A channel in confirm mode for everything this process publishes.
    publisher: Channel,
    options: AmqpOptions,
    /// One consumer per queue, created on the first receive.
    consumers: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Deliveries>>>>,
    /// The acker of each unsettled delivery, by the sequence number its
    /// [`DeliveryTag`] carries.
    held: Mutex<HashMap<i64, Acker>>,
    next_seq: AtomicI64,
    /// The queues bound in order by key (see [`ordered`]).
    ordered: Mutex<std::collections::HashSet<String>>,
}

impl std::fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("connected", &self.inner.connection.status().connected())
            .finish()
    }
}

impl AmqpBroker {
    /// Connects to `url` (`amqp://` or `amqps://`).
    pub async fn connect(
        url: &str,
        options: AmqpOptions,
    ) -> Result<Self, BusError> {
        let connect = Connection::connect(url, ConnectionProperties::default());
        let connection = within(options.timeout, "connect", connect).await?;
        let publisher = within(
            options.timeout,
            "open a channel",
            connection.create_channel(),
        )
        .await?;
        within(
            options.timeout,
            "enable publisher confirms",
            publisher.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        let broker = AmqpBroker {
            inner: Arc::new(Inner {
                connection,
                publisher,
                options,
                consumers: Mutex::new(HashMap::new()),
                held: Mutex::new(HashMap::new()),
                next_seq: AtomicI64::new(1),
                ordered: Mutex::new(std::collections::HashSet::new()),
            }),
        };
        // A publisher may come before any consumer has declared anything;
        // with the exchange there, its events are refused as unroutable
        // (and wait in its outbox) rather than closing its channel.
        broker.declare_exchange().await?;
        Ok(broker)
    }

    async fn declare_exchange(&self) -> Result<(), BusError> {
        within(
            self.timeout(),
            "declare the events exchange",
            self.inner.publisher.exchange_declare(
                EXCHANGE.into(),
                ExchangeKind::Topic,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await
    }

    fn timeout(&self) -> Duration {
        self.inner.options.timeout
    }

    /// Closes the connection; unsettled deliveries return to their queues.
    pub async fn close(&self) {
        let closing = self.inner.connection.close(200, "closing".into());
        let _ = tokio::time::timeout(self.timeout(), closing).await;
    }

    /// The name of `queue`'s dead-letter queue.
    pub fn dead_letter_queue(queue: &str) -> String {
        format!("{queue}.dead")
    }

    fn retry_queue(queue: &str, seconds: u64) -> String {
        format!("{queue}.retry.{seconds}s")
    }

    /// Deletes `queue` with the dead-letter and retry queues
    /// [`bind`](Broker::bind) declared for it, messages and all: for tests
    /// and tools that clean up.
    pub async fn delete(&self, queue: &str) -> Result<(), BusError> {
        let mut names = vec![queue.to_owned(), Self::dead_letter_queue(queue)];
        names.extend(RETRY_TIERS.iter().map(|s| Self::retry_queue(queue, *s)));
        for name in names {
            within(
                self.timeout(),
                "delete a queue",
                self.inner.publisher.queue_delete(
                    name.as_str().into(),
                    QueueDeleteOptions::default(),
                ),
            )
            .await?;
        }
        Ok(())
    }

    async fn declare(
        &self,
        queue: &str,
        event_types: &[&str],
    ) -> Result<(), BusError> {
        let channel = &self.inner.publisher;
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.declare_exchange().await?;

        within(
            self.timeout(),
            "declare a queue",
            channel.queue_declare(queue.into(), durable, FieldTable::default()),
        )
        .await?;
        for event_type in event_types {
            within(
                self.timeout(),
                "bind a queue",
                channel.queue_bind(
                    queue.into(),
                    EXCHANGE.into(),
                    (*event_type).into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }

        let dead = Self::dead_letter_queue(queue);
        within(
            self.timeout(),
            "declare a dead-letter queue",
            channel.queue_declare(dead.into(), durable, FieldTable::default()),
        )
        .await?;
        for seconds in RETRY_TIERS {
            let mut arguments = FieldTable::default();
            arguments.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(seconds as i64 * 1000),
            );
            arguments.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString("".into()),
            );
            arguments.insert(
                "x-dead-letter-routing-key".into(),
                AMQPValue::LongString(queue.into()),
            );
            within(
                self.timeout(),
                "declare a retry queue",
                channel.queue_declare(
                    Self::retry_queue(queue, seconds).into(),
                    durable,
                    arguments,
                ),
            )
            .await?;
        }
        Ok(())
    }

    /// Publishes persistently and waits for the broker's confirm.
    async fn publish_confirmed(
        &self,
        exchange: &str,
        routing_key: &str,
        envelope: &Envelope,
        headers: FieldTable,
    ) -> Result<(), BusError> {
        let properties = properties(envelope, headers);
        let confirmed = within(self.timeout(), "publish", async {
            let confirm = self
                .inner
                .publisher
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &envelope.data,
                    properties,
                )
                .await?;
            confirm.await
        })
        .await?;
        match confirmed {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BusError::Unroutable {
                event_type: envelope.event_type.clone(),
            }),
            Confirmation::Nack(_) => Err(BusError::Nacked),
            Confirmation::NotRequested => Err(BusError::Nacked),
        }
    }

    async fn consumer(
        &self,
        queue: &str,
    ) -> Result<Arc<tokio::sync::Mutex<Deliveries>>, BusError> {
        if let Some(consumer) = self.inner.consumers.lock().unwrap().get(queue)
        {
            return Ok(consumer.clone());
        }
        let channel = within(
            self.timeout(),
            "open a channel",
            self.inner.connection.create_channel(),
        )
        .await?;
        within(
            self.timeout(),
            "set the prefetch",
            channel.basic_qos(
                self.inner.options.prefetch,
                BasicQosOptions::default(),
            ),
        )
        .await?;
        // An ordered queue is consumed through its partitions, starting at
        // a random one so that processes subscribing together tend to
        // become active on different partitions.
        let mut sources = vec![queue.to_owned()];
        if self.inner.ordered.lock().unwrap().contains(queue) {
            sources = Self::partitions_of(queue);
            let start = fastrand::usize(..sources.len());
            sources.rotate_left(start);
        }
        let mut merged: Option<Deliveries> = None;
        for source in &sources {
            let tag = format!("herald-{source}-{}", Uuid::new_v4().simple());
            let consumer: Consumer = within(
                self.timeout(),
                "start consuming",
                channel.basic_consume(
                    source.as_str().into(),
                    tag.into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
            merged = Some(match merged {
                None => consumer.boxed(),
                Some(others) => others.or(consumer).boxed(),
            });
        }
        let consumer = merged.expect("a queue has at least one source");
        let consumer = Arc::new(tokio::sync::Mutex::new(consumer));
        self.inner
            .consumers
            .lock()
            .unwrap()
            .insert(queue.to_owned(), consumer.clone());
        Ok(consumer)
    }

    async fn next_batch(
        &self,
        queue: &str,
        max: usize,
    ) -> Result<Vec<Delivery>, BusError> {
        let consumer = self.consumer(queue).await?;
        let mut consumer = consumer.lock().await;
        let mut batch = Vec::new();
        while batch.len() < max {
            // Wait for the first delivery; take the rest only if ready.
            let next = if batch.is_empty() {
                consumer.next().await
            } else {
                match futures_lite::future::poll_once(consumer.next()).await {
                    Some(next) => next,
                    None => break,
                }
            };
            let delivery = match next {
                Some(delivery) => delivery?,
                None => return Err(BusError::Closed),
            };
            if let Some(delivery) = self.accept(queue, delivery).await? {
                batch.push(delivery);
            }
        }
        Ok(batch)
    }

    /// Turns an AMQP delivery into a [`Delivery`]; one that is not a herald
    /// event is dead-lettered at once with the reason, and `None` returned.
    async fn accept(
        &self,
        queue: &str,
        delivery: lapin::message::Delivery,
    ) -> Result<Option<Delivery>, BusError> {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let attempts = header_u32(&headers, ATTEMPTS).unwrap_or(0);
        let attempt = attempts + 1 + u32::from(delivery.redelivered);
        match envelope_of(&delivery) {
            Ok(envelope) => {
                let seq = self.inner.next_seq.fetch_add(1, Ordering::Relaxed);
                self.inner.held.lock().unwrap().insert(seq, delivery.acker);
                Ok(Some(Delivery {
                    envelope,
                    queue: queue.to_owned(),
                    attempt,
                    tag: DeliveryTag {
                        seq,
                        lease: 0,
                        first_failed_at: header_i64(&headers, FIRST_FAILED),
                    },
                }))
            }
            Err(reason) => {
                tracing::warn!(
                    queue,
                    reason,
                    "not a herald event; dead-lettered"
                );
                let mut headers = headers;
                headers.insert(
                    REASON.into(),
                    AMQPValue::LongString(reason.into()),
                );
                headers.insert(ATTEMPTS.into(), AMQPValue::LongUInt(attempt));
                let now = AMQPValue::LongLongInt(crate::sqlite::now_millis());
                headers.insert(FIRST_FAILED.into(), now.clone());
                headers.insert(DEAD_AT.into(), now);
                let properties =
                    delivery.properties.clone().with_headers(headers);
                let dead = Self::dead_letter_queue(queue);
                let confirm = within(self.timeout(), "dead-letter", async {
                    self.inner
                        .publisher
                        .basic_publish(
                            "".into(),
                            dead.as_str().into(),
                            BasicPublishOptions::default(),
                            &delivery.data,
                            properties,
                        )
                        .await?
                        .await
                })
                .await?;
                if !confirm.is_ack() {
                    return Err(BusError::Nacked);
                }
                within(
                    self.timeout(),
                    "acknowledge",
                    delivery.acker.ack(BasicAckOptions::default()),
                )
                .await?;
                Ok(None)
            }
        }
    }

    fn take_acker(&self, delivery: &Delivery) -> Result<Acker, BusError> {
        self.inner
            .held
            .lock()
            .unwrap()
            .remove(&delivery.tag.seq)
            .ok_or(BusError::LeaseLost {
                seq: delivery.tag.seq,
            })
    }

    async fn ack_with(&self, acker: Acker) -> Result<(), BusError> {
        within(
            self.timeout(),
            "acknowledge",
            acker.ack(BasicAckOptions::default()),
        )
        .await?;
        Ok(())
    }

    /// Moves a delivery elsewhere (a retry or dead-letter queue) with
    /// `headers`, then acknowledges the original. A crash in between
    /// leaves both: at least once, never lost.
    async fn move_to(
        &self,
        delivery: &Delivery,
        target: &str,
        headers: FieldTable,
    ) -> Result<(), BusError> {
        let acker = self.take_acker(delivery)?;
        let moved = self
            .publish_confirmed("", target, &delivery.envelope, headers)
            .await;
        if let Err(error) = moved {
            // Hand it back rather than lose it.
            let _ = acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await;
            return Err(error);
        }
        self.ack_with(acker).await
    }
}

impl Broker for AmqpBroker {
    fn bind<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(self.declare(queue, event_types))
    }

    fn bind_ordered<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(self.declare_ordered(queue, event_types))
    }

    fn publish<'a>(
        &'a self,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let headers = FieldTable::default();
            let routing_key = envelope.event_type.as_str();
            self.publish_confirmed(EXCHANGE, routing_key, envelope, headers)
                .await?;
            crate::metrics::published(&envelope.event_type);
            Ok(())
        })
    }

    fn receive<'a>(
        &'a self,
        queue: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BusError>> {
        Box::pin(self.next_batch(queue, max.max(1)))
    }

    fn ack<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let acker = self.take_acker(delivery)?;
            self.ack_with(acker).await
        })
    }

    fn retry<'a>(
        &'a self,
        delivery: &'a Delivery,
        delay: Duration,
        error: &'a str,
    ) -> BoxFuture<'a, Result<Duration, BusError>> {
        let tier = retry_tier(delay);
        let target = Self::retry_queue(&delivery.queue, tier);
        let headers = failure_headers(delivery, error);
        Box::pin(async move {
            self.move_to(delivery, &target, headers).await?;
            Ok(Duration::from_secs(tier))
        })
    }

    fn release<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            let ordered =
                self.inner.ordered.lock().unwrap().contains(&delivery.queue);
            if !ordered {
                // Back to the end of its queue with the attempt uncounted:
                // a requeue would mark it redelivered, which counts one.
                let mut headers = FieldTable::default();
                let attempts = delivery.attempt.saturating_sub(1);
                headers.insert(ATTEMPTS.into(), AMQPValue::LongUInt(attempts));
                if let Some(first) = delivery.tag.first_failed_at {
                    headers.insert(
                        FIRST_FAILED.into(),
                        AMQPValue::LongLongInt(first),
                    );
                }
                return self.move_to(delivery, &delivery.queue, headers).await;
            }
            // An ordered event must keep its place before the later events
            // of its key: requeue it, though that counts an attempt.
            let acker = self.take_acker(delivery)?;
            let requeue = BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            };
            within(self.timeout(), "release", acker.nack(requeue)).await?;
            Ok(())
        })
    }

    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        let target = Self::dead_letter_queue(&delivery.queue);
        let mut headers = failure_headers(delivery, reason);
        let now = crate::sqlite::now_millis();
        headers.insert(DEAD_AT.into(), AMQPValue::LongLongInt(now));
        Box::pin(async move { self.move_to(delivery, &target, headers).await })
    }

    fn is_ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(std::future::ready(self.is_connected()))
    }

    fn queue_depth<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<QueueDepth, BusError>> {
        Box::pin(self.count_waiting(queue))
    }
}

/// Runs a broker operation under the timeout every network call has.
pub(crate) async fn within<T>(
    limit: Duration,
    what: &'static str,
    operation: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, BusError> {
    match tokio::time::timeout(limit, operation).await {
        Ok(outcome) => Ok(outcome?),
        Err(_) => Err(BusError::Timeout { what }),
    }
}

/// The AMQP properties that carry an envelope's attributes.
fn properties(envelope: &Envelope, mut headers: FieldTable) -> BasicProperties {
    if let Some(subject) = &envelope.subject {
        headers.insert(
            SUBJECT.into(),
            AMQPValue::LongString(subject.as_str().into()),
        );
    }
    headers.insert(
        TIME.into(),
        AMQPValue::LongString(envelope.time.to_rfc3339().into()),
    );
    let slot = ordered::slot_of(envelope).to_string();
    headers.insert(ordered::SLOT.into(), AMQPValue::LongString(slot.into()));
    if let Some(trace) = envelope.traceparent {
        headers.insert(
            TRACEPARENT.into(),
            AMQPValue::LongString(trace.to_string().into()),
        );
    }
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(envelope.id.to_string().into())
        .with_type(envelope.event_type.as_str().into())
        .with_app_id(envelope.source.as_str().into())
        .with_content_type(envelope.content_type.as_str().into())
        .with_timestamp(envelope.time.timestamp().max(0) as u64)
        .with_headers(headers)
}

/// Reads an envelope back from a delivery, or says what is missing.
fn envelope_of(
    delivery: &lapin::message::Delivery,
) -> Result<Envelope, String> {
    let properties = &delivery.properties;
    let headers = properties.headers().clone().unwrap_or_default();
    let text = |value: &Option<ShortString>, what: &str| {
        value
            .as_ref()
            .map(|v| v.as_str().to_owned())
            .ok_or_else(|| format!("the message has no {what}"))
    };
    let id = text(properties.message_id(), "message_id (the event id)")?;
    let time = header_text(&headers, TIME)
        .ok_or_else(|| format!("the message has no {TIME} header"))?;
    Ok(Envelope {
        id: Uuid::parse_str(&id)
            .map_err(|_| "message_id is not a UUID".to_owned())?,
        source: text(properties.app_id(), "app_id (the event source)")?,
        event_type: text(properties.kind(), "type (the event type)")?,
        subject: header_text(&headers, SUBJECT),
        time: DateTime::parse_from_rfc3339(&time)
            .map_err(|e| format!("{TIME} {time:?} is not RFC 3339: {e}"))?
            .with_timezone(&Utc),
        content_type: text(properties.content_type(), "content_type")?,
        traceparent: header_text(&headers, TRACEPARENT)
            .as_deref()
            .and_then(TraceContext::parse),
        data: delivery.data.clone(),
    })
}

fn header_text(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(text) => {
            Some(String::from_utf8_lossy(text.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(text) => Some(text.as_str().to_owned()),
        _ => None,
    }
}

/// The headers a failed delivery carries on: its attempt count, the
/// error, and when it first failed.
fn failure_headers(delivery: &Delivery, error: &str) -> FieldTable {
    let first_failed = delivery
        .tag
        .first_failed_at
        .unwrap_or_else(crate::sqlite::now_millis);
    let mut headers = FieldTable::default();
    headers.insert(ATTEMPTS.into(), AMQPValue::LongUInt(delivery.attempt));
    headers.insert(REASON.into(), AMQPValue::LongString(error.into()));
    headers.insert(FIRST_FAILED.into(), AMQPValue::LongLongInt(first_failed));
    headers
}

fn header_i64(headers: &FieldTable, name: &str) -> Option<i64> {
    match headers.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

fn header_u32(headers: &FieldTable, name: &str) -> Option<u32> {
    match headers.inner().get(name)? {
        AMQPValue::LongUInt(n) => Some(*n),
        AMQPValue::LongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::LongLongInt(n) => u32::try_from(*n).ok(),
        AMQPValue::ShortUInt(n) => Some(u32::from(*n)),
        AMQPValue::ShortInt(n) => u32::try_from(*n).ok(),
        _ => None,
    }
}

/// An [`AmqpBroker`] that reconnects: it connects on first use, and when
/// the connection is found dropped, the next operation connects again and
/// declares every binding made so far before going on. Deliveries taken on
/// a connection that dropped can no longer be settled (RabbitMQ hands them
/// out again), so settling one fails with [`BusError::LeaseLost`].
///
/// Callers drive the retries: a worker that fails to receive waits a
/// moment and asks again; a relay that fails to publish backs off.
#[derive(Clone)]
pub struct ReconnectingAmqp {
    inner: Arc<Supervisor>,
}

struct Supervisor {
    /// Whether a task keeps the connection up (see
    /// [`ReconnectingAmqp::connect`]).
    kept: std::sync::atomic::AtomicBool,
    url: String,
    options: AmqpOptions,
    current: tokio::sync::RwLock<Option<AmqpBroker>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    /// Every binding declared, to declare again after a reconnect.
    /// Every binding made so far: queue, event types, and whether ordered.
    bindings: Mutex<Vec<(String, Vec<String>, bool)>>,
}

impl std::fmt::Debug for ReconnectingAmqp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReconnectingAmqp")
            .field("url", &crate::redact_credentials(&self.inner.url))
            .finish()
    }
}

impl ReconnectingAmqp {
    /// Prepares to connect to `url`; nothing is sent until first use.
    pub fn new(url: &str, options: AmqpOptions) -> Self {
        ReconnectingAmqp {
            inner: Arc::new(Supervisor {
                kept: std::sync::atomic::AtomicBool::new(false),
                url: url.to_owned(),
                options,
                current: tokio::sync::RwLock::new(None),
                connecting: tokio::sync::Mutex::new(()),
                bindings: Mutex::new(Vec::new()),
            }),
        }
    }

    /// The live connection, made anew if there is none.
    async fn broker(&self) -> Result<AmqpBroker, BusError> {
        if let Some(broker) = self.live().await {
            return Ok(broker);
        }
        let _one_at_a_time = self.inner.connecting.lock().await;
        if let Some(broker) = self.live().await {
            return Ok(broker);
        }

        let broker = AmqpBroker::connect(&self.inner.url, self.inner.options)
            .await
            .inspect_err(|error| {
                tracing::warn!(
                    error = %crate::error_chain(error),
                    "cannot reach RabbitMQ"
                );
            })?;
        let bindings = self.inner.bindings.lock().unwrap().clone();
        for (queue, types, ordered) in &bindings {
            let types: Vec<&str> = types.iter().map(String::as_str).collect();
            if *ordered {
                broker.declare_ordered(queue, &types).await?;
            } else {
                broker.declare(queue, &types).await?;
            }
        }
        tracing::info!(
            url = %crate::redact_credentials(&self.inner.url),
            "connected to RabbitMQ"
        );
        let previous = self.inner.current.write().await.replace(broker.clone());
        crate::metrics::broker_connected("amqp", true);
        if previous.is_some() {
            crate::metrics::broker_reconnected("amqp");
        }
        Ok(broker)
    }

    /// Notes a binding, to declare again on every new connection.
    fn remember(&self, queue: &str, event_types: &[&str], ordered: bool) {
        let mut bindings = self.inner.bindings.lock().unwrap();
        let types = event_types.iter().map(|t| t.to_string()).collect();
        let binding = (queue.to_owned(), types, ordered);
        if !bindings.contains(&binding) {
            bindings.push(binding);
        }
    }

    /// Connects now rather than on first use, so that readiness tells
    /// the truth from the start, and keeps connected from then on: a
    /// lost connection is made again within [`KEEP_CONNECTED_PERIOD`],
    /// even by a process with nothing to send or receive, so that its
    /// readiness and metrics do not report an outage long over.
    pub async fn connect(&self) -> Result<(), BusError> {
        if !self.inner.kept.swap(true, Ordering::Relaxed) {
            tokio::spawn(keep_connected(Arc::downgrade(&self.inner)));
        }
        self.broker().await.map(drop)
    }

    async fn live(&self) -> Option<AmqpBroker> {
        let current = self.inner.current.read().await;
        let live = current.as_ref().filter(|b| b.is_connected()).cloned();
        if live.is_none() {
            crate::metrics::broker_connected("amqp", false);
        }
        live
    }

    /// The connection deliveries are settled on: the live one, if any.
    async fn settling(&self) -> Result<AmqpBroker, BusError> {
        self.live().await.ok_or(BusError::Closed)
    }
}

/// How often a kept connection is checked, and made again if lost.
const KEEP_CONNECTED_PERIOD: Duration = Duration::from_secs(5);

/// Checks the supervisor's connection every [`KEEP_CONNECTED_PERIOD`] and
/// connects again when it is gone, until the supervisor is dropped.
async fn keep_connected(supervisor: std::sync::Weak<Supervisor>) {
    let mut ticks = tokio::time::interval(KEEP_CONNECTED_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(inner) = supervisor.upgrade() else {
            return;
        };
        // A failure is logged by the attempt; the next tick tries again.
        let _ = ReconnectingAmqp { inner }.broker().await;
    }
}

impl AmqpBroker {
    /// The ready messages of `queue`, or of its partitions when it is
    /// ordered, counted by declaring each passively on a channel of its
    /// own (a queue that does not exist closes the channel it is asked
    /// on, and lapin logs that as an error). RabbitMQ does not say over
    /// AMQP how old its messages are.
    async fn count_waiting(&self, queue: &str) -> Result<QueueDepth, BusError> {
        let mut waiting = 0;
        let ordered = self.inner.ordered.lock().unwrap().contains(queue);
        let names = if ordered {
            Self::partitions_of(queue)
        } else {
            vec![queue.to_owned()]
        };
        for name in names {
            let channel = within(
                self.timeout(),
                "open a channel",
                self.inner.connection.create_channel(),
            )
            .await?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let declared = within(
                self.timeout(),
                "count a queue's messages",
                channel.queue_declare(
                    name.as_str().into(),
                    passive,
                    FieldTable::default(),
                ),
            )
            .await;
            if let Ok(declared) = declared {
                waiting += u64::from(declared.message_count());
                let _ = channel.close(200, "counted".into()).await;
            }
        }
        Ok(QueueDepth {
            waiting,
            oldest: None,
        })
    }

    fn is_connected(&self) -> bool {
        self.inner.connection.status().connected()
            && self.inner.publisher.status().connected()
    }
}

impl Broker for ReconnectingAmqp {
    fn bind<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.remember(queue, event_types, false);
            self.broker().await?.declare(queue, event_types).await
        })
    }

    fn bind_ordered<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.remember(queue, event_types, true);
            self.broker()
                .await?
                .declare_ordered(queue, event_types)
                .await
        })
    }

    fn publish<'a>(
        &'a self,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move { self.broker().await?.publish(envelope).await })
    }

    fn receive<'a>(
        &'a self,
        queue: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BusError>> {
        Box::pin(async move { self.broker().await?.receive(queue, max).await })
    }

    fn ack<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move { self.settling().await?.ack(delivery).await })
    }

    fn retry<'a>(
        &'a self,
        delivery: &'a Delivery,
        delay: Duration,
        error: &'a str,
    ) -> BoxFuture<'a, Result<Duration, BusError>> {
        Box::pin(async move {
            self.settling().await?.retry(delivery, delay, error).await
        })
    }

    fn release<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move { self.settling().await?.release(delivery).await })
    }

    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(async move {
            self.settling().await?.dead_letter(delivery, reason).await
        })
    }

    fn is_ready(&self) -> BoxFuture<'_, bool> {
        Box::pin(async move { self.live().await.is_some() })
    }

    fn queue_depth<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<QueueDepth, BusError>> {
        Box::pin(async move { self.broker().await?.queue_depth(queue).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_waits_in_the_tier_nearest_its_delay() {
        let tier = |secs: f64| retry_tier(Duration::from_secs_f64(secs));
        assert_eq!(tier(0.2), 1);
        assert_eq!(tier(1.0), 1);
        assert_eq!(tier(3.0), 4);
        assert_eq!(tier(10.0), 8);
        assert_eq!(tier(600.0), 512);
        assert_eq!(tier(100_000.0), 3600);
        for millis in (500..4_000_000).step_by(997) {
            let delay = Duration::from_millis(millis).as_secs_f64();
            let chosen = retry_tier(Duration::from_millis(millis)) as f64;
            if (1.0..=3600.0).contains(&delay) {
                assert!(
                    chosen <= delay * 1.5 && chosen >= delay / 1.5,
                    "{delay} {chosen}"
                );
            }
        }
    }
}
