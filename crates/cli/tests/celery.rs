//! herald's mailer and Python's Celery sharing tasks over a real RabbitMQ:
//! an unchanged Python producer calls `send_welcome_email.delay(...)` and
//! waits for the result; herald runs the task. Each test has a RabbitMQ
//! virtual host of its own. Set HERALD_TEST_AMQP_URL and run with
//! `cargo test -- --include-ignored`.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::Herald;
use testkit::celery::{TestVhost, WELCOME_TASK, send_and_wait, send_pickled};

const WAIT: Duration = Duration::from_secs(30);

/// `herald serve mailer --celery` on the test's own virtual host.
fn mailer_with_celery(vhost: &TestVhost, mail: &std::path::Path) -> Herald {
    let data = tempfile::tempdir().unwrap().keep();
    let mail = mail.to_str().unwrap();
    Herald::serve_mailer(
        &data,
        &["--celery", "--broker", vhost.url(), "--mail-dir", mail],
    )
}

/// What Python's `send_welcome_email.delay(*args, **kwargs).get()` got.
async fn python_calls(vhost: &TestVhost, args: Value, kwargs: Value) -> Value {
    let url = vhost.url().to_owned();
    tokio::task::spawn_blocking(move || {
        send_and_wait(&url, WELCOME_TASK, args, kwargs, WAIT).unwrap()
    })
    .await
    .unwrap()
}

#[tokio::test]
#[ignore = "needs RabbitMQ and Python: set HERALD_TEST_AMQP_URL"]
async fn a_python_delay_is_mailed_by_herald_and_get_returns_its_result() {
    let vhost = TestVhost::create().unwrap();
    let mail = tempfile::tempdir().unwrap();
    let _mailer = mailer_with_celery(&vhost, mail.path());

    let report = python_calls(
        &vhost,
        json!(["lilei@example.com", "李雷"]),
        json!({"locale": "zh-CN"}),
    )
    .await;

    assert_eq!(report["status"], "SUCCESS", "{report}");
    assert_eq!(report["result"]["sent_to"], "lilei@example.com");
    assert_eq!(report["result"]["user_name"], "李雷");
    let emails =
        testkit::wait_for_mail(&mail.path().join("new"), 1, WAIT).unwrap();
    let text = emails[0].text.clone().unwrap_or_default();
    assert!(text.contains("李雷"), "{text}");
}

#[tokio::test]
#[ignore = "needs RabbitMQ and Python: set HERALD_TEST_AMQP_URL"]
async fn a_task_herald_cannot_mail_is_a_failure_python_raises() {
    let vhost = TestVhost::create().unwrap();
    let mail = tempfile::tempdir().unwrap();
    let _mailer = mailer_with_celery(&vhost, mail.path());

    // A numeric user id and no email: no address to send to.
    let report = python_calls(&vhost, json!([42, "李雷"]), json!({})).await;

    assert_eq!(report["status"], "FAILURE", "{report}");
    let message = report["exc_message"].as_str().unwrap_or_default();
    assert!(message.contains("no email address"), "{report}");
    assert_eq!(testkit::count_files(&mail.path().join("new")), 0);
}

#[tokio::test]
#[ignore = "needs RabbitMQ and Python: set HERALD_TEST_AMQP_URL"]
async fn unknown_tasks_and_pickled_bodies_end_in_the_dead_letters() {
    let vhost = TestVhost::create().unwrap();
    let mail = tempfile::tempdir().unwrap();
    let mailer = mailer_with_celery(&vhost, mail.path());

    let url = vhost.url().to_owned();
    let unknown = tokio::task::spawn_blocking(move || {
        send_and_wait(&url, "tasks.no_such_task", json!([1]), json!({}), WAIT)
            .unwrap()
    })
    .await
    .unwrap();
    // As Celery's own worker answers it.
    assert_eq!(unknown["status"], "FAILURE", "{unknown}");
    assert_eq!(unknown["exc_type"], "NotRegistered", "{unknown}");

    let url = vhost.url().to_owned();
    tokio::task::spawn_blocking(move || {
        send_pickled(
            &url,
            WELCOME_TASK,
            json!(["p@example.com", "P"]),
            json!({}),
        )
        .unwrap()
    })
    .await
    .unwrap();

    // Both wait in celery.dead, each with its reason; nothing was mailed.
    let mut reasons = Vec::new();
    for _ in 0..100 {
        reasons = dead_letter_reasons(&vhost);
        if reasons.len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reasons.len(), 2, "{reasons:?}\n{}", mailer.logs());
    assert!(
        reasons.iter().any(|r| r.contains("unknown task")),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("application/x-python-serialize")),
        "{reasons:?}"
    );
    assert_eq!(testkit::count_files(&mail.path().join("new")), 0);
}

/// The reasons of the dead letters in `celery.dead`, as `herald dlq`
/// lists them.
fn dead_letter_reasons(vhost: &TestVhost) -> Vec<String> {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["dlq", "list", "--queue", "celery", "--json"])
        .args(["--broker", vhost.url()])
        .arg("--data-dir")
        .arg(tempfile::tempdir().unwrap().path())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    let listed: Value = serde_json::from_slice(&output.stdout).unwrap();
    listed
        .as_array()
        .unwrap()
        .iter()
        .map(|letter| letter["reason"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
#[ignore = "needs RabbitMQ and Python: set HERALD_TEST_AMQP_URL"]
async fn a_registration_asks_the_unchanged_python_worker_for_the_welcome() {
    let vhost = TestVhost::create().unwrap();
    let smtp = testkit::SmtpServer::start().unwrap();
    let mut worker =
        testkit::celery::CeleryWorker::start(vhost.url(), smtp.address())
            .unwrap();
    let data = tempfile::tempdir().unwrap();
    let users = Herald::serve_users(
        data.path(),
        &["--welcome", "celery", "--broker", vhost.url()],
    );

    let (status, body) = users
        .register(json!({
            "user_id": "wangfang@example.com",
            "user_name": "王芳",
            "user_password": "correct horse battery",
            "locale": "zh-CN",
        }))
        .await;
    assert_eq!(status, 201, "{body}");

    // The Python worker ran it and sent the email, as it always did.
    let emails = smtp.wait_for(1, WAIT).unwrap();
    assert_eq!(emails[0].header("Subject"), Some("Welcome, 王芳!"));
    worker
        .wait_for_log("succeeded", WAIT)
        .unwrap_or_else(|e| panic!("{e}\n{}", worker.logs()));
    let logs = worker.logs();
    assert!(!logs.contains("ERROR"), "{logs}");
}

#[tokio::test]
#[ignore = "needs RabbitMQ and Python: set HERALD_TEST_AMQP_URL"]
async fn a_task_sent_twice_with_one_id_is_mailed_once() {
    use herald::celery::{CeleryClient, Outcome, Send};

    let vhost = TestVhost::create().unwrap();
    let mail = tempfile::tempdir().unwrap();
    let _mailer = mailer_with_celery(&vhost, mail.path());
    let client = CeleryClient::connect(vhost.url()).await.unwrap();

    let id = uuid::Uuid::new_v4().to_string();
    for _ in 0..2 {
        let args = vec![json!("twice@example.com"), json!("Twice")];
        let sent = Send::task(WELCOME_TASK, args, serde_json::Map::new())
            .id(id.clone());
        client.send(sent).await.unwrap();
        let outcome = client.result(&id, WAIT).await;
        assert!(matches!(outcome, Some(Outcome::Success(_))), "{outcome:?}");
    }

    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(testkit::count_files(&mail.path().join("new")), 1);
    client.close().await;
}
