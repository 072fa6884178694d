//! Listing, replaying and purging dead letters, the same on both backends.
//! The RabbitMQ test needs HERALD_TEST_AMQP_URL and runs with
//! `cargo test -- --include-ignored`.

use std::time::Duration;

use herald::broker::amqp::AmqpOptions;
use herald::broker::embedded::EmbeddedOptions;
use herald::sqlite::Database;
use herald::{
    AmqpBroker, Broker, DeadLetters, Delivery, EmbeddedBroker, Envelope, Which,
};
use uuid::Uuid;

mod support;

async fn receive_one(broker: &dyn Broker, queue: &str) -> Delivery {
    let batch =
        tokio::time::timeout(Duration::from_secs(10), broker.receive(queue, 1))
            .await
            .expect("a message arrives")
            .unwrap();
    batch.into_iter().next().unwrap()
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Pinged {
    n: u32,
}

impl herald::Event for Pinged {
    const TYPE: &'static str = "test.pinged.v1";
}

/// A ping under `event_type`: each RabbitMQ test names its own.
fn ping(event_type: &str, n: u32) -> Envelope {
    let mut envelope = Envelope::new("/test", &Pinged { n }, None).unwrap();
    envelope.event_type = event_type.to_owned();
    envelope
}

/// Dead-letters three events, then lists, replays one, purges one, replays
/// the rest and purges all, checking what the queue and its dead letters
/// hold after each step.
async fn dead_letters_can_be_listed_replayed_and_purged(
    broker: &dyn Broker,
    dead: &dyn DeadLetters,
    queue: &str,
    event_type: &'static str,
) {
    broker.bind(queue, &[event_type]).await.unwrap();
    let sent: Vec<Envelope> = (1..=3).map(|n| ping(event_type, n)).collect();
    for envelope in &sent {
        broker.publish(envelope).await.unwrap();
        let delivery = receive_one(broker, queue).await;
        let reason = format!("refused {}", delivery.envelope.id);
        broker.dead_letter(&delivery, &reason).await.unwrap();
    }
    let ids: Vec<Uuid> = sent.iter().map(|e| e.id).collect();

    let listed = dead.list(queue).await.unwrap();
    assert_eq!(listed.len(), 3);
    for (letter, envelope) in listed.iter().zip(&sent) {
        assert_eq!(letter.envelope, *envelope);
        assert_eq!(letter.queue, queue);
        assert_eq!(letter.attempts, 1);
        assert_eq!(letter.reason, format!("refused {}", envelope.id));
        assert!(letter.first_failed_at <= letter.dead_at);
        assert!(
            letter.dead_at > chrono::Utc::now() - chrono::Duration::minutes(1)
        );
    }
    // Listing takes nothing away.
    assert_eq!(dead.list(queue).await.unwrap().len(), 3);

    // Replaying one puts it back on its queue with a fresh attempt count.
    assert_eq!(dead.replay(queue, Which::One(ids[0])).await.unwrap(), 1);
    let replayed = receive_one(broker, queue).await;
    assert_eq!(replayed.envelope.id, ids[0]);
    assert_eq!(replayed.attempt, 1);
    broker.ack(&replayed).await.unwrap();

    assert_eq!(dead.purge(queue, Which::One(ids[1])).await.unwrap(), 1);
    let left = dead.list(queue).await.unwrap();
    assert_eq!(
        left.iter().map(|l| l.envelope.id).collect::<Vec<_>>(),
        [ids[2]]
    );
    assert_eq!(
        dead.replay(queue, Which::One(Uuid::new_v4()))
            .await
            .unwrap(),
        0
    );

    assert_eq!(dead.replay(queue, Which::All).await.unwrap(), 1);
    let replayed = receive_one(broker, queue).await;
    assert_eq!(replayed.envelope.id, ids[2]);
    assert!(dead.list(queue).await.unwrap().is_empty());

    broker
        .dead_letter(&replayed, "refused again")
        .await
        .unwrap();
    assert_eq!(dead.purge(queue, Which::All).await.unwrap(), 1);
    assert!(dead.list(queue).await.unwrap().is_empty());
}

#[tokio::test]
async fn embedded_dead_letters_can_be_listed_replayed_and_purged() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(&dir.path().join("bus.db")).await.unwrap();
    let broker = EmbeddedBroker::open(db, EmbeddedOptions::default())
        .await
        .unwrap();
    dead_letters_can_be_listed_replayed_and_purged(
        &broker,
        &broker,
        "pings",
        "test.pinged.v1",
    )
    .await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn rabbitmq_dead_letters_can_be_listed_replayed_and_purged() {
    let url = support::amqp_url();
    let support::Names {
        queue, event_type, ..
    } = support::unique_names();
    let broker = AmqpBroker::connect(&url, AmqpOptions::default())
        .await
        .unwrap();
    dead_letters_can_be_listed_replayed_and_purged(
        &broker, &broker, &queue, event_type,
    )
    .await;

    broker.delete(&queue).await.unwrap();
    broker.close().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_replay_to_a_queue_that_is_gone_fails_and_keeps_the_dead_letter() {
    let url = support::amqp_url();
    let support::Names {
        queue, event_type, ..
    } = support::unique_names();
    let broker = AmqpBroker::connect(&url, AmqpOptions::default())
        .await
        .unwrap();
    broker.bind(&queue, &[event_type]).await.unwrap();
    broker.publish(&ping(event_type, 1)).await.unwrap();
    let delivery = receive_one(&broker, &queue).await;
    broker.dead_letter(&delivery, "refused").await.unwrap();

    // The queue goes (its dead letters stay).
    let connection = lapin::Connection::connect(
        &url,
        lapin::ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .queue_delete(
            queue.as_str().into(),
            lapin::options::QueueDeleteOptions::default(),
        )
        .await
        .unwrap();

    assert!(broker.replay(&queue, Which::All).await.is_err());
    assert_eq!(broker.list(&queue).await.unwrap().len(), 1);
    broker.delete(&queue).await.unwrap();
    broker.close().await;
}
