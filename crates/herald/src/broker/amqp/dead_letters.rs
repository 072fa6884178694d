//! `herald dlq` on RabbitMQ: the dead letters of a queue wait in
//! `<queue>.dead`.
//!
//! RabbitMQ cannot show a queue's messages without handing them out, so
//! every operation opens a channel of its own and takes the dead letters
//! without acknowledging them (at most [`MAX_SCANNED`]). It acknowledges
//! those it is done with (sent back to their queue, or purged) and closes
//! the channel, which returns the others to the dead-letter queue. A replayed message
//! is published back to its queue (through the slots exchange of an
//! ordered subscription, to the partition of its key), as mandatory and
//! with a confirm, before its dead letter is acknowledged: a failure in
//! between leaves it in both places rather than in neither, and a queue
//! that is not there is an error, not a loss.

use chrono::{DateTime, Utc};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueuePurgeOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Confirmation, ExchangeKind};
use uuid::Uuid;

use super::{
    ATTEMPTS, AmqpBroker, DEAD_AT, FIRST_FAILED, REASON, envelope_of,
    header_i64, header_text, header_u32, within,
};
use crate::broker::{BoxFuture, BusError, DeadLetter, DeadLetters, Which};
use crate::envelope::Envelope;

/// Dead letters one operation looks at, at most: each is held until the
/// operation ends.
const MAX_SCANNED: usize = 100_000;

impl AmqpBroker {
    /// A channel of its own for one operation on dead letters, in confirm
    /// mode for the messages it sends back.
    async fn dead_letter_channel(&self) -> Result<Channel, BusError> {
        let channel = within(
            self.timeout(),
            "open a channel",
            self.inner.connection.create_channel(),
        )
        .await?;
        within(
            self.timeout(),
            "enable confirms",
            channel.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(channel)
    }

    /// Takes the dead letters of `queue`, unacknowledged, on a channel of
    /// their own. Closing the channel returns those not acknowledged.
    async fn take_dead_letters(
        &self,
        queue: &str,
    ) -> Result<(Channel, Vec<lapin::message::Delivery>), BusError> {
        let channel = self.dead_letter_channel().await?;
        let dead = Self::dead_letter_queue(queue);
        let mut taken = Vec::new();
        while taken.len() < MAX_SCANNED {
            let got = within(
                self.timeout(),
                "read a dead letter",
                channel.basic_get(
                    dead.as_str().into(),
                    BasicGetOptions::default(),
                ),
            )
            .await;
            match got {
                Ok(Some(message)) => taken.push(message.delivery),
                Ok(None) => break,
                Err(error) => {
                    close(self, channel).await;
                    return Err(error);
                }
            }
        }
        Ok((channel, taken))
    }

    async fn list_dead(
        &self,
        queue: &str,
    ) -> Result<Vec<DeadLetter>, BusError> {
        let (channel, taken) = self.take_dead_letters(queue).await?;
        close(self, channel).await;
        Ok(taken.iter().map(|d| dead_letter_of(queue, d)).collect())
    }

    async fn replay_dead(
        &self,
        queue: &str,
        which: Which,
    ) -> Result<usize, BusError> {
        let target = self.replay_target(queue).await?;
        let (channel, taken) = self.take_dead_letters(queue).await?;
        let mut replayed = 0;
        let mut outcome = Ok(());
        for delivery in &taken {
            if !which.includes(event_id_of(&delivery.properties)) {
                continue;
            }
            outcome = self.send_back(&channel, &target, delivery).await;
            if outcome.is_err() {
                break;
            }
            replayed += 1;
        }
        close(self, channel).await;
        outcome.map(|()| replayed)
    }

    /// Where the dead letters of `queue` go back to: the queue itself, by
    /// the default exchange, or for an ordered subscription its slots
    /// exchange, which puts each in the partition of its key.
    async fn replay_target(&self, queue: &str) -> Result<Target, BusError> {
        let slots = format!("{queue}.slots");
        // A passive declare of a missing exchange closes its channel: use
        // one of its own.
        let probe = self.dead_letter_channel().await?;
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let exists = within(
            self.timeout(),
            "look for a slots exchange",
            probe.exchange_declare(
                slots.as_str().into(),
                ExchangeKind::Headers,
                passive,
                FieldTable::default(),
            ),
        )
        .await
        .is_ok();
        close(self, probe).await;
        Ok(if exists {
            Target {
                exchange: slots,
                routing_key: String::new(),
            }
        } else {
            Target {
                exchange: String::new(),
                routing_key: queue.to_owned(),
            }
        })
    }

    /// Publishes a dead letter to `target` afresh, then acknowledges it.
    /// Published as mandatory: a target that routes it nowhere is an
    /// error, and the dead letter stays.
    async fn send_back(
        &self,
        channel: &Channel,
        target: &Target,
        delivery: &lapin::message::Delivery,
    ) -> Result<(), BusError> {
        let properties = fresh_properties(&delivery.properties);
        let confirm = within(self.timeout(), "replay a dead letter", async {
            channel
                .basic_publish(
                    target.exchange.as_str().into(),
                    target.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &delivery.data,
                    properties,
                )
                .await?
                .await
        })
        .await?;
        match confirm {
            Confirmation::Ack(None) => acknowledge(self, delivery).await,
            Confirmation::Ack(Some(_)) => Err(BusError::Unroutable {
                event_type: format!("replayed to {}", target.describe()),
            }),
            _ => Err(BusError::Nacked),
        }
    }

    async fn purge_dead(
        &self,
        queue: &str,
        which: Which,
    ) -> Result<usize, BusError> {
        if which == Which::All {
            let channel = self.dead_letter_channel().await?;
            let dead = Self::dead_letter_queue(queue);
            let purged = within(
                self.timeout(),
                "purge dead letters",
                channel.queue_purge(
                    dead.as_str().into(),
                    QueuePurgeOptions::default(),
                ),
            )
            .await;
            close(self, channel).await;
            return Ok(purged? as usize);
        }
        let (channel, taken) = self.take_dead_letters(queue).await?;
        let mut purged = 0;
        let mut outcome = Ok(());
        for delivery in &taken {
            if which.includes(event_id_of(&delivery.properties)) {
                outcome = acknowledge(self, delivery).await;
                if outcome.is_err() {
                    break;
                }
                purged += 1;
            }
        }
        close(self, channel).await;
        outcome.map(|()| purged)
    }
}

/// An exchange and routing key to publish to.
struct Target {
    exchange: String,
    routing_key: String,
}

impl Target {
    fn describe(&self) -> String {
        if self.exchange.is_empty() {
            format!("queue {}", self.routing_key)
        } else {
            format!("exchange {}", self.exchange)
        }
    }
}

async fn close(broker: &AmqpBroker, channel: Channel) {
    let closing = channel.close(200, "done with dead letters".into());
    let _ = tokio::time::timeout(broker.timeout(), closing).await;
}

/// Acknowledges a dead letter that has been dealt with.
async fn acknowledge(
    broker: &AmqpBroker,
    delivery: &lapin::message::Delivery,
) -> Result<(), BusError> {
    within(
        broker.timeout(),
        "acknowledge a dead letter",
        delivery.acker.ack(BasicAckOptions::default()),
    )
    .await
    .map(drop)
}

/// The event id a dead letter is known by; the nil id for a message that
/// came without one (such messages can be replayed or purged with all).
/// The id a dead letter is listed and picked by: a herald event's
/// message id, or a Celery task's id (its correlation id); nil for a
/// message with neither.
fn event_id_of(properties: &BasicProperties) -> Uuid {
    let message_id = properties.message_id().as_ref();
    let task_id = properties.correlation_id().as_ref();
    [message_id, task_id]
        .into_iter()
        .flatten()
        .find_map(|id| Uuid::parse_str(id.as_str()).ok())
        .unwrap_or_default()
}

/// The dead letter's properties without what its failures added, so that
/// it starts again with a fresh attempt count.
fn fresh_properties(properties: &BasicProperties) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let mut kept = FieldTable::default();
    for (name, value) in headers.inner() {
        let name = name.as_str();
        if ![ATTEMPTS, REASON, FIRST_FAILED, DEAD_AT].contains(&name) {
            kept.insert(name.into(), value.clone());
        }
    }
    headers = kept;
    properties.clone().with_headers(headers)
}

/// Reads a dead letter back. One from another producer may lack herald's
/// attributes; it is shown with what it has.
fn dead_letter_of(
    queue: &str,
    delivery: &lapin::message::Delivery,
) -> DeadLetter {
    let properties = &delivery.properties;
    let headers = properties.headers().clone().unwrap_or_default();
    let envelope = envelope_of(delivery).unwrap_or_else(|_| Envelope {
        id: event_id_of(properties),
        source: text(properties.app_id()),
        event_type: text(properties.kind()),
        subject: None,
        time: DateTime::<Utc>::default(),
        content_type: text(properties.content_type()),
        traceparent: None,
        data: delivery.data.clone(),
    });
    let time = |name| {
        header_i64(&headers, name)
            .and_then(DateTime::from_timestamp_millis)
            .unwrap_or_default()
    };
    DeadLetter {
        envelope,
        queue: queue.to_owned(),
        attempts: header_u32(&headers, ATTEMPTS).unwrap_or(0),
        reason: header_text(&headers, REASON).unwrap_or_default(),
        first_failed_at: time(FIRST_FAILED),
        dead_at: time(DEAD_AT),
        headers: headers_of(properties),
    }
}

/// Every header of a message, and the properties herald does not read
/// itself, as text.
fn headers_of(properties: &BasicProperties) -> Vec<(String, String)> {
    let mut shown = Vec::new();
    let text = |value: &Option<lapin::types::ShortString>| {
        value.as_ref().map(|v| v.as_str().to_owned())
    };
    let extra = [
        ("correlation_id", text(properties.correlation_id())),
        ("reply_to", text(properties.reply_to())),
        ("expiration", text(properties.expiration())),
        ("user_id", text(properties.user_id())),
        ("content_encoding", text(properties.content_encoding())),
        ("priority", properties.priority().map(|p| p.to_string())),
    ];
    for (name, value) in extra {
        if let Some(value) = value {
            shown.push((name.to_owned(), value));
        }
    }
    let headers = properties.headers().clone().unwrap_or_default();
    for (name, value) in headers.inner() {
        shown.push((name.as_str().to_owned(), header_value_text(value)));
    }
    shown
}

fn header_value_text(value: &lapin::types::AMQPValue) -> String {
    use lapin::types::AMQPValue;
    match value {
        AMQPValue::LongString(text) => {
            String::from_utf8_lossy(text.as_bytes()).into_owned()
        }
        AMQPValue::ShortString(text) => text.as_str().to_owned(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::Timestamp(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

fn text(value: &Option<lapin::types::ShortString>) -> String {
    value
        .as_ref()
        .map(|v| v.as_str().to_owned())
        .unwrap_or_default()
}

impl DeadLetters for AmqpBroker {
    fn list<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<Vec<DeadLetter>, BusError>> {
        Box::pin(self.list_dead(queue))
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
