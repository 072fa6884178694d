//! Per-key order on RabbitMQ: partitioned queues, one active consumer
//! each.
//!
//! Every event herald publishes carries a slot, `herald-slot`: a hash of
//! its subject (its key) into [`SLOTS`] values, so that all events of a
//! key share a slot. An ordered subscription on `<queue>` gets a headers
//! exchange, `<queue>.slots`, bound to `herald.events` by event type, and
//! [`PARTITIONS`] queues `<queue>.p<n>`, each bound to the slots that fall
//! to it. The partition queues are declared with
//! `x-single-active-consumer`: every process subscribes to every
//! partition, RabbitMQ hands each partition to one of them at a time, in
//! order, and gives it to another when that one goes.
//!
//! Within a process the worker runs the events of a key one at a time and
//! retries a failing one in place (unacknowledged, so a crash hands it
//! back first), while events of other keys, in this partition and others,
//! go on.
//!
//! Limits: partitions, not keys, are the unit of scale: at most
//! [`PARTITIONS`] consumers are active for an ordered subscription, and
//! RabbitMQ gives a partition to whichever process subscribed first, so
//! processes started one after another do not share the load (the later
//! ones stand by). Retries in place count against RabbitMQ's consumer
//! timeout (30 minutes by default), so the worker gives up on an ordered
//! event, dead-lettering it, before it has been held that long. Events
//! without a slot (from other producers) do not reach an ordered
//! subscription.

use lapin::ExchangeKind;
use lapin::options::{
    ExchangeBindOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

use super::{AmqpBroker, EXCHANGE, within};
use crate::broker::BusError;
use crate::envelope::Envelope;

/// The header that carries an event's slot. Not `x-` prefixed: a headers
/// exchange ignores such headers when it matches.
pub(super) const SLOT: &str = "herald-slot";

/// How many slots keys hash into; partitions take equal shares of them.
pub(super) const SLOTS: u32 = 64;

/// Partition queues per ordered subscription: the most consumers that
/// handle it at once.
pub const PARTITIONS: u32 = 8;

/// The slot of `envelope`: by its subject (FNV-1a, the same in every
/// process), or by its id when it has none, which spreads keyless events.
pub(super) fn slot_of(envelope: &Envelope) -> u32 {
    let id = envelope.id.to_string();
    let key = envelope.subject.as_deref().unwrap_or(&id);
    let mut hash: u32 = 0x811c_9dc5;
    for byte in key.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % SLOTS
}

impl AmqpBroker {
    /// The partition queues of the ordered subscription `queue`.
    pub fn partitions_of(queue: &str) -> Vec<String> {
        (0..PARTITIONS).map(|p| format!("{queue}.p{p}")).collect()
    }

    /// Declares the ordered topology of `queue`; see the module docs.
    pub(super) async fn declare_ordered(
        &self,
        queue: &str,
        event_types: &[&str],
    ) -> Result<(), BusError> {
        let channel = &self.inner.publisher;
        self.declare_exchange().await?;
        let slots = format!("{queue}.slots");
        within(
            self.timeout(),
            "declare a slots exchange",
            channel.exchange_declare(
                slots.as_str().into(),
                ExchangeKind::Headers,
                ExchangeDeclareOptions {
                    durable: true,
                    ..ExchangeDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        for event_type in event_types {
            within(
                self.timeout(),
                "bind a slots exchange",
                channel.exchange_bind(
                    slots.as_str().into(),
                    EXCHANGE.into(),
                    (*event_type).into(),
                    ExchangeBindOptions::default(),
                    FieldTable::default(),
                ),
            )
            .await?;
        }

        let mut single_active = FieldTable::default();
        single_active.insert(
            "x-single-active-consumer".into(),
            AMQPValue::Boolean(true),
        );
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        for (p, partition) in Self::partitions_of(queue).iter().enumerate() {
            within(
                self.timeout(),
                "declare a partition queue",
                channel.queue_declare(
                    partition.as_str().into(),
                    durable,
                    single_active.clone(),
                ),
            )
            .await?;
            let slots_of_partition =
                (0..SLOTS).filter(|s| s % PARTITIONS == p as u32);
            for slot in slots_of_partition {
                let mut matching = FieldTable::default();
                matching.insert(
                    "x-match".into(),
                    AMQPValue::LongString("all".into()),
                );
                matching.insert(
                    SLOT.into(),
                    AMQPValue::LongString(slot.to_string().into()),
                );
                within(
                    self.timeout(),
                    "bind a partition queue",
                    channel.queue_bind(
                        partition.as_str().into(),
                        slots.as_str().into(),
                        "".into(),
                        QueueBindOptions::default(),
                        matching,
                    ),
                )
                .await?;
            }
        }
        let dead = Self::dead_letter_queue(queue);
        within(
            self.timeout(),
            "declare a dead-letter queue",
            channel.queue_declare(dead.into(), durable, FieldTable::default()),
        )
        .await?;
        self.inner.ordered.lock().unwrap().insert(queue.to_owned());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_of_one_key_share_a_slot_and_keys_spread_over_all() {
        let event = |subject: &str| Envelope {
            id: uuid::Uuid::new_v4(),
            source: "/test".into(),
            event_type: "test.v1".into(),
            subject: Some(subject.to_owned()),
            time: chrono::Utc::now(),
            content_type: crate::envelope::JSON.into(),
            traceparent: None,
            data: b"{}".to_vec(),
        };
        assert_eq!(slot_of(&event("order-1")), slot_of(&event("order-1")));
        let used: std::collections::HashSet<u32> = (0..2000)
            .map(|n| slot_of(&event(&format!("order-{n}"))))
            .collect();
        assert_eq!(used.len(), SLOTS as usize);
    }
}
