//! The mailer end to end: events on a real embedded bus, emails in a real
//! Maildir or through a real SMTP server (aiosmtpd on 127.0.0.1), read
//! back by an independent MIME parser.

use std::sync::Arc;
use std::time::Duration;

use contracts::{Locale, UserRegistered};
use herald::broker::embedded::EmbeddedOptions;
use herald::db::Db;
use herald::sqlite::Database;
use herald::worker::{self, WorkerOptions};
use herald::{Broker, EmbeddedBroker, Envelope};
use mailer::Mailer;
use mailer::maildir::Maildir;
use mailer::transport::{SmtpRelay, Transport};
use testkit::{ParsedEmail, SmtpServer};
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(20);

/// A bus with the mailer's worker running on it.
struct Pipeline {
    dir: tempfile::TempDir,
    broker: EmbeddedBroker,
    stop: watch::Sender<bool>,
    worker: tokio::task::JoinHandle<Result<(), herald::BusError>>,
}

impl Pipeline {
    async fn start(
        transport: impl FnOnce(&std::path::Path) -> Transport,
    ) -> Self {
        Self::start_on(None, transport).await
    }

    /// A pipeline whose mailer keeps its records in `records`, or beside
    /// its bus when `None`.
    async fn start_on(
        records: Option<Db>,
        transport: impl FnOnce(&std::path::Path) -> Transport,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db = Database::open(&dir.path().join("herald.db")).await.unwrap();
        let broker =
            EmbeddedBroker::open(db.clone(), EmbeddedOptions::default())
                .await
                .unwrap();
        let from = mailer::DEFAULT_FROM.parse().unwrap();
        let records = records.unwrap_or(Db::Sqlite(db));
        let mailer = Mailer::open(records, from, transport(dir.path()))
            .await
            .unwrap();

        let subscription = mailer::subscription(WorkerOptions::default());
        broker
            .bind(&subscription.queue, &subscription.event_types)
            .await
            .unwrap();
        let (stop, mut stopped) = watch::channel(false);
        let worker = tokio::spawn(worker::run(
            Arc::new(broker.clone()),
            subscription,
            Arc::new(mailer),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ));
        Pipeline {
            dir,
            broker,
            stop,
            worker,
        }
    }

    async fn with_maildir() -> Self {
        Self::start(|dir| {
            Transport::Maildir(Maildir::open(&dir.join("mail")).unwrap())
        })
        .await
    }

    fn mail_new(&self) -> std::path::PathBuf {
        self.dir.path().join("mail/new")
    }

    async fn publish(&self, envelope: &Envelope) {
        self.broker.publish(envelope).await.unwrap();
    }

    /// The queue's dead letters, once there is one.
    async fn wait_for_dead_letter(&self) -> Vec<herald::DeadLetter> {
        for _ in 0..400 {
            let dead = self.broker.dead_letters(mailer::QUEUE).await.unwrap();
            if !dead.is_empty() {
                return dead;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        Vec::new()
    }

    /// Stops the worker, which first finishes what it holds.
    async fn drain(self) -> tempfile::TempDir {
        for _ in 0..400 {
            if self.broker.depth(mailer::QUEUE).await.unwrap() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.stop.send(true).unwrap();
        self.worker.await.unwrap().unwrap();
        assert!(
            self.broker
                .dead_letters(mailer::QUEUE)
                .await
                .unwrap()
                .is_empty()
        );
        self.dir
    }
}

fn registered(user_name: &str, email: &str, locale: Locale) -> Envelope {
    let event = UserRegistered {
        user_id: "u-1".into(),
        user_name: user_name.into(),
        email: email.into(),
        locale,
    };
    Envelope::new("/test", &event, None).unwrap()
}

async fn wait_for_mail(
    dir: std::path::PathBuf,
    count: usize,
) -> Vec<ParsedEmail> {
    tokio::task::spawn_blocking(move || {
        testkit::wait_for_mail(&dir, count, WAIT)
    })
    .await
    .unwrap()
    .unwrap()
}

fn assert_well_formed(mail: &ParsedEmail) {
    assert!(mail.defects.is_empty(), "{:?}", mail.defects);
    assert_eq!(mail.count_headers("To"), 1);
    assert_eq!(mail.count_headers("Subject"), 1);
    assert!(mail.html.is_some(), "an HTML part");
}

#[tokio::test]
async fn an_english_welcome_lands_in_the_maildir() {
    let pipeline = Pipeline::with_maildir().await;
    let event = registered("Alice", "alice@example.com", Locale::English);
    pipeline.publish(&event).await;

    let mail = wait_for_mail(pipeline.mail_new(), 1).await.remove(0);
    assert_well_formed(&mail);
    assert_eq!(mail.header("To"), Some("Alice <alice@example.com>"));
    assert_eq!(mail.header("Subject"), Some("Welcome to herald, Alice!"));
    let message_id = format!("<{}@herald>", event.id);
    assert_eq!(mail.header("Message-ID"), Some(message_id.as_str()));
    assert!(mail.text.as_deref().unwrap().starts_with("Hello Alice,"));
    assert!(mail.html.as_deref().unwrap().contains("Hello Alice,"));
    pipeline.drain().await;
}

#[tokio::test]
async fn a_chinese_welcome_is_encoded_and_decodes_back() {
    let pipeline = Pipeline::with_maildir().await;
    let event =
        registered("张伟", "wei@example.com", Locale::SimplifiedChinese);
    pipeline.publish(&event).await;

    let mail = wait_for_mail(pipeline.mail_new(), 1).await.remove(0);
    assert_well_formed(&mail);
    assert_eq!(mail.header("To"), Some("张伟 <wei@example.com>"));
    assert_eq!(mail.header("Subject"), Some("欢迎加入 herald，张伟！"));
    assert!(mail.text.as_deref().unwrap().contains("张伟，您好！"));

    // On the wire, headers are 7-bit: encoded words, never raw UTF-8.
    let dir = pipeline.drain().await;
    let file = std::fs::read_dir(dir.path().join("mail/new"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let raw = std::fs::read(file.path()).unwrap();
    let head_end = raw.windows(2).position(|w| w == b"\n\n").unwrap();
    assert!(raw[..head_end].is_ascii());
}

#[tokio::test]
async fn a_name_cannot_add_a_header() {
    let pipeline = Pipeline::with_maildir().await;
    let event = registered(
        "Mallory\r\nBcc: victim@example.com",
        "mallory@example.com",
        Locale::English,
    );
    pipeline.publish(&event).await;

    let mail = wait_for_mail(pipeline.mail_new(), 1).await.remove(0);
    assert_well_formed(&mail);
    assert_eq!(mail.count_headers("Bcc"), 0);
    assert!(
        mail.header("To")
            .unwrap()
            .ends_with("<mallory@example.com>")
    );
    pipeline.drain().await;
}

#[tokio::test]
async fn a_name_that_looks_encoded_reads_back_as_typed() {
    let pipeline = Pipeline::with_maildir().await;
    // An encoded word for "\u{202E}SECURITY ALERT", typed as a name.
    let name = "=?utf-8?b?4oCuU0VDVVJJVFkgQUxFUlQ=?= x";
    pipeline
        .publish(&registered(name, "eve@example.com", Locale::English))
        .await;

    let mail = wait_for_mail(pipeline.mail_new(), 1).await.remove(0);
    assert_well_formed(&mail);
    let expected = format!("Welcome to herald, {name}!");
    assert_eq!(mail.header("Subject"), Some(expected.as_str()));
    pipeline.drain().await;
}

#[tokio::test]
async fn an_event_delivered_twice_sends_one_email() {
    let pipeline = Pipeline::with_maildir().await;
    let event = registered("Alice", "alice@example.com", Locale::English);
    pipeline.publish(&event).await;
    wait_for_mail(pipeline.mail_new(), 1).await;
    pipeline.publish(&event).await;

    let dir = pipeline.drain().await;
    assert_eq!(testkit::count_files(&dir.path().join("mail/new")), 1);
}

#[tokio::test]
async fn an_event_with_an_unusable_address_is_dead_lettered() {
    let pipeline = Pipeline::with_maildir().await;
    pipeline
        .publish(&registered("Eve", "not an address", Locale::English))
        .await;
    let dead = pipeline.wait_for_dead_letter().await;
    assert_eq!(dead.len(), 1);
    assert!(dead[0].reason.contains("address"), "{}", dead[0].reason);
    assert_eq!(dead[0].attempts, 1);
}

#[tokio::test]
async fn welcomes_go_through_a_real_smtp_server() {
    let server = tokio::task::spawn_blocking(SmtpServer::start)
        .await
        .unwrap()
        .unwrap();
    let url = server.url();
    let pipeline = Pipeline::start(|_| {
        Transport::Smtp(SmtpRelay::from_url(&url).unwrap())
    })
    .await;
    let first =
        registered("张伟", "wei@example.com", Locale::SimplifiedChinese);
    let second = registered("Alice", "alice@example.com", Locale::English);
    pipeline.publish(&first).await;
    pipeline.publish(&second).await;
    pipeline.publish(&first).await;

    let server = Arc::new(server);
    let waiting = server.clone();
    let mut mails =
        tokio::task::spawn_blocking(move || waiting.wait_for(2, WAIT))
            .await
            .unwrap()
            .unwrap();
    pipeline.drain().await;
    // Whatever arrived late would show now: still two, one per event.
    assert_eq!(server.received().unwrap().len(), 2);

    mails.sort_by_key(|m| m.header("X-RcptTo").unwrap_or("").to_owned());
    assert_eq!(mails[0].header("X-RcptTo"), Some("alice@example.com"));
    assert_eq!(
        mails[0].header("Subject"),
        Some("Welcome to herald, Alice!")
    );
    assert_eq!(mails[1].header("X-RcptTo"), Some("wei@example.com"));
    assert_eq!(mails[1].header("Subject"), Some("欢迎加入 herald，张伟！"));
    assert!(mails[1].text.as_deref().unwrap().contains("张伟，您好！"));
    let message_id = format!("<{}@herald>", first.id);
    assert_eq!(mails[1].header("Message-ID"), Some(message_id.as_str()));
}

#[tokio::test]
async fn mail_waits_while_the_smtp_server_is_down_and_goes_when_it_is_back() {
    let port = testkit::free_port();
    let url = format!("smtp://127.0.0.1:{port}");
    let pipeline = Pipeline::start(|_| {
        Transport::Smtp(SmtpRelay::from_url(&url).unwrap())
    })
    .await;
    let event = registered("Alice", "alice@example.com", Locale::English);
    pipeline.publish(&event).await;

    // Refused connections are transient: the message waits for a retry.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let server =
        tokio::task::spawn_blocking(move || SmtpServer::start_on(port))
            .await
            .unwrap()
            .unwrap();
    let mails = tokio::task::spawn_blocking(move || {
        server.wait_for(1, Duration::from_secs(30))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(mails.len(), 1);
    pipeline.drain().await;
}

/// An SMTP server on loopback that refuses every recipient with `reply`.
async fn refusing_smtp_server(reply: &'static str) -> u16 {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 mock ready\r\n").await.ok()?;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.to_ascii_uppercase();
                    let answer = if verb.starts_with("EHLO") {
                        "250 mock\r\n"
                    } else if verb.starts_with("RCPT") {
                        reply
                    } else if verb.starts_with("QUIT") {
                        "221 bye\r\n"
                    } else {
                        "250 ok\r\n"
                    };
                    write.write_all(answer.as_bytes()).await.ok()?;
                }
                Some(())
            });
        }
    });
    port
}

#[tokio::test]
async fn a_refused_recipient_is_dead_lettered_without_the_address() {
    let port =
        refusing_smtp_server("550 5.1.1 user zelda.secret unknown\r\n").await;
    let url = format!("smtp://127.0.0.1:{port}");
    let pipeline = Pipeline::start(|_| {
        Transport::Smtp(SmtpRelay::from_url(&url).unwrap())
    })
    .await;
    pipeline
        .publish(&registered(
            "Zelda",
            "zelda.secret@example.com",
            Locale::English,
        ))
        .await;

    let dead = pipeline.wait_for_dead_letter().await;
    assert_eq!(dead.len(), 1, "a 5xx reply is permanent");
    let reason = &dead[0].reason;
    assert!(
        reason.contains("550") && reason.contains("5.1.1"),
        "{reason}"
    );
    assert!(!reason.contains("zelda"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn two_mailers_sharing_postgresql_send_one_email_per_event() {
    let pg = testkit::postgres::TestDatabase::create();
    let server = tokio::task::spawn_blocking(SmtpServer::start)
        .await
        .unwrap()
        .unwrap();
    let url = server.url();
    // Two mailers, as two processes would be: each its own bus, the one
    // PostgreSQL database for their records, the one mail server.
    let mut mailers = Vec::new();
    for _ in 0..2 {
        let db = herald::postgres::Database::open(pg.url()).await.unwrap();
        let transport = Transport::Smtp(SmtpRelay::from_url(&url).unwrap());
        mailers.push(
            Pipeline::start_on(Some(Db::Postgres(db)), |_| transport).await,
        );
    }

    // Every event reaches both, as a redelivery to another replica would.
    const EVENTS: usize = 10;
    for i in 0..EVENTS {
        let address = format!("user{i}@example.com");
        let event = registered("Alice", &address, Locale::English);
        for mailer in &mailers {
            mailer.publish(&event).await;
        }
    }

    let server = Arc::new(server);
    let waiting = server.clone();
    tokio::task::spawn_blocking(move || waiting.wait_for(EVENTS, WAIT))
        .await
        .unwrap()
        .unwrap();
    for mailer in mailers {
        mailer.drain().await;
    }
    assert_eq!(server.received().unwrap().len(), EVENTS);
}

/// A mock SMTP server that takes every message, but on the first `drops`
/// connections closes the connection after the message instead of
/// replying. Returns its port and every message it was sent.
async fn dropping_smtp_server(
    drops: usize,
) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let messages = received.clone();
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((stream, _)) = listener.accept().await {
            connections += 1;
            let drop_after_data = connections <= drops;
            let messages = messages.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                write.write_all(b"220 mock ready\r\n").await.ok()?;
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.to_ascii_uppercase();
                    if verb.starts_with("DATA") {
                        write.write_all(b"354 go ahead\r\n").await.ok()?;
                        let mut message = String::new();
                        while let Ok(Some(line)) = lines.next_line().await {
                            if line == "." {
                                break;
                            }
                            message.push_str(&line);
                            message.push('\n');
                        }
                        messages.lock().unwrap().push(message);
                        if drop_after_data {
                            return Some(());
                        }
                        write.write_all(b"250 queued\r\n").await.ok()?;
                        continue;
                    }
                    let answer = if verb.starts_with("EHLO") {
                        "250 mock\r\n"
                    } else if verb.starts_with("QUIT") {
                        "221 bye\r\n"
                    } else {
                        "250 ok\r\n"
                    };
                    write.write_all(answer.as_bytes()).await.ok()?;
                }
                Some(())
            });
        }
    });
    (port, received)
}

/// The welcome email the mailer would build for `event`.
fn welcome_for(event: &Envelope) -> lettre::Message {
    let from = mailer::DEFAULT_FROM.parse().unwrap();
    let now = std::time::SystemTime::now();
    mailer::welcome_message(&from, &event.decode().unwrap(), event.id, now)
        .unwrap()
}

#[tokio::test]
async fn a_connection_lost_after_the_message_is_uncertain_and_resent_alike() {
    let (port, received) = dropping_smtp_server(1).await;
    let transport = Transport::Smtp(
        SmtpRelay::from_url(&format!("smtp://127.0.0.1:{port}")).unwrap(),
    );
    let event = registered("Alice", "alice@example.com", Locale::English);
    let message = welcome_for(&event);

    let first = transport.send("alice", &message).await;
    assert!(
        matches!(first, Err(mailer::transport::SendError::Uncertain(_))),
        "{first:?}"
    );
    transport.send("alice", &message).await.unwrap();

    // Sent twice, as the same message: the receiver can tell.
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 2);
    let message_id = |text: &str| {
        text.lines()
            .find(|l| l.to_ascii_lowercase().starts_with("message-id:"))
            .map(str::to_owned)
    };
    let id = message_id(&received[0]).expect("a Message-ID");
    assert!(id.contains(&event.id.to_string()), "{id}");
    assert_eq!(message_id(&received[1]), Some(id));
}

#[tokio::test]
async fn a_refusal_before_the_message_is_not_uncertain() {
    let port = refusing_smtp_server("451 4.3.0 try later\r\n").await;
    let transport = Transport::Smtp(
        SmtpRelay::from_url(&format!("smtp://127.0.0.1:{port}")).unwrap(),
    );
    let event = registered("Bob", "bob@example.com", Locale::English);
    let message = welcome_for(&event);
    let sent = transport.send("bob", &message).await;
    assert!(
        matches!(&sent, Err(mailer::transport::SendError::Transient(why)) if why.contains("451")),
        "{sent:?}"
    );
}
