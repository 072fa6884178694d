//! The users service: takes registrations over HTTP and announces each
//! new user with a `user.registered.v1` event.
//!
//! Building the service ([`Users::open`]) is apart from running it
//! ([`serve`]), so tests run the production start-up path on port 0.

pub mod domain;
pub mod http;
pub mod password;
pub mod store;

use std::future::Future;

use herald::{Broker, EmbeddedBroker, TraceContext};
use tokio::net::TcpListener;

use crate::password::Hasher;
use crate::store::UserStore;

/// The service's shared state: its store, its bus and its hasher.
#[derive(Debug, Clone)]
pub struct Users {
    store: UserStore,
    broker: EmbeddedBroker,
    hasher: Hasher,
}

impl Users {
    /// Prepares the users table in the broker's database.
    pub async fn open(broker: EmbeddedBroker) -> Result<Self, sqlx::Error> {
        let store = UserStore::open(broker.clone()).await?;
        Ok(Users {
            store,
            broker,
            hasher: Hasher::per_core(),
        })
    }

    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Whether the bus can take events (used by readiness).
    pub async fn bus_ready(&self) -> bool {
        self.broker.is_ready().await
    }
}

/// Serves the API on `listener` until `shutdown` completes, then finishes
/// the requests in flight and returns.
pub async fn serve(
    users: Users,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, users.router())
        .with_graceful_shutdown(shutdown)
        .await
}
