//! The outbox relay: from the service's own database to a network broker.
//!
//! A registration stages its event in the users database, in the same
//! transaction as the user (the embedded bus's `outbox` queue). When the
//! bus is RabbitMQ, the relay consumes that queue and publishes each event
//! there, acknowledging it in the outbox only after the broker confirmed.
//! While the broker is down, events wait in the outbox and the relay keeps
//! retrying, with backoff, for as long as it takes: registrations never
//! depend on the broker being up.

use std::sync::Arc;
use std::time::Duration;

use contracts::UserRegistered;
use herald::broker::BoxFuture;
use herald::worker::{Subscription, WorkerOptions};
use herald::{Broker, Delivery, Event, Handler, HandlerError, RetryPolicy};

/// The embedded queue the users service stages its events in when they
/// are bound for another broker.
pub const OUTBOX: &str = "outbox";

/// The relay's subscription to the outbox: retried without limit, since an
/// event must never be given up on just because the broker was away.
pub fn subscription() -> Subscription {
    Subscription {
        // The relay records relay metrics; it is not a service of its own.
        service: None,
        queue: OUTBOX.to_owned(),
        event_types: vec![UserRegistered::TYPE],
        options: WorkerOptions {
            concurrency: 32,
            // Events of one key reach the broker in the order they were
            // staged.
            per_key_order: true,
            retry: RetryPolicy {
                max_attempts: u32::MAX,
                base: Duration::from_millis(500),
                cap: Duration::from_secs(30),
            },
            ..WorkerOptions::default()
        },
    }
}

/// Publishes outbox events to the target broker.
#[derive(Clone)]
pub struct Relay {
    target: Arc<dyn Broker>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Relay")
    }
}

impl Relay {
    pub fn new(target: Arc<dyn Broker>) -> Self {
        Relay { target }
    }
}

impl Handler for Relay {
    fn handle<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            let envelope = &delivery.envelope;
            self.target.publish(envelope).await.map_err(|e| {
                HandlerError::transient(herald::error_chain(&e))
            })?;
            let lag = herald::metrics::since(envelope.time);
            herald::metrics::relayed(&envelope.event_type, lag);
            Ok(())
        })
    }
}
