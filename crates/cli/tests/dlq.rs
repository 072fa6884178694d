//! `herald dlq` against a real data directory, and against a real
//! RabbitMQ (HERALD_TEST_AMQP_URL, run with `--include-ignored`).

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use contracts::{Locale, UserRegistered};
use herald::broker::amqp::AmqpOptions;
use herald::broker::embedded::EmbeddedOptions;
use herald::sqlite::Database;
use herald::{AmqpBroker, Broker, EmbeddedBroker, Envelope, Event};
use serde_json::Value;
use support::{Herald, WAIT};
use uuid::Uuid;

/// Runs `herald dlq ARGS`; its exit status, stdout and stderr.
fn dlq(args: &[&str]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("dlq")
        .args(args)
        .env("HERALD_LOG", "warn")
        .output()
        .expect("herald runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `herald dlq ARGS --json`, which must succeed.
fn dlq_json(args: &[&str]) -> Value {
    let (status, stdout, stderr) = dlq(&[args, &["--json"]].concat());
    assert_eq!(status, 0, "{stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn registered(name: &str) -> Envelope {
    let event = UserRegistered {
        user_id: format!("{}@example.com", name.to_lowercase()),
        user_name: name.to_owned(),
        email: format!("{}@example.com", name.to_lowercase()),
        locale: Locale::English,
    };
    Envelope::new("/test", &event, None).unwrap()
}

/// Publishes `envelopes` on `broker`'s `queue` and dead-letters each as it
/// arrives, with `reason`.
async fn dead_letter_all(
    broker: &dyn Broker,
    queue: &str,
    envelopes: &[Envelope],
    reason: &str,
) {
    for envelope in envelopes {
        broker.publish(envelope).await.unwrap();
        let batch = tokio::time::timeout(WAIT, broker.receive(queue, 1))
            .await
            .expect("the message arrives")
            .unwrap();
        broker.dead_letter(&batch[0], reason).await.unwrap();
    }
}

/// A data directory whose mailer queue holds the dead letters of
/// `envelopes`, as the mailer would have left them.
async fn data_dir_with_dead_letters(dir: &Path, envelopes: &[Envelope]) {
    let db = Database::open(&dir.join("herald.db")).await.unwrap();
    let broker = EmbeddedBroker::open(db.clone(), EmbeddedOptions::default())
        .await
        .unwrap();
    broker
        .bind(mailer::QUEUE, &[UserRegistered::TYPE])
        .await
        .unwrap();
    dead_letter_all(&broker, mailer::QUEUE, envelopes, "550 5.1.1 refused")
        .await;
    db.close().await;
}

#[tokio::test]
async fn dead_letters_are_listed_shown_replayed_to_a_running_mailer_and_purged()
{
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (alice, bob) = (registered("Alice"), registered("Bob"));
    data_dir_with_dead_letters(dir.path(), &[alice.clone(), bob.clone()]).await;

    let listed = dlq_json(&["list", "--data-dir", data]);
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0]["id"], alice.id.to_string());
    assert_eq!(listed[0]["event_type"], UserRegistered::TYPE);
    assert_eq!(listed[0]["queue"], "mailer");
    assert_eq!(listed[0]["attempts"], 1);
    assert_eq!(listed[0]["reason"], "550 5.1.1 refused");
    assert!(listed[0]["first_failed_at"].is_string());
    assert!(listed[0]["last_failed_at"].is_string());

    let shown = dlq_json(&["show", &bob.id.to_string(), "--data-dir", data]);
    // The payload exactly as it was sent.
    let payload = shown["payload"].as_str().unwrap();
    assert_eq!(payload.as_bytes(), bob.data.as_slice());
    assert_eq!(shown["source"], "/test");
    let (status, text, _) = dlq(&["list", "--data-dir", data]);
    assert_eq!(status, 0);
    assert!(text.contains(&alice.id.to_string()), "{text}");

    // A running system picks a replayed letter up and mails it.
    let _herald = Herald::start(dir.path(), &[]);
    let replayed =
        dlq_json(&["replay", &alice.id.to_string(), "--data-dir", data]);
    assert_eq!(replayed["replayed"]["mailer"], 1);
    let new = dir.path().join("mail/new");
    let deadline = std::time::Instant::now() + WAIT;
    while testkit::count_files(&new) < 1 && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(testkit::count_files(&new), 1);

    let purged = dlq_json(&["purge", "--all", "--data-dir", data]);
    assert_eq!(purged["purged"]["mailer"], 1);
    assert_eq!(
        dlq_json(&["list", "--data-dir", data]),
        Value::Array(vec![])
    );
}

#[test]
fn an_unknown_id_or_a_missing_data_directory_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("never-ran");
    let missing = missing.to_str().unwrap();
    let (status, _, stderr) = dlq(&["list", "--data-dir", missing]);
    assert_eq!(status, 1);
    assert!(stderr.contains("no herald database"), "{stderr}");
    assert!(!Path::new(missing).exists(), "dlq created {missing}");

    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(data_dir_with_dead_letters(dir.path(), &[]));
    let data = dir.path().to_str().unwrap();
    let unknown = Uuid::new_v4().to_string();
    for command in ["show", "replay", "purge"] {
        let (status, _, stderr) = dlq(&[command, &unknown, "--data-dir", data]);
        assert_eq!(status, 1, "{command}: {stderr}");
        assert!(stderr.contains("no dead letter"), "{command}: {stderr}");
    }
    let (status, _, stderr) = dlq(&["replay", "--data-dir", data]);
    assert_eq!(status, 2, "replay needs an id or --all: {stderr}");
}

#[tokio::test]
#[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
async fn dead_letters_on_rabbitmq_are_listed_and_replayed_to_their_queue() {
    let url = std::env::var("HERALD_TEST_AMQP_URL")
        .expect("needs RabbitMQ: set HERALD_TEST_AMQP_URL");
    let unique = Uuid::new_v4().simple().to_string();
    let queue = format!("herald-test-{unique}");
    let event_type = format!("test.registered.{unique}");
    let broker = AmqpBroker::connect(&url, AmqpOptions::default())
        .await
        .unwrap();
    broker.bind(&queue, &[event_type.as_str()]).await.unwrap();
    let mut sent = vec![registered("Carol"), registered("Dave")];
    for envelope in &mut sent {
        envelope.event_type = event_type.clone();
    }
    dead_letter_all(&broker, &queue, &sent, "refused").await;

    let target = ["--broker", url.as_str(), "--queue", queue.as_str()];
    let listed = dlq_json(&[&["list"][..], &target].concat());
    let ids: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [sent[0].id.to_string(), sent[1].id.to_string()]);

    let replayed = dlq_json(&[&["replay", "--all"][..], &target].concat());
    assert_eq!(replayed["replayed"][queue.as_str()], 2);
    for _ in 0..2 {
        let batch = tokio::time::timeout(WAIT, broker.receive(&queue, 1))
            .await
            .expect("a replayed message arrives")
            .unwrap();
        assert_eq!(batch[0].attempt, 1);
        broker.ack(&batch[0]).await.unwrap();
    }
    let listed = dlq_json(&[&["list"][..], &target].concat());
    assert_eq!(listed, Value::Array(vec![]));

    broker.delete(&queue).await.unwrap();
    broker.close().await;
}
