//! herald: event-driven services over a durable bus.
//!
//! A service publishes [`Envelope`]s, each carrying one typed [`Event`]; a
//! [`Broker`] keeps them durably and hands them to the queues bound to
//! their type; a [`worker`] runs a [`Handler`] over a queue and settles
//! every delivery: acknowledged after success, retried with backoff after a
//! transient failure, dead-lettered after a permanent one.
//!
//! The default backend is [`EmbeddedBroker`]: the bus lives in the same
//! SQLite file as the service's own data, so a service can commit a change
//! and the event announcing it in one transaction.

pub mod broker;
pub mod db;
pub mod envelope;
pub mod outbox;
pub mod postgres;
pub mod sqlite;
pub mod trace;
pub mod worker;

pub use broker::amqp::{AmqpBroker, ReconnectingAmqp};
pub use broker::embedded::EmbeddedBroker;
pub use broker::{Broker, BusError, DeadLetter, DeadLetters, Delivery, Which};
pub use envelope::{DecodeError, Envelope, Event};
pub use trace::TraceContext;
pub use worker::{
    Handler, HandlerError, RetryPolicy, Subscription, WorkerOptions,
};

/// An error and all its causes, as one line: `outer: cause: root cause`.
/// A cause whose text the line already holds (some errors repeat their
/// source in their own message) is not said twice.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// A URL fit for logs: `scheme://user:secret@host` becomes
/// `scheme://user:***@host`.
pub fn redact_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:***@{host}{tail}")
        }
        None => url.to_owned(),
    }
}
