//! The mailer service: a welcome email for every `user.registered.v1`.
//!
//! The bus delivers an event at least once, so the mailer makes the email
//! happen once: it records each event it has mailed (in the
//! `mailer_deliveries` table) and derives the Message-ID and the Maildir
//! file name from the event id, so that a second delivery of the same
//! event is recognised and sends nothing.

pub mod maildir;
pub mod templates;
pub mod transport;

use std::time::SystemTime;

use contracts::UserRegistered;
use herald::broker::BoxFuture;
use herald::sqlite::{Database, Migration};
use herald::worker::{Subscription, WorkerOptions};
use herald::{Delivery, Event, Handler, HandlerError};
use lettre::Message;
use lettre::message::{Mailbox, MultiPart};
use uuid::Uuid;

use crate::templates::Welcome;
use crate::transport::{SendError, Transport};

/// The queue the mailer consumes.
pub const QUEUE: &str = "mailer";

/// The sender of welcome emails unless configured otherwise.
pub const DEFAULT_FROM: &str = "herald <welcome@herald.localhost>";

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "events already mailed",
    sql: "CREATE TABLE mailer_deliveries (
        event_id     TEXT PRIMARY KEY,
        delivered_at INTEGER NOT NULL
    ) WITHOUT ROWID",
}];

/// The mailer's subscription: `user.registered.v1` on the `mailer` queue.
pub fn subscription(options: WorkerOptions) -> Subscription {
    Subscription {
        queue: QUEUE.to_owned(),
        event_types: vec![UserRegistered::TYPE],
        options,
    }
}

/// Sends welcome emails; the bus's handler for `user.registered.v1`.
#[derive(Debug)]
pub struct Mailer {
    db: Database,
    from: Mailbox,
    transport: Transport,
}

impl Mailer {
    /// Prepares the mailer's table in `db`.
    pub async fn open(
        db: Database,
        from: Mailbox,
        transport: Transport,
    ) -> Result<Self, sqlx::Error> {
        db.migrate("mailer", MIGRATIONS).await?;
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
        let name = file_name(envelope.id);

        if self.already_mailed(envelope.id).await?
            || self.transport.already_delivered(&name)
        {
            tracing::info!(
                event_id = %envelope.id,
                user_id = event.user_id,
                "welcome email already sent; skipping"
            );
            return self.record(envelope.id).await;
        }

        let time: SystemTime = envelope.time.into();
        let message = welcome_message(&self.from, &event, envelope.id, time)?;
        self.transport
            .send(&name, &message)
            .await
            .map_err(|e| match e {
                SendError::Transient(reason) => HandlerError::transient(reason),
                SendError::Permanent(reason) => HandlerError::permanent(reason),
            })?;
        tracing::info!(
            event_id = %envelope.id,
            user_id = event.user_id,
            attempt = delivery.attempt,
            "welcome email sent"
        );
        self.record(envelope.id).await
    }

    async fn already_mailed(
        &self,
        event_id: Uuid,
    ) -> Result<bool, HandlerError> {
        let found: Option<i64> = sqlx::query_scalar(
            "SELECT 1 FROM mailer_deliveries WHERE event_id = ?",
        )
        .bind(event_id.to_string())
        .fetch_optional(self.db.reader())
        .await
        .map_err(|e| HandlerError::transient(format!("mailer store: {e}")))?;
        Ok(found.is_some())
    }

    /// Notes that the event's email went out. The email is sent already,
    /// so a failure here is logged, not retried: retrying would send it
    /// again.
    async fn record(&self, event_id: Uuid) -> Result<(), HandlerError> {
        let recorded = sqlx::query(
            "INSERT INTO mailer_deliveries (event_id, delivered_at)
             VALUES (?, ?) ON CONFLICT DO NOTHING",
        )
        .bind(event_id.to_string())
        .bind(herald::sqlite::now_millis())
        .execute(self.db.writer())
        .await;
        if let Err(error) = recorded {
            tracing::warn!(
                %event_id, error = %error,
                "email sent but not recorded; a redelivery would send it again"
            );
        }
        Ok(())
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
        .subject(welcome.subject)
        .multipart(MultiPart::alternative_plain_html(
            welcome.text,
            welcome.html,
        ))
        .map_err(|e| {
            HandlerError::permanent(format!("cannot build the email: {e}"))
        })
}
