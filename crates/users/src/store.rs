//! Where users live: the `users` table, in the SQLite database of the
//! embedded bus or in PostgreSQL beside herald's outbox.
//!
//! A registration writes the user row and stages its `user.registered`
//! event in one transaction, so the database is the outbox: a user exists
//! with its event, or neither exists.

use contracts::UserRegistered;
use herald::db::Migration;
use herald::outbox::Outbox;
use herald::{BusError, EmbeddedBroker, Envelope, TraceContext};

use crate::domain::{EmailAddress, Locale, UserId, UserName};
use crate::password::PasswordHash;

/// The CloudEvents `source` of the users service's events.
pub const SOURCE: &str = "/herald/users";

const SQLITE_MIGRATIONS: &[Migration] = &[Migration {
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

/// User ids are ASCII and compared without case, as in SQLite's NOCASE.
const POSTGRES_MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    description: "users",
    sql: "CREATE TABLE users (
        user_id       TEXT PRIMARY KEY,
        user_name     TEXT NOT NULL,
        email         TEXT NOT NULL,
        email_key     TEXT NOT NULL UNIQUE,
        password_hash TEXT NOT NULL,
        locale        TEXT NOT NULL,
        registered_at TEXT NOT NULL
    );
    CREATE UNIQUE INDEX users_user_id_folded ON users (lower(user_id));",
}];

/// Whether a user id or an address is taken; the first column says which.
const SQLITE_FIND_TAKEN: &str = "SELECT user_id = $1 COLLATE NOCASE FROM users
     WHERE user_id = $1 COLLATE NOCASE OR email_key = $2
     LIMIT 1";
const POSTGRES_FIND_TAKEN: &str = "SELECT lower(user_id) = lower($1) FROM users
     WHERE lower(user_id) = lower($1) OR email_key = $2
     LIMIT 1";

const INSERT_USER: &str = "INSERT INTO users (user_id, user_name, email,
         email_key, password_hash, locale, registered_at)
     VALUES ($1, $2, $3, $4, $5, $6, $7)";

/// The insert of `$user`, registered at `$time`, for either backend.
macro_rules! insert_user {
    ($user:expr, $time:expr) => {
        sqlx::query(INSERT_USER)
            .bind($user.user_id.as_str())
            .bind($user.user_name.as_str())
            .bind($user.email.as_str())
            .bind($user.email.key())
            .bind($user.password_hash.as_phc())
            .bind($user.locale.tag())
            .bind($time)
    };
}

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

/// The users table and where registrations stage their events.
#[derive(Debug, Clone)]
pub enum UserStore {
    /// In the SQLite database of the embedded bus, whose queues stage the
    /// events (for its own consumers, or for the relay to another broker).
    Sqlite(EmbeddedBroker),
    /// In PostgreSQL, events staged in herald's outbox there.
    Postgres(Outbox),
}

impl UserStore {
    /// Applies the users migrations to the SQLite database of `broker`.
    pub async fn sqlite(broker: EmbeddedBroker) -> Result<Self, sqlx::Error> {
        broker
            .database()
            .migrate("users", SQLITE_MIGRATIONS)
            .await?;
        Ok(UserStore::Sqlite(broker))
    }

    /// Applies the users migrations to the PostgreSQL database of `outbox`.
    pub async fn postgres(outbox: Outbox) -> Result<Self, sqlx::Error> {
        outbox
            .database()
            .migrate("users", POSTGRES_MIGRATIONS)
            .await?;
        Ok(UserStore::Postgres(outbox))
    }

    /// Which of the user id and the address is already taken, if either.
    /// A cheap early answer; [`register`](Self::register) still decides.
    pub async fn find_taken(
        &self,
        user_id: &UserId,
        email: &EmailAddress,
    ) -> Result<Option<Taken>, StoreError> {
        let (id, key) = (user_id.as_str(), email.key());
        let same_id: Option<bool> = match self {
            UserStore::Sqlite(broker) => {
                sqlx::query_scalar(SQLITE_FIND_TAKEN)
                    .bind(id)
                    .bind(key)
                    .fetch_optional(broker.database().reader())
                    .await?
            }
            UserStore::Postgres(outbox) => {
                sqlx::query_scalar(POSTGRES_FIND_TAKEN)
                    .bind(id)
                    .bind(key)
                    .fetch_optional(outbox.database().pool())
                    .await?
            }
        };
        Ok(same_id.map(|same| if same { Taken::UserId } else { Taken::Email }))
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
        let registered_at = envelope.time.to_rfc3339();

        match self {
            UserStore::Sqlite(broker) => {
                let mut tx = broker.database().begin().await?;
                let inserted =
                    insert_user!(user, registered_at).execute(&mut *tx).await;
                if let Err(error) = inserted {
                    drop(tx);
                    return Err(self.explain_conflict(error, user).await);
                }
                EmbeddedBroker::stage(&mut tx, &envelope).await?;
                tx.commit().await?;
                broker.wake();
            }
            UserStore::Postgres(outbox) => {
                let mut tx = outbox.database().begin().await?;
                let inserted =
                    insert_user!(user, registered_at).execute(&mut *tx).await;
                if let Err(error) = inserted {
                    drop(tx);
                    return Err(self.explain_conflict(error, user).await);
                }
                Outbox::stage(&mut tx, &envelope).await?;
                tx.commit().await?;
                outbox.wake();
            }
        }
        Ok(envelope.id)
    }

    /// Whether the database answers and accepts writes.
    pub async fn is_usable(&self) -> bool {
        match self {
            UserStore::Sqlite(broker) => broker.database().is_usable().await,
            UserStore::Postgres(outbox) => outbox.database().is_usable().await,
        }
    }

    /// Whether events can be staged: the embedded bus is open, or the
    /// outbox's database answers.
    pub async fn can_stage(&self) -> bool {
        use herald::Broker;
        match self {
            UserStore::Sqlite(broker) => broker.is_ready().await,
            UserStore::Postgres(outbox) => outbox.database().is_usable().await,
        }
    }
}

impl UserStore {
    /// Says which field a failed insert collided on. The database reports
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
