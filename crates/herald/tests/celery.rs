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

#[tokio::test]
#[ignore = "needs RabbitMQ and Python: set HERALD_TEST_AMQP_URL"]
async fn a_task_herald_sends_is_run_by_the_python_worker_and_its_result_comes_back()
 {
    let vhost = TestVhost::create().unwrap();
    let smtp = SmtpServer::start().unwrap();
    let _worker = CeleryWorker::start(vhost.url(), smtp.address()).unwrap();
    let client = CeleryClient::connect(vhost.url()).await.unwrap();

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
    let vhost = TestVhost::create().unwrap();
    let smtp = SmtpServer::start().unwrap();
    let _worker = CeleryWorker::start(vhost.url(), smtp.address()).unwrap();
    let client = CeleryClient::connect(vhost.url()).await.unwrap();

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
    let vhost = TestVhost::create().unwrap();
    let smtp = SmtpServer::start().unwrap();
    let _worker = CeleryWorker::start(vhost.url(), smtp.address()).unwrap();
    let client = CeleryClient::connect(vhost.url()).await.unwrap();

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
