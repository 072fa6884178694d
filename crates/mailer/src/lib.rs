//! The mailer service: a welcome email for every `user.registered.v1`.
//!
//! The bus delivers an event at least once, so the mailer makes the email
//! happen once. Before sending, a handler claims the event in the
//! `mailer_deliveries` table; a second delivery of the same event, in this
//! process or another, finds the claim and either skips (the email went
//! out) or waits its turn (the email is being sent). The sender renews its
//! claim while it sends; the claim of a process that died mid-send runs
//! out within seconds, and the email is sent again with
//! the same Message-ID, derived from the event id like the Maildir file
//! name, so that duplicates can still be recognised downstream.

pub mod celery;
pub mod maildir;
pub mod templates;
pub mod transport;

use std::time::{Duration, SystemTime};

use contracts::UserRegistered;
use herald::broker::BoxFuture;
use herald::db::{Db, Migration};
use herald::sqlite::now_millis;
use herald::with_pool;
use herald::worker::{RetryPolicy, Subscription, WorkerOptions};
use herald::{Delivery, Event, Handler, HandlerError};
use lettre::Message;
use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use uuid::Uuid;

use crate::templates::Welcome;
use crate::transport::{SendError, Transport};

/// The queue the mailer consumes.
pub const QUEUE: &str = "mailer";

/// The sender of welcome emails unless configured otherwise.
pub const DEFAULT_FROM: &str = "herald <welcome@herald.localhost>";

/// How long a claim on an event protects a send in progress without being
/// renewed. The sender renews it every third of this while it sends, so
/// only the claim of a sender that died runs out.
const CLAIM_TTL: Duration = Duration::from_secs(10);

const SQLITE_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "claims on events being or already mailed",
    sql: "CREATE TABLE mailer_deliveries (
        event_id     TEXT PRIMARY KEY,
        state        TEXT NOT NULL CHECK (state IN ('sending', 'sent')),
        claimed_at   INTEGER NOT NULL,
        delivered_at INTEGER
    ) WITHOUT ROWID",
}];

const POSTGRES_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "claims on events being or already mailed",
    sql: "CREATE TABLE mailer_deliveries (
        event_id     TEXT PRIMARY KEY,
        state        TEXT NOT NULL CHECK (state IN ('sending', 'sent')),
        claimed_at   BIGINT NOT NULL,
        delivered_at BIGINT
    )",
}];

/// What a handler learns when it claims an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Claim {
    /// Ours to send.
    Owned,
    /// A claim had expired: a sender died mid-send, so the email may or
    /// may not have gone out. Ours to send again.
    TakenOver,
    /// Sent already.
    Sent,
    /// Being sent by another handler right now; look again after this.
    Busy(Duration),
}

/// The mailer's name in metrics and logs.
pub const SERVICE: &str = "mailer";

/// The mailer's subscription: `user.registered.v1` on the `mailer` queue.
///
/// A mail server can be away for a while, so a welcome email is tried 16
/// times, for about half an hour on average (full jitter between 1 s and
/// 10 min) before it is dead-lettered: long enough to outlast a restart
/// or a short outage.
pub fn subscription(options: WorkerOptions) -> Subscription {
    Subscription {
        service: Some(SERVICE),
        queue: QUEUE.to_owned(),
        event_types: vec![UserRegistered::TYPE],
        options: WorkerOptions {
            retry: RetryPolicy {
                max_attempts: 16,
                ..options.retry
            },
            ..options
        },
    }
}

/// Whether a welcome email went out on this request or before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    Now,
    /// An earlier request with the same id sent it: not sent again.
    Before,
}

/// Sends welcome emails; the bus's handler for `user.registered.v1`.
#[derive(Debug)]
pub struct Mailer {
    db: Db,
    from: Mailbox,
    transport: Transport,
}

impl Mailer {
    /// Prepares the mailer's table in `db`.
    pub async fn open(
        db: Db,
        from: Mailbox,
        transport: Transport,
    ) -> Result<Self, sqlx::Error> {
        db.migrate("mailer", SQLITE_MIGRATIONS, POSTGRES_MIGRATIONS)
            .await?;
        Ok(Mailer {
            db,
            from,
            transport,
        })
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    async fn welcome(&self, delivery: &Delivery) -> Result<(), HandlerError> {
        let envelope = &delivery.envelope;
        let event: UserRegistered = envelope
            .decode()
            .map_err(|e| HandlerError::permanent(e.to_string()))?;
        self.send_welcome(envelope.id, envelope.time.into(), &event)
            .await
            .map(drop)
    }

    /// Sends the welcome email for `event`, once for `id` however often it
    /// is asked: the event's id, or the id of a Celery task asking for it.
    /// `time` is the email's date.
    pub async fn send_welcome(
        &self,
        id: Uuid,
        time: SystemTime,
        event: &UserRegistered,
    ) -> Result<Sent, HandlerError> {
        let name = file_name(id);
        let message = welcome_message(&self.from, event, id, time)?;

        // Make sure no other handler is sending, or has sent, this email.
        let claim = self.claim(id).await?;
        match claim {
            Claim::Owned | Claim::TakenOver => {}
            Claim::Sent => {
                tracing::info!("welcome email already sent; skipping");
                return Ok(Sent::Before);
            }
            Claim::Busy(wait) => {
                return Err(HandlerError::Transient {
                    reason: "the same event is claimed by another delivery \
                             sending it now"
                        .into(),
                    retry_after: Some(wait),
                });
            }
        }

        // A Maildir can tell whether a crashed attempt already wrote it.
        if self.transport.already_delivered(&name) {
            tracing::info!("an interrupted send had written the email already");
        } else {
            if claim == Claim::TakenOver {
                tracing::warn!(
                    "an earlier send of this email was interrupted and may \
                     have gone out; sending again with the same Message-ID"
                );
            }
            let cut_off = CutOff::expire_claim_of(&self.db, id);
            let sent = self
                .renewing_claim(id, self.transport.send(&name, &message))
                .await;
            cut_off.disarm();
            if let Err(error) = sent {
                self.release(id).await;
                return Err(match error {
                    SendError::Transient(why) => HandlerError::transient(why),
                    SendError::Permanent(why) => HandlerError::permanent(why),
                    SendError::Uncertain(why) => {
                        tracing::warn!(
                            reason = why.as_str(),
                            "delivery is uncertain: the email may have gone \
                             out; retrying with the same Message-ID"
                        );
                        HandlerError::transient(why)
                    }
                });
            }
        }
        tracing::info!("welcome email sent");
        self.mark_sent(id).await;
        Ok(Sent::Now)
    }

    /// Claims `event_id` for sending. Each step is one statement, atomic
    /// on either database, so two handlers cannot both own the event:
    /// the first to insert the claim owns it; a claim that has run out
    /// goes to the one handler whose update still finds it expired; anyone
    /// else learns who has it.
    async fn claim(&self, event_id: Uuid) -> Result<Claim, HandlerError> {
        let failed = |e: sqlx::Error| {
            HandlerError::transient(format!("mailer store: {e}"))
        };
        let id = event_id.to_string();
        let now = now_millis();
        let ttl = CLAIM_TTL.as_millis() as i64;

        let inserted = with_pool!(&self.db, |pool| sqlx::query(
            "INSERT INTO mailer_deliveries (event_id, state, claimed_at)
             VALUES ($1, 'sending', $2)
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&id)
        .bind(now)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(failed)?;
        if inserted == 1 {
            return Ok(Claim::Owned);
        }

        let taken_over = with_pool!(&self.db, |pool| sqlx::query(
            "UPDATE mailer_deliveries SET claimed_at = $2
             WHERE event_id = $1 AND state = 'sending' AND claimed_at < $3",
        )
        .bind(&id)
        .bind(now)
        .bind(now - ttl)
        .execute(pool)
        .await
        .map(|done| done.rows_affected()))
        .map_err(failed)?;
        if taken_over == 1 {
            return Ok(Claim::TakenOver);
        }

        let found: Option<(String, i64)> =
            with_pool!(&self.db, |pool| sqlx::query_as(
                "SELECT state, claimed_at FROM mailer_deliveries
                 WHERE event_id = $1",
            )
            .bind(&id)
            .fetch_optional(pool)
            .await)
            .map_err(failed)?;
        Ok(match found {
            Some((state, _)) if state == "sent" => Claim::Sent,
            Some((_, claimed_at)) => {
                let left = (claimed_at + ttl - now).max(0) as u64;
                Claim::Busy(Duration::from_millis(left + 100))
            }
            // Released by a failed send a moment ago: look again soon.
            None => Claim::Busy(Duration::from_millis(100)),
        })
    }

    /// Runs `send`, renewing the claim on `event_id` until it is done.
    async fn renewing_claim<T>(
        &self,
        event_id: Uuid,
        send: impl Future<Output = T>,
    ) -> T {
        let mut send = std::pin::pin!(send);
        let mut ticks = tokio::time::interval(CLAIM_TTL / 3);
        ticks.tick().await;
        loop {
            tokio::select! {
                done = &mut send => return done,
                _ = ticks.tick() => {
                    update_claim(
                        &self.db,
                        "UPDATE mailer_deliveries SET claimed_at = $2
                         WHERE event_id = $1 AND state = 'sending'",
                        event_id,
                        "could not renew the claim on a send in progress",
                    )
                    .await;
                }
            }
        }
    }

    /// Gives up a claim after a failed send, so a retry can take it.
    async fn release(&self, event_id: Uuid) {
        update_claim(
            &self.db,
            "DELETE FROM mailer_deliveries
             WHERE event_id = $1 AND state = 'sending' AND $2 > 0",
            event_id,
            "could not release the claim; a retry waits for it to expire",
        )
        .await;
    }

    /// Notes that the event's email went out. The email is sent already,
    /// so a failure here is logged, not retried: retrying would send it
    /// again.
    async fn mark_sent(&self, event_id: Uuid) {
        update_claim(
            &self.db,
            "UPDATE mailer_deliveries SET state = 'sent', delivered_at = $2
             WHERE event_id = $1",
            event_id,
            "email sent but not recorded; a redelivery after the claim \
             expires would send it again",
        )
        .await;
    }
}

/// Expires an event's claim if the send it guards is dropped unfinished
/// (the worker stopped the handler at shutdown), so that the next delivery
/// takes over at once, warning that the email may have gone out, instead
/// of waiting for the claim to run out.
struct CutOff {
    claim: Option<(Db, Uuid)>,
}

impl CutOff {
    fn expire_claim_of(db: &Db, event_id: Uuid) -> Self {
        CutOff {
            claim: Some((db.clone(), event_id)),
        }
    }

    /// The send finished: its outcome settles the claim.
    fn disarm(mut self) {
        self.claim = None;
    }
}

impl Drop for CutOff {
    fn drop(&mut self) {
        let Some((db, event_id)) = self.claim.take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            update_claim(
                &db,
                "UPDATE mailer_deliveries SET claimed_at = 0
                 WHERE event_id = $1 AND state = 'sending' AND $2 > 0",
                event_id,
                "could not expire the claim of a send cut off; the next \
                 delivery waits for it to run out",
            )
            .await;
        });
    }
}

/// One bookkeeping write on the claim of `event_id` (`$1`), at the time
/// `$2` (Unix ms), which the handler can live without: a failure is
/// logged as `failed`, not returned. A statement that has no use for the
/// time still names `$2` (`AND $2 > 0`, always true), as PostgreSQL
/// refuses a parameter its statement does not mention.
async fn update_claim(
    db: &Db,
    sql: &'static str,
    event_id: Uuid,
    failed: &str,
) {
    let written = with_pool!(db, |pool| sqlx::query(sql)
        .bind(event_id.to_string())
        .bind(now_millis())
        .execute(pool)
        .await
        .map(drop));
    warn_on_error(written, event_id, failed);
}

/// Logs a failed bookkeeping write that the handler can live with.
fn warn_on_error<T>(
    result: Result<T, sqlx::Error>,
    event_id: Uuid,
    what: &str,
) {
    if let Err(error) = result {
        tracing::warn!(%event_id, error = %error, "{what}");
    }
}

impl Handler for Mailer {
    fn handle<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.welcome(delivery))
    }
}

/// The Subject header. Text that merely looks like an RFC 2047 encoded
/// word (`=?utf-8?b?...?=`, typed into a name) would be decoded by mail
/// readers into whatever it hides, so such a subject is encoded whole and
/// reads back exactly as written.
fn subject_header(subject: String) -> HeaderValue {
    let name = HeaderName::new_from_ascii_str("Subject");
    if !subject.contains("=?") {
        return HeaderValue::new(name, subject);
    }
    let encoded = encoded_words(&subject);
    HeaderValue::dangerous_new_pre_encoded(name, subject, encoded)
}

/// `text` as RFC 2047 base64 encoded words, folded one word per line.
/// Words break at character boundaries and stay within 75 characters.
fn encoded_words(text: &str) -> String {
    use base64::Engine;
    const MAX_BYTES: usize = 45;

    let mut words = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + MAX_BYTES).min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let chunk = &text.as_bytes()[start..end];
        let base64 = base64::engine::general_purpose::STANDARD.encode(chunk);
        words.push(format!("=?utf-8?b?{base64}?="));
        start = end;
    }
    words.join("\r\n ")
}

/// The Maildir file name for an event's email.
pub fn file_name(event_id: Uuid) -> String {
    format!("{event_id}.herald")
}

/// The Message-ID for an event's email: the same for every delivery of
/// the event, so duplicates can be recognised downstream too.
pub fn message_id(event_id: Uuid) -> String {
    format!("<{event_id}@herald>")
}

/// Builds the welcome email for `event`.
pub fn welcome_message(
    from: &Mailbox,
    event: &UserRegistered,
    event_id: Uuid,
    date: SystemTime,
) -> Result<Message, HandlerError> {
    let address = event.email.parse().map_err(|e| {
        HandlerError::permanent(format!("the event's address is invalid: {e}"))
    })?;
    // The users service refuses names with line breaks; an event from
    // elsewhere gets them flattened rather than trusted.
    let name: String = event
        .user_name
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let welcome = Welcome::render(&name, &event.user_id, event.locale);

    Message::builder()
        .message_id(Some(message_id(event_id)))
        .date(date)
        .from(from.clone())
        .to(Mailbox::new(Some(name), address))
        .raw_header(subject_header(welcome.subject))
        .multipart(MultiPart::alternative_plain_html(
            welcome.text,
            welcome.html,
        ))
        .map_err(|e| {
            HandlerError::permanent(format!("cannot build the email: {e}"))
        })
}
