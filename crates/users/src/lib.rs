//! The users service: takes registrations over HTTP and announces each
//! new user with a `user.registered.v1` event.
//!
//! Building the service ([`Users::open`]) is apart from running it
//! ([`serve`]), so tests run the production start-up path on port 0.

pub mod celery;
pub mod domain;
pub mod http;
pub mod password;
pub mod relay;
pub mod store;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;

use herald::{Broker, TraceContext};
use tokio::net::TcpListener;

use crate::password::Hasher;
use crate::store::UserStore;

/// The service's shared state: its store and its hasher.
#[derive(Clone)]
pub struct Users {
    store: UserStore,
    hasher: Hasher,
    /// The network broker the outbox is relayed to, if any: reported by
    /// readiness, but not required, since registrations wait in the
    /// outbox while it is away.
    relayed_to: Option<Arc<dyn Broker>>,
}

impl std::fmt::Debug for Users {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Users").field("store", &self.store).finish()
    }
}

impl Users {
    /// The service on `store`, with a password hasher per core.
    pub fn new(store: UserStore) -> Self {
        Users {
            store,
            hasher: Hasher::per_core(),
            relayed_to: None,
        }
    }

    /// Notes the broker the outbox is relayed to, for readiness.
    pub fn relayed_to(mut self, broker: Arc<dyn Broker>) -> Self {
        self.relayed_to = Some(broker);
        self
    }

    /// Whether the broker the outbox is relayed to is connected; `None`
    /// when events stay on the embedded bus.
    pub async fn relay_target_ready(&self) -> Option<bool> {
        match &self.relayed_to {
            Some(broker) => Some(broker.is_ready().await),
            None => None,
        }
    }

    /// Stores `user` with its `user.registered` event, in the trace
    /// `trace`; returns the event's id.
    pub(crate) async fn register(
        &self,
        user: &store::NewUser,
        trace: TraceContext,
    ) -> Result<uuid::Uuid, store::StoreError> {
        let event_id = self.store.register(user, trace).await?;
        // Staged on the bus itself, the event is published by that commit.
        // Staged in an outbox, it is counted when the broker confirms its
        // relay.
        if self.relayed_to.is_none() {
            use herald::Event;
            herald::metrics::published(contracts::UserRegistered::TYPE);
        }
        Ok(event_id)
    }

    pub fn router(&self) -> axum::Router {
        http::router(self.clone())
    }

    /// Whether events can be staged (used by readiness).
    pub async fn bus_ready(&self) -> bool {
        self.store.can_stage().await
    }
}

/// How long a client may take to send a request's headers. Without it, a
/// client that sends half a request would hold its connection forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` (the API of [`Users::router`], say) on `listener`
/// until `shutdown` completes, then stops accepting and waits for the
/// connections in flight to finish (the caller bounds that wait).
pub async fn serve(
    router: axum::Router,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connections = GracefulShutdown::new();
    tokio::pin!(shutdown);

    loop {
        let stream = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    // Out of file descriptors, most likely: back off a
                    // moment rather than spin.
                    tracing::warn!(error = %error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Replies are small and written whole: send them at once.
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(router.clone());
        let connection = http.serve_connection(TokioIo::new(stream), service);
        let connection = connections.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(error = %error, "connection ended badly");
            }
        });
    }

    drop(listener);
    connections.shutdown().await;
    Ok(())
}
