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
pub mod envelope;
pub mod sqlite;
pub mod trace;
pub mod worker;

pub use broker::amqp::AmqpBroker;
pub use broker::embedded::EmbeddedBroker;
pub use broker::{Broker, BusError, DeadLetter, Delivery};
pub use envelope::{DecodeError, Envelope, Event};
pub use trace::TraceContext;
pub use worker::{
    Handler, HandlerError, RetryPolicy, Subscription, WorkerOptions,
};
