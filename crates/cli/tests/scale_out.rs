//! Each service in its own processes, over a real RabbitMQ. Set
//! HERALD_TEST_AMQP_URL and run with `cargo test -- --include-ignored`.
//!
//! These tests disturb the broker (closing every connection, for one), so
//! they take turns.

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::json;
use support::{Herald, WAIT};
use tokio::sync::Mutex;

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

fn amqp_url() -> String {
    std::env::var("HERALD_TEST_AMQP_URL")
        .expect("needs RabbitMQ: set HERALD_TEST_AMQP_URL")
}

/// Empties the mailer's queue left by earlier runs, so counts are exact.
fn purge_mailer_queue() {
    let _ = Command::new("rabbitmqctl")
        .args(["purge_queue", "mailer"])
        .output();
}

fn user(run: &str, i: usize) -> serde_json::Value {
    json!({
        "user_id": format!("{run}-{i}@example.com"),
        "user_name": format!("User {i}"),
        "user_password": "correct horse battery",
    })
}

/// Waits up to `limit` for `expected` emails in the Maildir folder `new`,
/// then a moment more for any duplicate to land, and checks that there
/// are exactly `expected`.
async fn assert_emails(new: &Path, expected: usize, limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while testkit::count_files(new) < expected
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(testkit::count_files(new), expected);
}

/// Two users replicas, two mailer replicas, each a process with a data
/// directory of its own; the mailers write to one shared Maildir.
struct Cluster {
    users: Vec<Herald>,
    mailers: Vec<Herald>,
    mail: tempfile::TempDir,
    _dirs: Vec<tempfile::TempDir>,
}

impl Cluster {
    fn start() -> Cluster {
        let url = amqp_url();
        let mail = tempfile::tempdir().unwrap();
        let mail_dir = mail.path().to_str().unwrap().to_owned();
        let mut dirs = Vec::new();
        let mut mailers = Vec::new();
        for _ in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let args =
                ["--broker", url.as_str(), "--mail-dir", mail_dir.as_str()];
            mailers.push(Herald::serve_mailer(dir.path(), &args));
            dirs.push(dir);
        }
        let mut users = Vec::new();
        for _ in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            users.push(Herald::serve_users(
                dir.path(),
                &["--broker", url.as_str()],
            ));
            dirs.push(dir);
        }
        Cluster {
            users,
            mailers,
            mail,
            _dirs: dirs,
        }
    }

    fn new_mail(&self) -> std::path::PathBuf {
        self.mail.path().join("new")
    }

    /// Registers `count` users, alternating replicas; every one must be
    /// accepted.
    async fn register(&self, run: &str, range: std::ops::Range<usize>) {
        for i in range {
            let replica = &self.users[i % self.users.len()];
            let (status, body) = replica.register(user(run, i)).await;
            assert_eq!(status, 201, "{body}");
        }
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn two_users_and_two_mailer_replicas_send_exactly_one_email_each() {
    let _turn = ONE_AT_A_TIME.lock().await;
    purge_mailer_queue();
    let cluster = Cluster::start();
    let run = run_id();
    const N: usize = 40;
    cluster.register(&run, 0..N).await;

    assert_emails(&cluster.new_mail(), N, WAIT).await;

    // Readiness reports the broker the outbox is relayed to.
    let ready: serde_json::Value = support::client()
        .get(format!("{}/readyz", cluster.users[0].base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["checks"]["broker"], true, "{ready}");
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn consumption_resumes_after_the_broker_closes_every_connection() {
    let _turn = ONE_AT_A_TIME.lock().await;
    purge_mailer_queue();
    let cluster = Cluster::start();
    let run = run_id();
    cluster.register(&run, 0..5).await;
    assert_emails(&cluster.new_mail(), 5, WAIT).await;

    let closed = Command::new("rabbitmqctl")
        .args(["close_all_connections", "herald test"])
        .output()
        .expect("rabbitmqctl runs");
    assert!(closed.status.success(), "{closed:?}");

    // No process is restarted: they reconnect and carry on.
    cluster.register(&run, 5..15).await;
    assert_emails(&cluster.new_mail(), 15, WAIT).await;
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_mailer_killed_mid_stream_loses_nothing() {
    let _turn = ONE_AT_A_TIME.lock().await;
    purge_mailer_queue();
    let mut cluster = Cluster::start();
    let run = run_id();
    const N: usize = 40;
    cluster.register(&run, 0..N / 2).await;
    cluster.mailers.remove(0).kill();
    cluster.register(&run, N / 2..N).await;

    assert_emails(&cluster.new_mail(), N, WAIT).await;
}

/// Starts RabbitMQ's application again however the test ends.
struct RestartOnDrop;

impl Drop for RestartOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl").arg("start_app").output();
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn registrations_made_while_rabbitmq_is_stopped_are_mailed_once_it_is_back()
 {
    let _turn = ONE_AT_A_TIME.lock().await;
    purge_mailer_queue();
    let cluster = Cluster::start();
    let run = run_id();
    cluster.register(&run, 0..5).await;
    assert_emails(&cluster.new_mail(), 5, WAIT).await;

    let restart = RestartOnDrop;
    let stopped = Command::new("rabbitmqctl")
        .arg("stop_app")
        .output()
        .unwrap();
    assert!(stopped.status.success(), "{stopped:?}");
    // Registrations are still accepted: they wait in the outbox.
    cluster.register(&run, 5..15).await;
    let started = Command::new("rabbitmqctl")
        .arg("start_app")
        .output()
        .unwrap();
    assert!(started.status.success(), "{started:?}");
    drop(restart);

    // No process restarted; each reconnects and the outbox drains. The
    // relay's backoff may have grown while the broker was away.
    assert_emails(&cluster.new_mail(), 15, Duration::from_secs(90)).await;
}

/// A prefix that keeps this run's users apart from earlier runs'.
fn run_id() -> String {
    format!("run-{}", uuid::Uuid::new_v4().simple())
}
