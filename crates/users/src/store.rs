//! Where users live: the `users` table, beside the bus in the same SQLite
//! database.
//!
//! A registration writes the user row and stages its `user.registered`
//! event in one transaction, so the database is the outbox: a user exists
//! with its event, or neither exists.

use contracts::UserRegistered;
use herald::sqlite::{Database, Migration};
use herald::{BusError, EmbeddedBroker, Envelope, TraceContext};

use crate::domain::{EmailAddress, Locale, UserId, UserName};
use crate::password::PasswordHash;

/// The CloudEvents `source` of the users service's events.
pub const SOURCE: &str = "/herald/users";

const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "users",
    sql: "CREATE TABLE users (
        user_id       TEXT PRIMARY KEY COLLATE NOCASE,
        user_name     TEXT NOT NULL,
        email         TEXT NOT NULL,
        email_key     TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        locale        TEXT NOT NULL,
        registered_at TEXT NOT NULL
    )",
}];

/// A user about to be stored.
#[derive(Debug)]
pub struct NewUser {
    pub user_id: UserId,
    pub user_name: UserName,
    pub email: EmailAddress,
    pub locale: Locale,
    pub password_hash: PasswordHash,
}

/// Which unique field a registration collided on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    UserId,
    Email,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0:?} is already registered")]
    Taken(Taken),
    #[error("no consumer is bound to user.registered yet")]
    NoSubscriber,
    #[error("the user database failed")]
    Database(#[from] sqlx::Error),
    #[error("the bus failed")]
    Bus(#[source] BusError),
    #[error("could not encode the event")]
    Encode(#[from] serde_json::Error),
}

impl From<BusError> for StoreError {
    fn from(error: BusError) -> Self {
        match error {
            BusError::Unroutable { .. } => StoreError::NoSubscriber,
            other => StoreError::Bus(other),
        }
    }
}

/// The users table and the bus it publishes to.
#[derive(Debug, Clone)]
pub struct UserStore {
    broker: EmbeddedBroker,
}

impl UserStore {
    /// Applies the users migrations to the broker's database.
    pub async fn open(broker: EmbeddedBroker) -> Result<Self, sqlx::Error> {
        broker.database().migrate("users", MIGRATIONS).await?;
        Ok(UserStore { broker })
    }

    fn db(&self) -> &Database {
        self.broker.database()
    }

    /// Which of the user id and the address is already taken, if either.
    /// A cheap early answer; [`register`](Self::register) still decides.
    pub async fn find_taken(
        &self,
        user_id: &UserId,
        email: &EmailAddress,
    ) -> Result<Option<Taken>, StoreError> {
        let taken: Option<(bool,)> = sqlx::query_as(
            "SELECT user_id = ? COLLATE NOCASE FROM users
             WHERE user_id = ? COLLATE NOCASE OR email_key = ?
             LIMIT 1",
        )
        .bind(user_id.as_str())
        .bind(user_id.as_str())
        .bind(email.key())
        .fetch_optional(self.db().reader())
        .await?;
        Ok(taken.map(
            |(same_id,)| {
                if same_id { Taken::UserId } else { Taken::Email }
            },
        ))
    }

    /// Stores `user` and its `user.registered` event in one transaction,
    /// and returns the event's id.
    pub async fn register(
        &self,
        user: &NewUser,
        trace: TraceContext,
    ) -> Result<uuid::Uuid, StoreError> {
        let event = UserRegistered {
            user_id: user.user_id.as_str().to_owned(),
            user_name: user.user_name.as_str().to_owned(),
            email: user.email.as_str().to_owned(),
            locale: user.locale,
        };
        let envelope = Envelope::new(SOURCE, &event, Some(trace))?;

        let mut tx = self.db().begin().await?;
        let inserted = sqlx::query(
            "INSERT INTO users (user_id, user_name, email, email_key,
                 password_hash, locale, registered_at)
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(user.user_id.as_str())
        .bind(user.user_name.as_str())
        .bind(user.email.as_str())
        .bind(user.email.key())
        .bind(user.password_hash.as_phc())
        .bind(user.locale.tag())
        .bind(envelope.time.to_rfc3339())
        .execute(&mut *tx)
        .await;
        if let Err(error) = inserted {
            drop(tx);
            return Err(self.explain_conflict(error, user).await);
        }
        EmbeddedBroker::stage(&mut tx, &envelope).await?;
        tx.commit().await?;

        self.broker.wake();
        Ok(envelope.id)
    }

    /// Whether the database answers and accepts writes.
    pub async fn is_usable(&self) -> bool {
        self.db().is_usable().await
    }
}

impl UserStore {
    /// Says which field a failed insert collided on. SQLite reports
    /// whichever unique index it checked first, so when both collide the
    /// answer would depend on timing; asking again names the user id
    /// first, as a request made a moment later would be told.
    async fn explain_conflict(
        &self,
        error: sqlx::Error,
        user: &NewUser,
    ) -> StoreError {
        let unique = error
            .as_database_error()
            .is_some_and(|e| e.is_unique_violation());
        if !unique {
            return StoreError::Database(error);
        }
        match self.find_taken(&user.user_id, &user.email).await {
            Ok(Some(taken)) => StoreError::Taken(taken),
            _ => StoreError::Taken(Taken::UserId),
        }
    }
}
