//! The RabbitMQ broker against a real RabbitMQ. Set HERALD_TEST_AMQP_URL
//! (e.g. amqp://guest:guest@127.0.0.1:5672/%2f) and run with
//! `cargo test -- --include-ignored`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use herald::broker::BoxFuture;
use herald::broker::amqp::AmqpOptions;
use herald::worker::{self, WorkerOptions};
use herald::{
    AmqpBroker, Broker, BusError, Delivery, Envelope, Event, Handler,
    HandlerError, RetryPolicy, Subscription,
};
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
};
use lapin::types::AMQPValue;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use support::amqp_url as url;
use tokio::sync::watch;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pinged {
    n: u32,
}

impl Event for Pinged {
    /// Each test publishes under a type of its own; see [`Fixture`].
    const TYPE: &'static str = "test.pinged.v1";
}

/// A queue and an event type of its own for each test, so tests can
/// share the broker; the queues are deleted at the end.
struct Fixture {
    queue: String,
    event_type: &'static str,
    broker: AmqpBroker,
}

impl Fixture {
    async fn new() -> Self {
        let support::Names {
            queue, event_type, ..
        } = support::unique_names();
        let broker = AmqpBroker::connect(&url(), AmqpOptions::default())
            .await
            .unwrap();
        broker.bind(&queue, &[event_type]).await.unwrap();
        Fixture {
            queue,
            event_type,
            broker,
        }
    }

    fn ping(&self, n: u32) -> Envelope {
        let mut envelope = Envelope::new("/test", &Pinged { n }, None).unwrap();
        envelope.event_type = self.event_type.to_owned();
        envelope
    }

    async fn receive_one(&self, broker: &AmqpBroker) -> Delivery {
        let batch = tokio::time::timeout(
            Duration::from_secs(20),
            broker.receive(&self.queue, 1),
        )
        .await
        .expect("a message arrives")
        .unwrap();
        batch.into_iter().next().unwrap()
    }

    /// A raw channel, for looking behind the broker's back.
    async fn raw(&self) -> lapin::Channel {
        let connection =
            Connection::connect(&url(), ConnectionProperties::default())
                .await
                .unwrap();
        connection.create_channel().await.unwrap()
    }

    async fn cleanup(self) {
        self.broker.delete(&self.queue).await.unwrap();
        self.broker.close().await;
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_published_event_is_delivered_whole() {
    let fx = Fixture::new().await;
    let mut sent = fx.ping(7);
    sent.subject = Some("order-7".into());
    sent.traceparent = Some(herald::TraceContext::new_root());
    fx.broker.publish(&sent).await.unwrap();

    let delivery = fx.receive_one(&fx.broker).await;
    assert_eq!(delivery.envelope.id, sent.id);
    assert_eq!(delivery.envelope, sent);
    assert_eq!(delivery.attempt, 1);
    fx.broker.ack(&delivery).await.unwrap();
    fx.cleanup().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn an_event_no_queue_is_bound_to_is_refused() {
    let fx = Fixture::new().await;
    let mut envelope = fx.ping(1);
    envelope.event_type =
        format!("test.nobody.{}", uuid::Uuid::new_v4().simple());
    let error = fx.broker.publish(&envelope).await.unwrap_err();
    assert!(matches!(error, BusError::Unroutable { .. }), "{error}");
    fx.cleanup().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_retry_waits_in_a_delay_queue_and_comes_back_with_the_next_attempt() {
    let fx = Fixture::new().await;
    let sent = fx.ping(1);
    fx.broker.publish(&sent).await.unwrap();
    let first = fx.receive_one(&fx.broker).await;
    assert_eq!(first.envelope.id, sent.id);

    let started = std::time::Instant::now();
    fx.broker
        .retry(&first, Duration::from_millis(500), "not yet")
        .await
        .unwrap();
    let second = fx.receive_one(&fx.broker).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(second.envelope, sent);
    assert_eq!(second.attempt, 2);
    fx.broker.ack(&second).await.unwrap();
    fx.cleanup().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_dead_letter_keeps_the_message_the_reason_and_the_attempts() {
    let fx = Fixture::new().await;
    let sent = fx.ping(3);
    fx.broker.publish(&sent).await.unwrap();
    let delivery = fx.receive_one(&fx.broker).await;
    fx.broker
        .dead_letter(&delivery, "bad payload")
        .await
        .unwrap();

    let channel = fx.raw().await;
    let dead = channel
        .basic_get(
            AmqpBroker::dead_letter_queue(&fx.queue).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a dead letter");
    let properties = &dead.delivery.properties;
    let headers = properties.headers().clone().unwrap();
    assert_eq!(dead.delivery.data, sent.data);
    assert_eq!(
        properties.message_id().as_ref().unwrap().as_str(),
        sent.id.to_string()
    );
    assert_eq!(
        headers.inner().get("x-herald-reason"),
        Some(&AMQPValue::LongString("bad payload".into()))
    );
    assert_eq!(
        headers.inner().get("x-herald-attempts"),
        Some(&AMQPValue::LongUInt(1))
    );
    fx.cleanup().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn deliveries_held_by_a_consumer_that_dies_come_back_counted() {
    let fx = Fixture::new().await;
    let sent = fx.ping(4);
    fx.broker.publish(&sent).await.unwrap();

    let doomed = AmqpBroker::connect(&url(), AmqpOptions::default())
        .await
        .unwrap();
    let held = fx.receive_one(&doomed).await;
    assert_eq!(held.attempt, 1);
    doomed.close().await;

    let again = fx.receive_one(&fx.broker).await;
    assert_eq!(again.envelope, sent);
    assert_eq!(again.attempt, 2);
    fx.broker.ack(&again).await.unwrap();
    fx.cleanup().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_message_from_another_producer_without_herald_attributes_is_dead_lettered()
 {
    let fx = Fixture::new().await;
    let channel = fx.raw().await;
    // Confirmed, so it is in the queue before the event published next.
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    channel
        .basic_publish(
            "".into(),
            fx.queue.as_str().into(),
            BasicPublishOptions::default(),
            b"not an event",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    // A proper event behind it still gets through.
    let sent = fx.ping(5);
    fx.broker.publish(&sent).await.unwrap();
    let delivery = fx.receive_one(&fx.broker).await;
    assert_eq!(delivery.envelope.id, sent.id);

    let dead = channel
        .basic_get(
            AmqpBroker::dead_letter_queue(&fx.queue).into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("the foreign message is a dead letter");
    assert_eq!(dead.delivery.data, b"not an event");
    let headers = dead.delivery.properties.headers().clone().unwrap();
    let reason = match headers.inner().get("x-herald-reason") {
        Some(AMQPValue::LongString(reason)) => reason.to_string(),
        other => panic!("no reason: {other:?}"),
    };
    assert!(reason.contains("message_id"), "{reason}");
    fx.cleanup().await;
}

/// Fails the first `failures` calls transiently, then succeeds.
struct Flaky {
    calls: AtomicU32,
    failures: u32,
    done: tokio::sync::Notify,
}

impl Handler for Flaky {
    fn handle<'a>(
        &'a self,
        _delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if call <= self.failures {
                return Err(HandlerError::transient("not yet"));
            }
            self.done.notify_one();
            Ok(())
        })
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_worker_over_rabbitmq_retries_then_acknowledges() {
    let fx = Fixture::new().await;
    let handler = Arc::new(Flaky {
        calls: AtomicU32::new(0),
        failures: 2,
        done: tokio::sync::Notify::new(),
    });
    let (stop, mut stopped) = watch::channel(false);
    let subscription = Subscription {
        service: Some("test"),
        queue: fx.queue.clone(),
        event_types: vec![fx.event_type],
        options: WorkerOptions {
            retry: RetryPolicy {
                max_attempts: 5,
                base: Duration::from_millis(10),
                cap: Duration::from_millis(100),
            },
            ..WorkerOptions::default()
        },
    };
    let running = tokio::spawn(worker::run(
        Arc::new(fx.broker.clone()),
        subscription,
        handler.clone(),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    fx.broker.publish(&fx.ping(6)).await.unwrap();

    tokio::time::timeout(Duration::from_secs(30), handler.done.notified())
        .await
        .expect("handled on the third attempt");
    assert_eq!(handler.calls.load(Ordering::SeqCst), 3);
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();
    fx.cleanup().await;
}

/// Records the order events are handled in, by key, across workers; fails
/// the first attempt at every third event.
#[derive(Default)]
struct KeyOrder {
    handled: std::sync::Mutex<Vec<(String, u32)>>,
    failed_once: std::sync::Mutex<std::collections::HashSet<u32>>,
}

impl Handler for KeyOrder {
    fn handle<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let n: Pinged = serde_json::from_slice(&delivery.envelope.data)
                .map_err(|e| HandlerError::permanent(e.to_string()))?;
            if n.n % 3 == 1 && self.failed_once.lock().unwrap().insert(n.n) {
                return Err(HandlerError::Transient {
                    reason: "not yet".into(),
                    retry_after: Some(Duration::from_millis(100)),
                });
            }
            let key = delivery.envelope.subject.clone().unwrap_or_default();
            self.handled.lock().unwrap().push((key, n.n));
            Ok(())
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn two_ordered_consumers_keep_each_keys_order_through_retries() {
    let fx = Fixture::new().await;
    let handler = Arc::new(KeyOrder::default());
    let options = WorkerOptions {
        per_key_order: true,
        concurrency: 16,
        ..WorkerOptions::default()
    };
    let subscription = Subscription {
        service: Some("test"),
        queue: fx.queue.clone(),
        event_types: vec![fx.event_type],
        options,
    };
    // Two consumers, as two processes would be: each its own connection.
    let (stop, stopped) = watch::channel(false);
    let mut workers = Vec::new();
    let mut consumers = Vec::new();
    for _ in 0..2 {
        let broker = AmqpBroker::connect(&url(), AmqpOptions::default())
            .await
            .unwrap();
        let mut stopped = stopped.clone();
        workers.push(tokio::spawn(worker::run(
            Arc::new(broker.clone()),
            subscription.clone(),
            handler.clone(),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        )));
        consumers.push(broker);
    }
    // Let both bind and subscribe before anything is published.
    tokio::time::sleep(Duration::from_millis(500)).await;

    const KEYS: u32 = 6;
    const PER_KEY: u32 = 10;
    for i in 0..PER_KEY {
        for k in 0..KEYS {
            let mut event = fx.ping(k * 100 + i);
            event.subject = Some(format!("key-{k}"));
            fx.broker.publish(&event).await.unwrap();
        }
    }
    for _ in 0..400 {
        if handler.handled.lock().unwrap().len() == (KEYS * PER_KEY) as usize {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.send(true).unwrap();
    for worker in workers {
        worker.await.unwrap().unwrap();
    }

    let handled = handler.handled.lock().unwrap().clone();
    assert_eq!(handled.len(), (KEYS * PER_KEY) as usize, "{handled:?}");
    for k in 0..KEYS {
        let key = format!("key-{k}");
        let order: Vec<u32> = handled
            .iter()
            .filter(|(of, _)| *of == key)
            .map(|(_, n)| *n)
            .collect();
        let expected: Vec<u32> = (0..PER_KEY).map(|i| k * 100 + i).collect();
        assert_eq!(order, expected, "{key}");
    }
    for broker in consumers {
        broker.close().await;
    }
    for partition in AmqpBroker::partitions_of(&fx.queue) {
        fx.broker.delete(&partition).await.unwrap();
    }
    fx.cleanup().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_released_delivery_comes_back_without_its_attempt_counted() {
    let fx = Fixture::new().await;
    let sent = fx.ping(7);
    fx.broker.publish(&sent).await.unwrap();
    let first = fx.receive_one(&fx.broker).await;
    assert_eq!(first.attempt, 1);
    fx.broker.release(&first).await.unwrap();

    let again = fx.receive_one(&fx.broker).await;
    assert_eq!(again.envelope.id, sent.id);
    assert_eq!(again.attempt, 1);
    fx.broker.ack(&again).await.unwrap();
    fx.cleanup().await;
}
