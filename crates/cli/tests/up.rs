//! `herald up` as a user runs it: the real binary, a real HTTP client, a
//! real data directory, and for SMTP a real server on 127.0.0.1.

mod support;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Herald, WAIT, client};
use testkit::{ParsedEmail, SmtpServer};

fn user(i: usize) -> Value {
    json!({
        "user_id": format!("user{i}@example.com"),
        "user_name": format!("User {i}"),
        "user_password": "correct horse battery",
    })
}

async fn mail_in(dir: PathBuf, count: usize) -> Vec<ParsedEmail> {
    tokio::task::spawn_blocking(move || {
        testkit::wait_for_mail(&dir, count, WAIT)
    })
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test]
async fn a_registration_becomes_a_welcome_email_in_the_maildir() {
    let data = tempfile::tempdir().unwrap();
    let herald = Herald::start(data.path(), &[]);
    let (status, body) = herald
        .register(json!({
            "user_id": "alice@example.com",
            "user_name": "Alice",
            "user_password": "correct horse battery",
        }))
        .await;
    assert_eq!(status, 201, "{body}");

    let mail = mail_in(data.path().join("mail/new"), 1).await.remove(0);
    assert_eq!(mail.header("To"), Some("Alice <alice@example.com>"));
    assert_eq!(mail.header("Subject"), Some("Welcome to herald, Alice!"));
    assert!(mail.text.unwrap().contains("Hello Alice,"));
}

#[tokio::test]
async fn a_chinese_user_is_welcomed_in_chinese() {
    let data = tempfile::tempdir().unwrap();
    let herald = Herald::start(data.path(), &[]);
    let (status, body) = herald
        .register(json!({
            "user_id": "zhangwei",
            "user_name": "张伟",
            "user_password": "正确的马电池订书钉",
            "email": "wei@example.com",
            "locale": "zh-CN",
        }))
        .await;
    assert_eq!(
        (status, body["message"].as_str()),
        (201, Some("用户注册成功"))
    );

    let mail = mail_in(data.path().join("mail/new"), 1).await.remove(0);
    assert_eq!(mail.header("To"), Some("张伟 <wei@example.com>"));
    assert_eq!(mail.header("Subject"), Some("欢迎加入 herald，张伟！"));
    assert!(mail.text.unwrap().contains("张伟，您好！"));
}

#[tokio::test]
async fn twenty_concurrent_registrations_of_one_user_id_give_one_user_and_one_email()
 {
    let data = tempfile::tempdir().unwrap();
    let herald = Herald::start(data.path(), &[]);
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..20 {
        let url = format!("{}/user/register", herald.base());
        let body = json!({
            "user_id": "racer", "user_name": "Racer",
            "user_password": "correct horse battery",
            "email": format!("racer{i}@example.com"),
        });
        attempts.spawn(async move {
            client()
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
    }
    let statuses = attempts.join_all().await;
    let count = |code| statuses.iter().filter(|s| **s == code).count();
    assert_eq!((count(201), count(409)), (1, 19), "{statuses:?}");

    let new = data.path().join("mail/new");
    mail_in(new.clone(), 1).await;
    // Give a wrongly published second event time to show up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(testkit::count_files(&new), 1);
}

#[tokio::test]
async fn registrations_accepted_before_a_sigkill_are_mailed_once_after_a_restart()
 {
    let data = tempfile::tempdir().unwrap();
    // An SMTP port that accepts connections and never answers: the mailer
    // holds each delivery, mid-send, when the process is killed.
    let black_hole = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = black_hole.local_addr().unwrap().port();
    let smtp = format!("smtp://127.0.0.1:{port}");
    let args = ["--smtp", smtp.as_str(), "--lease-secs", "2"];

    let herald = Herald::start(data.path(), &args);
    const N: usize = 10;
    for i in 0..N {
        let (status, body) = herald.register(user(i)).await;
        assert_eq!(status, 201, "{body}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    herald.kill();
    drop(black_hole);

    // A real server on the same port, and herald started again: every
    // registration is mailed, once.
    let server =
        tokio::task::spawn_blocking(move || SmtpServer::start_on(port))
            .await
            .unwrap()
            .unwrap();
    let mut herald = Herald::start(data.path(), &args);
    let server = std::sync::Arc::new(server);
    let waiting = server.clone();
    tokio::task::spawn_blocking(move || waiting.wait_for(N, WAIT))
        .await
        .unwrap()
        .unwrap();
    // Longer than a lease, so a duplicate would have had time to arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    herald.terminate();

    let mails = server.received().unwrap();
    let mut recipients: Vec<&str> = mails
        .iter()
        .map(|m| m.header("X-RcptTo").unwrap())
        .collect();
    recipients.sort();
    let mut expected: Vec<String> =
        (0..N).map(|i| format!("user{i}@example.com")).collect();
    expected.sort();
    assert_eq!(recipients, expected);
}

#[tokio::test]
async fn welcome_emails_go_over_smtp_when_asked() {
    let server = tokio::task::spawn_blocking(SmtpServer::start)
        .await
        .unwrap()
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let herald = Herald::start(data.path(), &["--smtp", &server.url()]);
    let (status, _) = herald.register(user(1)).await;
    assert_eq!(status, 201);

    let mail = tokio::task::spawn_blocking(move || server.wait_for(1, WAIT))
        .await
        .unwrap()
        .unwrap()
        .remove(0);
    assert_eq!(mail.header("X-RcptTo"), Some("user1@example.com"));
    assert_eq!(mail.header("Subject"), Some("Welcome to herald, User 1!"));
    assert_eq!(testkit::count_files(&data.path().join("mail/new")), 0);
}

#[tokio::test]
async fn sigterm_finishes_the_work_in_flight_and_exits_zero() {
    let data = tempfile::tempdir().unwrap();
    let mut herald = Herald::start(data.path(), &[]);
    for i in 0..5 {
        assert_eq!(herald.register(user(i)).await.0, 201);
    }
    let status = herald.terminate();
    assert!(status.success(), "{status:?}");
    // Everything accepted before the signal was mailed before the exit.
    assert_eq!(testkit::count_files(&data.path().join("mail/new")), 5);
}

#[tokio::test]
async fn a_client_that_never_finishes_its_request_cannot_hold_up_shutdown() {
    use tokio::io::AsyncWriteExt;

    let data = tempfile::tempdir().unwrap();
    let mut herald =
        Herald::start(data.path(), &["--shutdown-grace-secs", "1"]);
    let address = herald.base().trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(address).await.unwrap();
    stalled
        .write_all(b"POST /user/register HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let started = std::time::Instant::now();
    let status = herald.terminate();
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(15));
    drop(stalled);
}

#[tokio::test]
async fn a_connection_that_never_finishes_its_headers_is_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let data = tempfile::tempdir().unwrap();
    let herald = Herald::start(data.path(), &[]);
    let address = herald.base().trim_start_matches("http://").to_owned();
    let mut stalled = tokio::net::TcpStream::connect(address).await.unwrap();
    stalled
        .write_all(b"POST /user/register HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();

    // The server gives up on the headers and closes the connection.
    let mut rest = Vec::new();
    let closed =
        tokio::time::timeout(WAIT, stalled.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the stalled connection was still open");
}

#[tokio::test]
async fn logs_of_a_registration_hold_no_password_hash_or_address() {
    let data = tempfile::tempdir().unwrap();
    let mut herald = Herald::start_logging(data.path(), &[], "debug");
    let (status, _) = herald
        .register(json!({
            "user_id": "carol@example.com",
            "user_name": "Carol",
            "user_password": "correct horse battery",
        }))
        .await;
    assert_eq!(status, 201);
    let (status, _) = herald
        .register(json!({
            "user_id": "carol@example.com",
            "user_name": "Carol",
            "user_password": "another secret value",
        }))
        .await;
    assert_eq!(status, 409);
    mail_in(data.path().join("mail/new"), 1).await;
    assert!(herald.terminate().success());

    let logs = herald.logs();
    assert!(
        logs.contains("user registered"),
        "the capture has the run:\n{logs}"
    );
    for secret in [
        "correct horse",
        "another secret",
        "$argon2",
        "carol@",
        "example.com",
    ] {
        assert!(!logs.contains(secret), "{secret:?} leaked into:\n{logs}");
    }
}

#[test]
fn every_flag_of_up_is_documented_with_its_environment_variable() {
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["up", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8(output.stdout).unwrap();
    for (flag, variable) in [
        ("--listen", "HERALD_LISTEN"),
        ("--data-dir", "HERALD_DATA_DIR"),
        ("--mail-dir", "HERALD_MAIL_DIR"),
        ("--smtp", "HERALD_SMTP"),
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
        assert!(help.contains(variable), "{variable} missing from:\n{help}");
    }
}

#[test]
fn a_mistyped_log_level_is_refused_rather_than_silencing_the_logs() {
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["--log", "infoo", "up", "--listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not a level"), "{stderr}");
}

#[test]
fn a_bad_flag_value_is_a_clear_error_and_a_failing_exit() {
    let data = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .arg("up")
        .arg("--data-dir")
        .arg(data.path())
        .args(["--smtp", "http://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("smtp or smtps"), "{stderr}");
}
