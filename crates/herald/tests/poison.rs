//! Messages that cannot be handled as sent are dead-lettered at once, on
//! both backends, with a reason that says what was wrong, and the
//! messages behind them still get through.
//!
//! The RabbitMQ test needs HERALD_TEST_AMQP_URL and runs with
//! `cargo test -- --include-ignored`.

use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use herald::broker::BoxFuture;
use herald::broker::amqp::AmqpOptions;
use herald::broker::embedded::EmbeddedOptions;
use herald::sqlite::Database;
use herald::worker::{self, WorkerOptions};
use herald::{
    AmqpBroker, Broker, Delivery, EmbeddedBroker, Envelope, Event, Handler,
    HandlerError, Subscription,
};
use lapin::options::BasicGetOptions;
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use uuid::Uuid;

mod support;

#[derive(Debug, Serialize, Deserialize)]
struct Pinged {
    n: u32,
}

impl Event for Pinged {
    const TYPE: &'static str = "test.pinged.v1";
}

/// Reads every delivery it is given as a `Pinged`, as a typed handler
/// does, and notes what it saw.
#[derive(Default)]
struct Decoding {
    calls: Mutex<Vec<Uuid>>,
    handled: Mutex<Vec<u32>>,
}

impl Handler for Decoding {
    fn handle<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            self.calls.lock().unwrap().push(delivery.envelope.id);
            // Read the payload as the contract says (each RabbitMQ test
            // names its event type afresh, so `Envelope::decode`, which
            // also checks the type, would refuse it).
            let ping: Pinged = serde_json::from_slice(&delivery.envelope.data)
                .map_err(|e| {
                    HandlerError::permanent(format!(
                        "payload does not match the event's contract: {e}"
                    ))
                })?;
            self.handled.lock().unwrap().push(ping.n);
            Ok(())
        })
    }
}

/// A message that must be dead-lettered, and words its reason must hold.
struct Poison {
    envelope: Envelope,
    reason: &'static str,
}

fn envelope(event_type: &str, content_type: &str, data: &[u8]) -> Envelope {
    let mut envelope = Envelope::new("/test", &Pinged { n: 0 }, None).unwrap();
    envelope.event_type = event_type.to_owned();
    envelope.content_type = content_type.to_owned();
    envelope.data = data.to_vec();
    envelope
}

/// One of each kind of garbage: for `event_type`, and one of
/// `stray_type`, which the queue receives but the subscription does not
/// handle.
fn poisons(event_type: &str, stray_type: &str) -> Vec<Poison> {
    let json = "application/json";
    vec![
        Poison {
            envelope: envelope(stray_type, json, br#"{"n":1}"#),
            reason: "unknown event type",
        },
        Poison {
            envelope: envelope(event_type, "text/plain", b"n=1"),
            reason: "content type",
        },
        Poison {
            envelope: envelope(event_type, json, b"{\"n\":\xff\xfe}"),
            reason: "not UTF-8",
        },
        Poison {
            envelope: envelope(event_type, json, b"{n: 1"),
            reason: "not JSON",
        },
        Poison {
            envelope: envelope(event_type, json, br#"{"n":"seven"}"#),
            reason: "contract",
        },
    ]
}

/// A dead letter as the test reads it back: id, reason, attempts.
type Dead = (Uuid, String, u32);

/// Publishes the poisons, then a good event; runs a worker until the good
/// one is handled and every poison is dead; checks each reason, that each
/// took one attempt, and that the handler never saw what was not its own.
async fn garbage_is_dead_lettered_at_once<F, Fut>(
    broker: Arc<dyn Broker>,
    queue: &str,
    event_type: &'static str,
    stray_type: &str,
    dead_letters: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = Vec<Dead>>,
{
    broker.bind(queue, &[event_type, stray_type]).await.unwrap();
    let poisons = poisons(event_type, stray_type);
    for poison in &poisons {
        broker.publish(&poison.envelope).await.unwrap();
    }
    let good = envelope(event_type, "application/json", br#"{"n":7}"#);
    broker.publish(&good).await.unwrap();

    let handler = Arc::new(Decoding::default());
    let subscription = Subscription {
        service: Some("test"),
        queue: queue.to_owned(),
        event_types: vec![event_type],
        options: WorkerOptions::default(),
    };
    let (stop, mut stopped) = watch::channel(false);
    let running = tokio::spawn(worker::run(
        broker.clone(),
        subscription,
        handler.clone(),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));

    let mut dead = Vec::new();
    for _ in 0..200 {
        dead.extend(dead_letters().await);
        let done = handler.handled.lock().unwrap().len() == 1;
        if done && dead.len() >= poisons.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();

    assert_eq!(dead.len(), poisons.len(), "{dead:?}");
    assert_eq!(*handler.handled.lock().unwrap(), vec![7]);
    for poison in &poisons {
        let (_, reason, attempts) = dead
            .iter()
            .find(|(id, ..)| *id == poison.envelope.id)
            .unwrap_or_else(|| panic!("no dead letter for {}", poison.reason));
        assert!(reason.contains(poison.reason), "{reason:?}");
        assert_eq!(*attempts, 1, "{reason}");
    }
    // Only the good event and the one that misfits the contract (which
    // only the handler can judge) reached the handler.
    let calls = handler.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "{calls:?}");
}

#[tokio::test]
async fn garbage_on_the_embedded_bus_is_dead_lettered_at_once_with_its_reason()
{
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(&dir.path().join("bus.db")).await.unwrap();
    let broker = EmbeddedBroker::open(db, EmbeddedOptions::default())
        .await
        .unwrap();
    let reader = broker.clone();
    garbage_is_dead_lettered_at_once(
        Arc::new(broker),
        "pings",
        Pinged::TYPE,
        "test.stray.v1",
        || async {
            let dead = reader.dead_letters("pings").await.unwrap();
            dead.into_iter()
                .map(|d| (d.envelope.id, d.reason, d.attempts))
                .collect()
        },
    )
    .await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn garbage_on_rabbitmq_is_dead_lettered_at_once_with_its_reason() {
    let url = support::amqp_url();
    let support::Names {
        queue,
        event_type,
        stray_type,
    } = support::unique_names();
    let broker = AmqpBroker::connect(&url, AmqpOptions::default())
        .await
        .unwrap();
    let connection = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let dead_queue = AmqpBroker::dead_letter_queue(&queue);

    garbage_is_dead_lettered_at_once(
        Arc::new(broker.clone()),
        &queue,
        event_type,
        &stray_type,
        || async {
            let mut dead = Vec::new();
            while let Some(message) = channel
                .basic_get(
                    dead_queue.as_str().into(),
                    BasicGetOptions { no_ack: true },
                )
                .await
                .unwrap()
            {
                let properties = &message.delivery.properties;
                let id = properties.message_id().as_ref().unwrap();
                let headers = properties.headers().clone().unwrap();
                let reason = match headers.inner().get("x-herald-reason") {
                    Some(AMQPValue::LongString(r)) => r.to_string(),
                    other => panic!("no reason: {other:?}"),
                };
                let attempts = match headers.inner().get("x-herald-attempts") {
                    Some(AMQPValue::LongUInt(n)) => *n,
                    Some(AMQPValue::LongInt(n)) => *n as u32,
                    other => panic!("no attempt count: {other:?}"),
                };
                dead.push((
                    Uuid::parse_str(id.as_str()).unwrap(),
                    reason,
                    attempts,
                ));
            }
            dead
        },
    )
    .await;

    broker.delete(&queue).await.unwrap();
    broker.close().await;
}
