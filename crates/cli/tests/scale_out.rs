//! Each service in its own processes, over a real RabbitMQ and a real
//! PostgreSQL. Set HERALD_TEST_AMQP_URL and HERALD_TEST_POSTGRES_URL and
//! run with `cargo test -- --include-ignored`.
//!
//! These tests disturb the servers (closing every connection, stopping
//! them), so they take turns.

mod support;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use support::{Herald, WAIT};
use testkit::postgres::TestDatabase;
use tokio::sync::{Mutex, MutexGuard};

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

/// Two users replicas and two mailer replicas, each a process with a data
/// directory of its own, sharing RabbitMQ and one PostgreSQL database;
/// the mailers write to one shared Maildir.
struct Cluster {
    users: Vec<Herald>,
    mailers: Vec<Herald>,
    mail: tempfile::TempDir,
    _dirs: Vec<tempfile::TempDir>,
    database: TestDatabase,
}

impl Cluster {
    fn start() -> Cluster {
        let url = amqp_url();
        let database = TestDatabase::create();
        let shared = ["--broker", url.as_str(), "--database", database.url()];
        let mail = tempfile::tempdir().unwrap();
        let mail_dir = mail.path().to_str().unwrap().to_owned();
        let mut dirs = Vec::new();
        let mut mailers = Vec::new();
        for _ in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            let args = [&shared[..], &["--mail-dir", mail_dir.as_str()]];
            mailers.push(Herald::serve_mailer(dir.path(), &args.concat()));
            dirs.push(dir);
        }
        let mut users = Vec::new();
        for _ in 0..2 {
            let dir = tempfile::tempdir().unwrap();
            users.push(Herald::serve_users(dir.path(), &shared));
            dirs.push(dir);
        }
        Cluster {
            users,
            mailers,
            mail,
            _dirs: dirs,
            database,
        }
    }

    /// The users the replicas stored.
    fn stored_users(&self) -> usize {
        let count = self.database.query("SELECT count(*) FROM users");
        count.unwrap().parse().unwrap()
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
#[ignore = "needs RabbitMQ and PostgreSQL: set HERALD_TEST_AMQP_URL and \
            HERALD_TEST_POSTGRES_URL"]
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
#[ignore = "needs RabbitMQ and PostgreSQL: set HERALD_TEST_AMQP_URL and \
            HERALD_TEST_POSTGRES_URL"]
async fn consumption_resumes_after_the_broker_closes_every_connection() {
    let (_turn, cluster, run) = working_cluster().await;

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
#[ignore = "needs RabbitMQ and PostgreSQL: set HERALD_TEST_AMQP_URL and \
            HERALD_TEST_POSTGRES_URL"]
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
#[ignore = "needs RabbitMQ and PostgreSQL: set HERALD_TEST_AMQP_URL and \
            HERALD_TEST_POSTGRES_URL"]
async fn registrations_made_while_rabbitmq_is_stopped_are_mailed_once_it_is_back()
 {
    let (_turn, cluster, run) = working_cluster().await;

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

/// Runs `pg_ctlcluster` on this machine's cluster.
fn pg_ctlcluster(action: &str) -> std::process::Output {
    let versions = std::fs::read_dir("/etc/postgresql").unwrap();
    let mut versions: Vec<String> = versions
        .map(|v| v.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    versions.sort_by_key(|v| v.parse::<u32>().unwrap_or(0));
    let version = versions.last().expect("a PostgreSQL cluster");
    Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", version, "main", action])
        .args(if action == "stop" {
            &["-m", "fast"][..]
        } else {
            &[]
        })
        .output()
        .expect("pg_ctlcluster runs")
}

/// Starts PostgreSQL again however the test ends.
struct StartPostgresOnDrop;

impl Drop for StartPostgresOnDrop {
    fn drop(&mut self) {
        let _ = pg_ctlcluster("start");
    }
}

/// What a stream of registrations was told.
#[derive(Debug, Default)]
struct Answers {
    created: usize,
    unavailable: usize,
    other: Vec<(u16, serde_json::Value)>,
}

/// Registers users one after another, on alternating replicas, until
/// `stop` is set (at most 5000, for at most two minutes).
async fn keep_registering(
    bases: Vec<String>,
    run: String,
    stop: Arc<AtomicBool>,
) -> Answers {
    let client = support::client();
    let mut answers = Answers::default();
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    for i in 1_000..6_000 {
        if stop.load(Ordering::Relaxed) || std::time::Instant::now() > deadline
        {
            break;
        }
        let base = &bases[i % bases.len()];
        let response = client
            .post(format!("{base}/user/register"))
            .json(&user(&run, i))
            .send()
            .await
            .expect("the users service answers");
        let status = response.status().as_u16();
        let body: serde_json::Value = response.json().await.unwrap_or_default();
        match status {
            201 => answers.created += 1,
            503 if body["error"]["code"] == "unavailable" => {
                answers.unavailable += 1
            }
            _ => answers.other.push((status, body)),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    answers
}

#[tokio::test]
#[ignore = "needs RabbitMQ and PostgreSQL: set HERALD_TEST_AMQP_URL and \
            HERALD_TEST_POSTGRES_URL"]
async fn postgresql_restarted_under_load_gives_clear_503s_then_recovers() {
    let (_turn, cluster, run) = working_cluster().await;

    let stop = Arc::new(AtomicBool::new(false));
    let bases = cluster.users.iter().map(|u| u.base().to_owned()).collect();
    let load = tokio::spawn(keep_registering(bases, run.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(500)).await;

    let restart = StartPostgresOnDrop;
    let stopped = pg_ctlcluster("stop");
    assert!(stopped.status.success(), "{stopped:?}");

    // While it is down: a clear 503, and readiness says why.
    let (status, body) = cluster.users[0].register(user(&run, 999)).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let ready = support::client()
        .get(format!("{}/readyz", cluster.users[1].base()))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let ready: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(ready["checks"]["store"], false, "{ready}");
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = pg_ctlcluster("start");
    assert!(started.status.success(), "{started:?}");
    drop(restart);

    // Without restarting any herald process, registrations are taken
    // again.
    let deadline = std::time::Instant::now() + WAIT;
    let mut recovered = false;
    for i in 10_000.. {
        if cluster.users[i % 2].register(user(&run, i)).await.0 == 201 {
            recovered = true;
            break;
        }
        if std::time::Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(recovered, "no registration was accepted after the restart");
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let answers = load.await.unwrap();
    assert!(answers.other.is_empty(), "{answers:?}");
    assert!(answers.unavailable > 0, "the load never met the outage");

    // Every stored user is mailed exactly once, and every accepted
    // registration was stored (one interrupted mid-commit may have been
    // stored though its client was told 503).
    let stored = cluster.stored_users();
    assert!(stored > 5 + answers.created, "{stored} {answers:?}");
    assert_emails(&cluster.new_mail(), stored, Duration::from_secs(120)).await;
}

/// A RabbitMQ virtual host of its own for a test, deleted at the end.
struct VirtualHost {
    name: String,
}

impl VirtualHost {
    fn create() -> VirtualHost {
        let name = format!("herald-test-{}", uuid::Uuid::new_v4().simple());
        for args in [
            vec!["add_vhost", name.as_str()],
            vec![
                "set_permissions",
                "-p",
                name.as_str(),
                "guest",
                ".*",
                ".*",
                ".*",
            ],
        ] {
            let done =
                Command::new("rabbitmqctl").args(&args).output().unwrap();
            assert!(done.status.success(), "{done:?}");
        }
        VirtualHost { name }
    }

    /// The test URL's server, on this virtual host.
    fn url(&self) -> String {
        let url = amqp_url();
        let server = url.rsplit_once('/').map_or(url.as_str(), |(s, _)| s);
        format!("{server}/{}", self.name)
    }
}

impl Drop for VirtualHost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_vhost", &self.name])
            .output();
    }
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn registrations_made_before_any_mailer_wait_and_no_log_shows_the_user() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let vhost = VirtualHost::create();
    let url = vhost.url();
    let users_dir = tempfile::tempdir().unwrap();
    let users = Herald::serve_users_logging(
        users_dir.path(),
        &["--broker", url.as_str()],
        "debug",
    );
    // It connects at start, not on its first publish, so readiness says
    // the broker is there before anything has been registered.
    let mut ready = serde_json::Value::Null;
    for _ in 0..100 {
        ready = support::client()
            .get(format!("{}/readyz", users.base()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if ready["checks"]["broker"] == true {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready["checks"]["broker"], true, "{ready}");

    let secret = "correct horse battery";
    let (status, body) = users
        .register(json!({
            "user_id": "early.bird@example.com",
            "user_name": "Early Bird",
            "user_password": secret,
        }))
        .await;
    assert_eq!(status, 201, "{body}");
    // No queue is bound yet: RabbitMQ returns the event, it stays in the
    // outbox, and none of it reaches the log.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let logs = users.logs();
    // Also as a list of byte values, the way a message dump shows them.
    let as_bytes = |text: &str| {
        let bytes: Vec<String> = text.bytes().map(|b| b.to_string()).collect();
        bytes.join(", ")
    };
    let address_bytes = as_bytes("early.bird");
    for private in [
        "early.bird",
        "Early Bird",
        secret,
        "$argon2",
        &address_bytes,
    ] {
        assert!(!logs.contains(private), "{private:?} in the log:\n{logs}");
    }
    assert!(logs.contains("no queue is bound"), "{logs}");

    let mail = tempfile::tempdir().unwrap();
    let mailer_dir = tempfile::tempdir().unwrap();
    let _mailer = Herald::serve_mailer(
        mailer_dir.path(),
        &[
            "--broker",
            url.as_str(),
            "--mail-dir",
            mail.path().to_str().unwrap(),
        ],
    );
    // The relay's backoff may have grown to its cap of 30 s meanwhile.
    assert_emails(&mail.path().join("new"), 1, Duration::from_secs(60)).await;
}

/// Takes this test's turn and starts a cluster, then sees five users
/// through it, so that the test begins from a system known to work.
async fn working_cluster() -> (MutexGuard<'static, ()>, Cluster, String) {
    let turn = ONE_AT_A_TIME.lock().await;
    purge_mailer_queue();
    let cluster = Cluster::start();
    let run = run_id();
    cluster.register(&run, 0..5).await;
    assert_emails(&cluster.new_mail(), 5, WAIT).await;
    (turn, cluster, run)
}

/// A prefix that keeps this run's users apart from earlier runs'.
fn run_id() -> String {
    format!("run-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn a_traceparent_crosses_rabbitmq_to_the_mailer_in_another_process() {
    const TRACE_ID: &str = "0af7651916cd43dd8448eb211c80319c";
    let _turn = ONE_AT_A_TIME.lock().await;
    let vhost = VirtualHost::create();
    let url = vhost.url();
    let (mail, mailer_dir, users_dir) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let mail_dir = mail.path().to_str().unwrap();
    let json = ["--log-format", "json", "--broker", url.as_str()];
    let mailer = Herald::serve_mailer_logging(
        mailer_dir.path(),
        &[&json[..], &["--mail-dir", mail_dir]].concat(),
        "info",
    );
    let users = Herald::serve_users_logging(users_dir.path(), &json, "info");

    let response = support::client()
        .post(format!("{}/user/register", users.base()))
        .header("traceparent", format!("00-{TRACE_ID}-b7ad6b7169203331-01"))
        .json(&user(&run_id(), 0))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    assert_emails(&mail.path().join("new"), 1, WAIT).await;

    // The mailer process continued the trace the users process was given,
    // as a child of the request's span, for the same event.
    let span_of = |logs: String, message: &str| {
        logs.lines()
            .map(serde_json::from_str::<serde_json::Value>)
            .map(|line| line.expect("every log line is JSON"))
            .find(|line| line["fields"]["message"] == message)
            .map(|line| line["span"].clone())
            .unwrap_or_else(|| panic!("no {message:?} in:\n{logs}"))
    };
    let request = span_of(users.logs(), "user registered");
    let handling = span_of(mailer.logs(), "welcome email sent");
    assert_eq!(request["trace_id"], TRACE_ID);
    assert_eq!(handling["trace_id"], TRACE_ID);
    assert_eq!(handling["parent_id"], request["span_id"]);
    assert_eq!(handling["event_id"], request["event_id"]);

    // Each process counts its own part: the users relay published it,
    // the mailer handled it.
    let published = [("type", "user.registered.v1")];
    let users_metrics = users.metrics().await;
    assert_eq!(
        support::metric(
            &users_metrics,
            "herald_outbox_relayed_total",
            &published
        ),
        1.0
    );
    assert_eq!(
        support::metric(
            &users_metrics,
            "herald_events_published_total",
            &published
        ),
        1.0
    );
    let success = [("service", "mailer"), ("outcome", "success")];
    let mut mailer_metrics = mailer.metrics().await;
    for _ in 0..100 {
        if support::metric(
            &mailer_metrics,
            "herald_events_handled_total",
            &success,
        ) == 1.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        mailer_metrics = mailer.metrics().await;
    }
    assert_eq!(
        support::metric(
            &mailer_metrics,
            "herald_events_handled_total",
            &success
        ),
        1.0
    );
    assert_eq!(
        support::metric(&mailer_metrics, "herald_broker_connected", &[]),
        1.0
    );
}
