//! The PostgreSQL outbox and its relay, against a real PostgreSQL. Set
//! HERALD_TEST_POSTGRES_URL and run with `cargo test -- --include-ignored`.
//!
//! The relay's target is an embedded bus in a SQLite file: a real broker
//! whose queues the test can count.

use std::sync::Arc;
use std::time::Duration;

use herald::broker::embedded::EmbeddedOptions;
use herald::outbox::Outbox;
use herald::sqlite::Database;
use herald::{Broker, EmbeddedBroker, Envelope, Event, postgres};
use serde::{Deserialize, Serialize};
use testkit::postgres::TestDatabase;
use tokio::sync::watch;

#[derive(Debug, Serialize, Deserialize)]
struct Ping {
    n: usize,
}

impl Event for Ping {
    const TYPE: &'static str = "test.ping.v1";
}

const QUEUE: &str = "pings";

struct Setup {
    _pg: TestDatabase,
    outbox: Outbox,
    target: EmbeddedBroker,
    _dir: tempfile::TempDir,
}

async fn setup() -> Setup {
    let pg = TestDatabase::create();
    let db = postgres::Database::open(pg.url()).await.unwrap();
    let outbox = Outbox::open(db).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = Database::open(&dir.path().join("bus.db")).await.unwrap();
    let target = EmbeddedBroker::open(sqlite, EmbeddedOptions::default())
        .await
        .unwrap();
    Setup {
        _pg: pg,
        outbox,
        target,
        _dir: dir,
    }
}

/// Stages `count` pings, each in a transaction of its own, as a service
/// would with its own change.
async fn stage(outbox: &Outbox, count: usize) -> Vec<Envelope> {
    let mut staged = Vec::new();
    for n in 0..count {
        let envelope = Envelope::new("/test", &Ping { n }, None).unwrap();
        let mut tx = outbox.database().begin().await.unwrap();
        Outbox::stage(&mut tx, &envelope).await.unwrap();
        tx.commit().await.unwrap();
        staged.push(envelope);
    }
    outbox.wake();
    staged
}

/// Runs a relay from `outbox` to `target` until the returned sender says
/// stop.
fn start_relay(
    outbox: &Outbox,
    target: &EmbeddedBroker,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, mut stopped) = watch::channel(false);
    let outbox = outbox.clone();
    let target: Arc<dyn Broker> = Arc::new(target.clone());
    let relay = tokio::spawn(async move {
        let stop = async move {
            let _ = stopped.wait_for(|s| *s).await;
        };
        outbox.relay(target, stop).await.unwrap();
    });
    (stop, relay)
}

async fn wait_until_empty(outbox: &Outbox, limit: Duration) {
    let deadline = tokio::time::Instant::now() + limit;
    while outbox.backlog().await.unwrap() > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the outbox still holds {} events",
            outbox.backlog().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every event id the target's queue holds, received and acknowledged.
async fn drain_ids(target: &EmbeddedBroker) -> Vec<uuid::Uuid> {
    let mut ids = Vec::new();
    while target.depth(QUEUE).await.unwrap() > 0 {
        for delivery in target.receive(QUEUE, 256).await.unwrap() {
            ids.push(delivery.envelope.id);
            target.ack(&delivery).await.unwrap();
        }
    }
    ids
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn two_relays_on_one_outbox_publish_every_event_once() {
    let setup = setup().await;
    setup.target.bind(QUEUE, &[Ping::TYPE]).await.unwrap();
    let staged = stage(&setup.outbox, 300).await;

    let relays = [
        start_relay(&setup.outbox, &setup.target),
        start_relay(&setup.outbox, &setup.target),
    ];
    wait_until_empty(&setup.outbox, Duration::from_secs(30)).await;
    for (stop, relay) in relays {
        stop.send(true).unwrap();
        relay.await.unwrap();
    }

    let mut relayed = drain_ids(&setup.target).await;
    relayed.sort();
    let mut expected: Vec<_> = staged.iter().map(|e| e.id).collect();
    expected.sort();
    assert_eq!(relayed, expected);
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn events_the_broker_refuses_stay_in_the_outbox_until_it_takes_them() {
    let setup = setup().await;
    // No queue is bound yet: the target refuses every publish.
    let staged = stage(&setup.outbox, 5).await;
    let (stop, relay) = start_relay(&setup.outbox, &setup.target);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(setup.outbox.backlog().await.unwrap(), 5);

    setup.target.bind(QUEUE, &[Ping::TYPE]).await.unwrap();
    wait_until_empty(&setup.outbox, Duration::from_secs(30)).await;
    stop.send(true).unwrap();
    relay.await.unwrap();

    let relayed = drain_ids(&setup.target).await;
    assert_eq!(relayed.len(), staged.len());
    for envelope in &staged {
        assert!(relayed.contains(&envelope.id), "{} is lost", envelope.id);
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn a_staged_event_rolled_back_with_its_transaction_is_never_relayed() {
    let setup = setup().await;
    setup.target.bind(QUEUE, &[Ping::TYPE]).await.unwrap();
    let envelope = Envelope::new("/test", &Ping { n: 1 }, None).unwrap();
    let mut tx = setup.outbox.database().begin().await.unwrap();
    Outbox::stage(&mut tx, &envelope).await.unwrap();
    tx.rollback().await.unwrap();
    let kept = stage(&setup.outbox, 1).await;

    let (stop, relay) = start_relay(&setup.outbox, &setup.target);
    wait_until_empty(&setup.outbox, Duration::from_secs(10)).await;
    stop.send(true).unwrap();
    relay.await.unwrap();
    assert_eq!(drain_ids(&setup.target).await, vec![kept[0].id]);
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn migrations_run_by_replicas_starting_together_apply_once() {
    let pg = TestDatabase::create();
    let mut opening = Vec::new();
    for _ in 0..4 {
        let url = pg.url().to_owned();
        opening.push(tokio::spawn(async move {
            let db = postgres::Database::open(&url).await.unwrap();
            Outbox::open(db).await.unwrap();
        }));
    }
    // Each open succeeds: none trips over another's half-applied schema.
    for opened in opening {
        opened.await.unwrap();
    }
    // And each migration is recorded once, the last one included.
    let applied = pg
        .query(
            "SELECT count(*) || ' ' || max(version) FROM herald_migrations
             WHERE component = 'outbox'",
        )
        .unwrap();
    assert_eq!(applied, "2 2");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn events_of_a_key_are_relayed_in_the_order_they_were_staged() {
    let setup = setup().await;
    setup.target.bind(QUEUE, &[Ping::TYPE]).await.unwrap();
    let mut staged = Vec::new();
    for n in 0..60 {
        let mut envelope = Envelope::new("/test", &Ping { n }, None).unwrap();
        envelope.subject = Some(format!("key-{}", n % 3));
        let mut tx = setup.outbox.database().begin().await.unwrap();
        Outbox::stage(&mut tx, &envelope).await.unwrap();
        tx.commit().await.unwrap();
        staged.push(envelope);
    }
    setup.outbox.wake();

    let relays = [
        start_relay(&setup.outbox, &setup.target),
        start_relay(&setup.outbox, &setup.target),
    ];
    wait_until_empty(&setup.outbox, Duration::from_secs(30)).await;
    for (stop, relay) in relays {
        stop.send(true).unwrap();
        relay.await.unwrap();
    }

    // The target's queue holds them in the order they were published.
    let relayed = drain_ids(&setup.target).await;
    assert_eq!(relayed.len(), staged.len());
    for key in 0..3 {
        let subject = Some(format!("key-{key}"));
        let of_key = |ids: &[uuid::Uuid]| -> Vec<uuid::Uuid> {
            ids.iter()
                .copied()
                .filter(|id| {
                    staged.iter().any(|e| e.id == *id && e.subject == subject)
                })
                .collect()
        };
        let expected: Vec<_> = staged.iter().map(|e| e.id).collect();
        assert_eq!(of_key(&relayed), of_key(&expected), "key-{key}");
    }
}
