//! The embedded broker and its worker, against a real SQLite file.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use herald::broker::BoxFuture;
use herald::broker::embedded::EmbeddedOptions;
use herald::sqlite::Database;
use herald::worker::{self, WorkerOptions};
use herald::{
    Broker, BusError, Delivery, EmbeddedBroker, Envelope, Event, Handler,
    HandlerError, RetryPolicy, Subscription,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Pinged {
    n: u32,
}

impl Event for Pinged {
    const TYPE: &'static str = "test.pinged.v1";
}

const QUEUE: &str = "pings";

struct Fixture {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    broker: EmbeddedBroker,
}

async fn fixture(options: EmbeddedOptions) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bus.db");
    let broker = open(&path, options).await;
    broker.bind(QUEUE, &[Pinged::TYPE]).await.unwrap();
    Fixture {
        _dir: dir,
        path,
        broker,
    }
}

async fn open(
    path: &std::path::Path,
    options: EmbeddedOptions,
) -> EmbeddedBroker {
    let db = Database::open(path).await.unwrap();
    EmbeddedBroker::open(db, options).await.unwrap()
}

fn ping(n: u32) -> Envelope {
    Envelope::new("/test", &Pinged { n }, None).unwrap()
}

/// Options under which only an in-process wake-up can deliver promptly.
fn no_polling() -> EmbeddedOptions {
    EmbeddedOptions {
        poll_interval: Duration::from_secs(3600),
        ..EmbeddedOptions::default()
    }
}

async fn receive_one(broker: &EmbeddedBroker) -> Delivery {
    let batch =
        tokio::time::timeout(Duration::from_secs(10), broker.receive(QUEUE, 1))
            .await
            .expect("a message arrives")
            .unwrap();
    assert_eq!(batch.len(), 1);
    batch.into_iter().next().unwrap()
}

#[tokio::test]
async fn a_published_event_survives_a_reopen_and_is_delivered_whole() {
    let fx = fixture(no_polling()).await;
    let sent = ping(7);
    fx.broker.publish(&sent).await.unwrap();
    fx.broker.database().close().await;

    let reopened = open(&fx.path, no_polling()).await;
    let delivery = receive_one(&reopened).await;
    assert_eq!(delivery.envelope, sent);
    assert_eq!(delivery.attempt, 1);
    assert_eq!(
        delivery.envelope.decode::<Pinged>().unwrap(),
        Pinged { n: 7 }
    );
}

#[tokio::test]
async fn an_event_no_queue_is_bound_to_is_refused() {
    let fx = fixture(no_polling()).await;
    let mut envelope = ping(1);
    envelope.event_type = "test.nobody.v1".into();
    let error = fx.broker.publish(&envelope).await.unwrap_err();
    assert!(matches!(error, BusError::Unroutable { .. }), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_publishes_each_get_their_own_outcome() {
    let fx = fixture(no_polling()).await;
    let mut publishes = tokio::task::JoinSet::new();
    for n in 0..100 {
        let broker = fx.broker.clone();
        let mut envelope = ping(n);
        if n == 42 {
            envelope.event_type = "test.nobody.v1".into();
        }
        publishes.spawn(async move { (n, broker.publish(&envelope).await) });
    }
    let outcomes = publishes.join_all().await;

    for (n, outcome) in &outcomes {
        match (n, outcome) {
            (42, Err(BusError::Unroutable { .. })) => {}
            (42, other) => panic!("the unroutable publish gave {other:?}"),
            (_, Ok(())) => {}
            (n, Err(error)) => panic!("publish {n} failed: {error}"),
        }
    }
    assert_eq!(fx.broker.depth(QUEUE).await.unwrap(), 99);
}

#[tokio::test]
async fn an_event_staged_in_a_rolled_back_transaction_never_exists() {
    let fx = fixture(no_polling()).await;
    let mut tx = fx.broker.database().begin().await.unwrap();
    EmbeddedBroker::stage(&mut tx, &ping(1)).await.unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(fx.broker.depth(QUEUE).await.unwrap(), 0);
}

#[tokio::test]
async fn a_waiting_consumer_is_woken_by_a_publish_without_polling() {
    let fx = fixture(no_polling()).await;
    let broker = fx.broker.clone();
    let waiting = tokio::spawn(async move { receive_one(&broker).await });
    tokio::time::sleep(Duration::from_millis(100)).await;

    fx.broker.publish(&ping(1)).await.unwrap();
    let delivery = waiting.await.unwrap();
    assert_eq!(delivery.envelope.decode::<Pinged>().unwrap().n, 1);
}

#[tokio::test]
async fn every_bound_queue_gets_its_own_copy() {
    let fx = fixture(no_polling()).await;
    fx.broker.bind("audit", &[Pinged::TYPE]).await.unwrap();
    fx.broker.publish(&ping(1)).await.unwrap();
    assert_eq!(fx.broker.depth(QUEUE).await.unwrap(), 1);
    assert_eq!(fx.broker.depth("audit").await.unwrap(), 1);
}

#[tokio::test]
async fn a_leased_message_is_invisible_until_its_holder_dies() {
    let options = EmbeddedOptions {
        lease: Duration::from_secs(2),
        poll_interval: Duration::from_millis(50),
    };
    let fx = fixture(options).await;
    fx.broker.publish(&ping(1)).await.unwrap();
    let first = receive_one(&fx.broker).await;

    // Another process opens the same file: the lease is still renewed by
    // the first broker, so nothing is offered to the second.
    let other = open(&fx.path, options).await;
    let early = tokio::time::timeout(
        Duration::from_millis(2500),
        other.receive(QUEUE, 1),
    )
    .await;
    assert!(early.is_err(), "a renewed lease kept the message held");

    // The holder dies without settling: its lease runs out and the
    // message comes back, with the attempt counted.
    drop(fx.broker);
    let again = receive_one(&other).await;
    assert_eq!(again.envelope.id, first.envelope.id);
    assert_eq!(again.attempt, 2);
}

#[tokio::test]
async fn a_retried_message_comes_back_after_its_delay_with_the_next_attempt() {
    let fx = fixture(no_polling()).await;
    fx.broker.publish(&ping(1)).await.unwrap();
    let first = receive_one(&fx.broker).await;
    fx.broker
        .retry(&first, Duration::from_millis(300), "not yet")
        .await
        .unwrap();

    let started = std::time::Instant::now();
    let second = receive_one(&fx.broker).await;
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(second.envelope.id, first.envelope.id);
    assert_eq!(second.attempt, 2);
}

#[tokio::test]
async fn an_acked_message_is_gone() {
    let fx = fixture(no_polling()).await;
    fx.broker.publish(&ping(1)).await.unwrap();
    let delivery = receive_one(&fx.broker).await;
    fx.broker.ack(&delivery).await.unwrap();
    assert_eq!(fx.broker.depth(QUEUE).await.unwrap(), 0);
    let twice = fx.broker.ack(&delivery).await.unwrap_err();
    assert!(matches!(twice, BusError::LeaseLost { .. }), "{twice}");
}

#[tokio::test]
async fn a_dead_letter_keeps_the_message_the_reason_and_the_attempts() {
    let fx = fixture(no_polling()).await;
    let sent = ping(1);
    fx.broker.publish(&sent).await.unwrap();
    let delivery = receive_one(&fx.broker).await;
    fx.broker
        .dead_letter(&delivery, "bad payload")
        .await
        .unwrap();

    assert_eq!(fx.broker.depth(QUEUE).await.unwrap(), 0);
    let dead = fx.broker.dead_letters(QUEUE).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].envelope, sent);
    assert_eq!(dead[0].reason, "bad payload");
    assert_eq!(dead[0].attempts, 1);
}

/// A handler whose behaviour each test scripts, reporting what it saw.
struct Scripted {
    calls: AtomicU32,
    seen: mpsc::UnboundedSender<(u32, u32)>,
    behaviour: Box<dyn Fn(u32) -> Behaviour + Send + Sync>,
}

#[derive(Clone, Copy)]
enum Behaviour {
    Succeed,
    FailTransiently,
    FailPermanently,
    Panic,
    Hang,
}

impl Handler for Scripted {
    fn handle<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            let n = delivery.envelope.decode::<Pinged>().unwrap().n;
            let _ = self.seen.send((n, delivery.attempt));
            match (self.behaviour)(call) {
                Behaviour::Succeed => Ok(()),
                Behaviour::FailTransiently => {
                    Err(HandlerError::transient("try later"))
                }
                Behaviour::FailPermanently => {
                    Err(HandlerError::permanent("never"))
                }
                Behaviour::Panic => panic!("handler bug"),
                Behaviour::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    Ok(())
                }
            }
        })
    }
}

struct RunningWorker {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), BusError>>,
    seen: mpsc::UnboundedReceiver<(u32, u32)>,
}

/// Behaves as `first` on the first call, then succeeds.
fn first_call(first: Behaviour) -> impl Fn(u32) -> Behaviour {
    move |call| if call == 1 { first } else { Behaviour::Succeed }
}

fn start_worker(
    broker: &EmbeddedBroker,
    behaviour: impl Fn(u32) -> Behaviour + Send + Sync + 'static,
    options: WorkerOptions,
) -> RunningWorker {
    let (tx, seen) = mpsc::unbounded_channel();
    let handler = Arc::new(Scripted {
        calls: AtomicU32::new(0),
        seen: tx,
        behaviour: Box::new(behaviour),
    });
    let (stop, mut stopped) = watch::channel(false);
    let subscription = Subscription {
        service: Some("test"),
        queue: QUEUE.into(),
        event_types: vec![Pinged::TYPE],
        options,
    };
    let task = tokio::spawn(worker::run(
        Arc::new(broker.clone()),
        subscription,
        handler,
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    RunningWorker { stop, task, seen }
}

fn quick_retries(max_attempts: u32) -> WorkerOptions {
    WorkerOptions {
        retry: RetryPolicy {
            max_attempts,
            base: Duration::from_millis(10),
            cap: Duration::from_millis(50),
        },
        handler_timeout: Duration::from_millis(300),
        ..WorkerOptions::default()
    }
}

async fn wait_for_dead_letters(
    broker: &EmbeddedBroker,
    count: usize,
) -> Vec<herald::DeadLetter> {
    for _ in 0..200 {
        let dead = broker.dead_letters(QUEUE).await.unwrap();
        if dead.len() >= count {
            return dead;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("expected {count} dead letters");
}

#[tokio::test]
async fn a_worker_acks_what_its_handler_handled() {
    let fx = fixture(no_polling()).await;
    let mut worker =
        start_worker(&fx.broker, |_| Behaviour::Succeed, quick_retries(3));
    for n in 0..50 {
        fx.broker.publish(&ping(n)).await.unwrap();
    }
    let mut handled = Vec::new();
    while handled.len() < 50 {
        handled.push(worker.seen.recv().await.unwrap().0);
    }
    handled.sort();
    assert_eq!(handled, (0..50).collect::<Vec<_>>());

    worker.stop.send(true).unwrap();
    worker.task.await.unwrap().unwrap();
    assert_eq!(fx.broker.depth(QUEUE).await.unwrap(), 0);
}

#[tokio::test]
async fn transient_failures_are_retried_until_the_last_attempt_then_dead_lettered()
 {
    let fx = fixture(no_polling()).await;
    let mut worker = start_worker(
        &fx.broker,
        |_| Behaviour::FailTransiently,
        quick_retries(3),
    );
    fx.broker.publish(&ping(1)).await.unwrap();

    let dead = wait_for_dead_letters(&fx.broker, 1).await;
    let attempts: Vec<u32> =
        std::iter::from_fn(|| worker.seen.try_recv().ok().map(|s| s.1))
            .collect();
    assert_eq!(attempts, vec![1, 2, 3]);
    assert_eq!(dead[0].attempts, 3);
    assert!(dead[0].reason.contains("try later"), "{}", dead[0].reason);
}

#[tokio::test]
async fn a_transient_failure_that_passes_is_handled_on_a_later_attempt() {
    let fx = fixture(no_polling()).await;
    let mut worker = start_worker(
        &fx.broker,
        |call| {
            if call < 3 {
                Behaviour::FailTransiently
            } else {
                Behaviour::Succeed
            }
        },
        quick_retries(5),
    );
    fx.broker.publish(&ping(1)).await.unwrap();
    let attempts: Vec<u32> = [
        worker.seen.recv().await.unwrap().1,
        worker.seen.recv().await.unwrap().1,
        worker.seen.recv().await.unwrap().1,
    ]
    .into();
    assert_eq!(attempts, vec![1, 2, 3]);
    worker.stop.send(true).unwrap();
    worker.task.await.unwrap().unwrap();
    assert_eq!(fx.broker.depth(QUEUE).await.unwrap(), 0);
    assert!(fx.broker.dead_letters(QUEUE).await.unwrap().is_empty());
}

#[tokio::test]
async fn a_permanent_failure_is_dead_lettered_at_once() {
    let fx = fixture(no_polling()).await;
    let mut worker = start_worker(
        &fx.broker,
        |_| Behaviour::FailPermanently,
        quick_retries(8),
    );
    fx.broker.publish(&ping(1)).await.unwrap();
    let dead = wait_for_dead_letters(&fx.broker, 1).await;
    assert_eq!(dead[0].attempts, 1);
    assert_eq!(dead[0].reason, "never");
    assert_eq!(worker.seen.try_recv().unwrap(), (1, 1));
}

#[tokio::test]
async fn a_panicking_handler_fails_its_message_but_not_the_worker() {
    let fx = fixture(no_polling()).await;
    let mut worker = start_worker(
        &fx.broker,
        first_call(Behaviour::Panic),
        quick_retries(3),
    );
    fx.broker.publish(&ping(1)).await.unwrap();
    assert_eq!(worker.seen.recv().await.unwrap(), (1, 1));
    assert_eq!(worker.seen.recv().await.unwrap(), (1, 2));
    fx.broker.publish(&ping(2)).await.unwrap();
    assert_eq!(worker.seen.recv().await.unwrap(), (2, 1));
    assert!(!worker.task.is_finished());
}

#[tokio::test]
async fn a_handler_that_runs_out_of_time_is_retried() {
    let fx = fixture(no_polling()).await;
    let mut worker =
        start_worker(&fx.broker, first_call(Behaviour::Hang), quick_retries(3));
    fx.broker.publish(&ping(1)).await.unwrap();
    assert_eq!(worker.seen.recv().await.unwrap(), (1, 1));
    assert_eq!(worker.seen.recv().await.unwrap(), (1, 2));
}

#[tokio::test]
async fn shutdown_waits_for_handlers_in_flight_then_hands_back_the_rest() {
    let fx = fixture(no_polling()).await;
    let options = WorkerOptions {
        shutdown_grace: Duration::from_millis(200),
        handler_timeout: Duration::from_secs(3600),
        ..WorkerOptions::default()
    };
    let mut worker = start_worker(&fx.broker, |_| Behaviour::Hang, options);
    fx.broker.publish(&ping(1)).await.unwrap();
    worker.seen.recv().await.unwrap();

    worker.stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), worker.task)
        .await
        .expect("the worker stops after its grace period")
        .unwrap()
        .unwrap();
    // Not acknowledged, and handed back: delivered again at once (the
    // lease of 30 s has not run out), the stopped attempt not counted.
    assert_eq!(fx.broker.depth(QUEUE).await.unwrap(), 1);
    let again = receive_one(&fx.broker).await;
    assert_eq!(again.envelope.decode::<Pinged>().unwrap().n, 1);
    assert_eq!(again.attempt, 1);
}

/// Records the order it handles events in, by key, with the attempt;
/// fails the first attempt at the event numbered `fail_first`.
struct Ordered {
    handled: std::sync::Mutex<Vec<(String, u32, u32)>>,
    fail_first: u32,
}

impl Handler for Ordered {
    fn handle<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let n = delivery.envelope.decode::<Pinged>().unwrap().n;
            if n == self.fail_first && delivery.attempt == 1 {
                return Err(HandlerError::Transient {
                    reason: "not yet".into(),
                    // Long enough that key b, not held back, is done
                    // well before, however busy the machine.
                    retry_after: Some(Duration::from_secs(3)),
                });
            }
            let key = delivery.envelope.subject.clone().unwrap_or_default();
            self.handled
                .lock()
                .unwrap()
                .push((key, n, delivery.attempt));
            Ok(())
        })
    }
}

fn keyed(key: &str, n: u32) -> Envelope {
    let mut envelope = ping(n);
    envelope.subject = Some(key.to_owned());
    envelope
}

#[tokio::test]
async fn a_failing_event_holds_back_only_the_later_events_of_its_key() {
    let fx = fixture(EmbeddedOptions::default()).await;
    let handler = Arc::new(Ordered {
        handled: std::sync::Mutex::new(Vec::new()),
        fail_first: 1,
    });
    let subscription = Subscription {
        service: Some("test"),
        queue: QUEUE.into(),
        event_types: vec![Pinged::TYPE],
        options: WorkerOptions {
            per_key_order: true,
            concurrency: 16,
            ..WorkerOptions::default()
        },
    };
    let (stop, mut stopped) = watch::channel(false);
    let running = tokio::spawn(worker::run(
        Arc::new(fx.broker.clone()),
        subscription,
        handler.clone(),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));
    // Key a: 1 (fails once), 2, 3. Key b: 4, 5, 6, published in between.
    for (key, n) in [("a", 1), ("b", 4), ("a", 2), ("b", 5), ("a", 3), ("b", 6)]
    {
        fx.broker.publish(&keyed(key, n)).await.unwrap();
    }
    for _ in 0..600 {
        if handler.handled.lock().unwrap().len() == 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.send(true).unwrap();
    running.await.unwrap().unwrap();

    let handled = handler.handled.lock().unwrap().clone();
    let of = |key: &str| -> Vec<u32> {
        handled.iter().filter(|h| h.0 == key).map(|h| h.1).collect()
    };
    assert_eq!(of("a"), [1, 2, 3], "{handled:?}");
    assert_eq!(of("b"), [4, 5, 6], "{handled:?}");
    // Key b did not wait for key a's retry: all of b came before a's 1,
    // which was handled on its second attempt.
    let first_a = handled.iter().position(|h| h.0 == "a").unwrap();
    assert_eq!(handled[first_a].2, 2, "{handled:?}");
    assert!(first_a >= 3, "b waited for a: {handled:?}");
}
