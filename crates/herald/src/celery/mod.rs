//! Celery's message protocol, version 2, over RabbitMQ: Python services
//! and herald share tasks.
//!
//! - [`worker`]: run Rust tasks that Python callers send with `delay` or
//!   `apply_async`, reporting results through the `rpc://` backend.
//! - [`client`]: send tasks from Rust to Python workers, and wait for
//!   their results.
//! - [`message`]: the wire format itself; [`result`]: result messages.
//!
//! Supported: the JSON serializer, positional and keyword arguments,
//! `eta`/`countdown`, `expires`, `retries`, `timelimit`, the `rpc://`
//! result backend. Not supported, and dead-lettered with a reason that
//! says so: other serializers (pickle, YAML, msgpack), compression,
//! protocol 1, canvas (callbacks, errbacks, chains, chords).

pub mod client;
pub mod message;
pub mod result;
pub mod worker;

pub use client::{CeleryClient, Send};
pub use message::{Outgoing, Refusal, Task as TaskMessage};
pub use result::Outcome;
pub use worker::{Call, CeleryOptions, Task, TaskError, serve};
