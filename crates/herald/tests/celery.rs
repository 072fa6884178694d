//! herald sending Celery tasks to the Python service's unchanged Celery
//! worker over a real RabbitMQ, and reading its results. Each test has a
//! RabbitMQ virtual host of its own. Set HERALD_TEST_AMQP_URL and run with
//! `cargo test -- --include-ignored`.

use std::time::Duration;

use herald::celery::{CeleryClient, Outcome, Send};
use serde_json::{Map, json};
use testkit::SmtpServer;
use testkit::celery::{CeleryWorker, TestVhost, WELCOME_TASK};

const WAIT: Duration = Duration::from_secs(30);

/// The Python service's unchanged Celery worker on a virtual host of its
/// own, sending to an SMTP server, and a herald client on that host.
struct PythonSide {
    client: CeleryClient,
    smtp: SmtpServer,
    _worker: CeleryWorker,
    _vhost: TestVhost,
}

impl PythonSide {
    async fn start() -> PythonSide {
        let vhost = TestVhost::create().unwrap();
        let smtp = SmtpServer::start().unwrap();
        let worker = CeleryWorker::start(vhost.url(), smtp.address()).unwrap();
        let client = CeleryClient::connect(vhost.url()).await.unwrap();
        PythonSide {
            client,
            smtp,
            _worker: worker,
            _vhost: vhost,
        }
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ and Python: set HERALD_TEST_AMQP_URL"]
async fn a_task_herald_sends_is_run_by_the_python_worker_and_its_result_comes_back()
 {
    let python = PythonSide::start().await;
    let (client, smtp) = (&python.client, &python.smtp);

    let args = vec![json!("hanmeimei@example.com"), json!("韩梅梅")];
    let sent = Send::task(WELCOME_TASK, args, Map::new());
    let id = client.send(sent).await.unwrap();
    let outcome = client.result(&id, WAIT).await;

    let expected = json!({
        "sent_to": "hanmeimei@example.com",
        "user_name": "韩梅梅",
    });
    assert_eq!(outcome, Some(Outcome::Success(expected)));
    let emails = smtp.wait_for(1, WAIT).unwrap();
    assert_eq!(emails[0].header("Subject"), Some("Welcome, 韩梅梅!"));
    client.close().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ and Python: set HERALD_TEST_AMQP_URL"]
async fn a_python_failure_reaches_herald_with_its_type_and_message() {
    let python = PythonSide::start().await;
    let client = &python.client;

    let mut kwargs = Map::new();
    kwargs.insert("user_id".into(), json!("no-address"));
    kwargs.insert("user_name".into(), json!("无名"));
    let id = client
        .send(Send::task(WELCOME_TASK, vec![], kwargs))
        .await
        .unwrap();

    match client.result(&id, WAIT).await {
        Some(Outcome::Failure { kind, message, .. }) => {
            assert_eq!(kind, "ValueError");
            assert!(message.contains("no email address"), "{message}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    client.close().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ and Python: set HERALD_TEST_AMQP_URL"]
async fn a_countdown_holds_the_task_until_its_time() {
    let python = PythonSide::start().await;
    let client = &python.client;

    let args = vec![json!("later@example.com"), json!("Later")];
    let sent = Send::task(WELCOME_TASK, args, Map::new())
        .countdown(Duration::from_secs(2));
    let started = std::time::Instant::now();
    let id = client.send(sent).await.unwrap();
    let outcome = client.result(&id, WAIT).await;

    assert!(matches!(outcome, Some(Outcome::Success(_))), "{outcome:?}");
    assert!(started.elapsed() >= Duration::from_millis(1900));
    client.close().await;
}

/// A Rust task that fails transiently until its third attempt, noting
/// the `retries` header of each attempt, or sleeps for `nap`.
struct Flaky {
    seen: std::sync::Mutex<Vec<u32>>,
    nap: Duration,
}

impl herald::celery::Task for Flaky {
    fn name(&self) -> &'static str {
        "tests.flaky"
    }

    fn run<'a>(
        &'a self,
        call: &'a herald::celery::Call,
    ) -> herald::broker::BoxFuture<
        'a,
        Result<serde_json::Value, herald::celery::TaskError>,
    > {
        Box::pin(async move {
            let retries = call.message.retries;
            self.seen.lock().unwrap().push(retries);
            tokio::time::sleep(self.nap).await;
            if retries < 2 {
                return Err(herald::HandlerError::transient("not yet").into());
            }
            Ok(json!({ "retries": retries }))
        })
    }
}

/// A herald Celery worker running [`Flaky`] on a virtual host of its own,
/// retrying within a fraction of a second, and a client on that host. The
/// worker stops when this is dropped.
struct RustSide {
    client: CeleryClient,
    task: std::sync::Arc<Flaky>,
    _stop: tokio::sync::oneshot::Sender<()>,
    _vhost: TestVhost,
}

impl RustSide {
    async fn start(nap: Duration, max_attempts: u32, slots: usize) -> Self {
        let vhost = TestVhost::create().unwrap();
        let task = std::sync::Arc::new(Flaky {
            seen: Default::default(),
            nap,
        });
        let options = herald::celery::CeleryOptions {
            concurrency: slots,
            retry: herald::RetryPolicy {
                max_attempts,
                base: Duration::from_millis(50),
                cap: Duration::from_millis(100),
            },
            ..herald::celery::CeleryOptions::default()
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (url, running) = (vhost.url().to_owned(), task.clone());
        tokio::spawn(async move {
            let tasks: Vec<std::sync::Arc<dyn herald::celery::Task>> =
                vec![running];
            herald::celery::serve(&url, tasks, options, async {
                let _ = stopped.await;
            })
            .await
        });
        let client = CeleryClient::connect(vhost.url()).await.unwrap();
        RustSide {
            client,
            task,
            _stop: stop,
            _vhost: vhost,
        }
    }

    fn seen(&self) -> Vec<u32> {
        self.task.seen.lock().unwrap().clone()
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_transient_failure_is_retried_as_celery_does_then_succeeds() {
    let rust = RustSide::start(Duration::ZERO, 5, 8).await;
    let client = &rust.client;

    let id = client
        .send(Send::task("tests.flaky", vec![], Map::new()))
        .await
        .unwrap();

    let outcome = client.result(&id, WAIT).await;
    assert_eq!(outcome, Some(Outcome::Success(json!({ "retries": 2 }))));
    assert_eq!(rust.seen(), vec![0, 1, 2]);
    client.close().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn the_time_limit_header_bounds_each_run_and_the_last_fails_the_task() {
    let rust = RustSide::start(Duration::from_secs(20), 2, 8).await;
    let client = &rust.client;

    let started = std::time::Instant::now();
    let sent = Send::task("tests.flaky", vec![], Map::new())
        .time_limits(Some(0.3), None);
    let id = client.send(sent).await.unwrap();

    match client.result(&id, WAIT).await {
        Some(Outcome::Failure { message, .. }) => {
            assert!(message.contains("timed out"), "{message}");
        }
        other => panic!("expected a failure, got {other:?}"),
    }
    // Two attempts of 0.3 s, not one of 20 s.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(rust.seen(), vec![0, 1]);
    client.close().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_task_that_expires_before_its_eta_is_revoked_and_not_run() {
    let rust = RustSide::start(Duration::ZERO, 5, 8).await;
    let client = &rust.client;

    // Due after it expires: held until its eta, then found expired.
    let expires = chrono::Utc::now() + chrono::Duration::seconds(1);
    let sent = Send::task("tests.flaky", vec![], Map::new())
        .expires(expires)
        .countdown(Duration::from_secs(2));
    let id = client.send(sent).await.unwrap();

    assert_eq!(client.result(&id, WAIT).await, Some(Outcome::Revoked));
    assert!(rust.seen().is_empty());
    client.close().await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_task_waiting_for_its_eta_holds_no_worker_slot() {
    // One slot: a task held until its eta would block the next.
    let rust = RustSide::start(Duration::ZERO, 5, 1).await;
    let client = &rust.client;

    let later = Send::task("tests.flaky", vec![], Map::new())
        .countdown(Duration::from_secs(20));
    client.send(later).await.unwrap();
    let started = std::time::Instant::now();
    let id = client
        .send(Send::task("tests.flaky", vec![], Map::new()))
        .await
        .unwrap();

    // The immediate task fails twice and succeeds on its third attempt,
    // all well before the first one's eta.
    let outcome = client.result(&id, WAIT).await;
    assert!(matches!(outcome, Some(Outcome::Success(_))), "{outcome:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    client.close().await;
}
