//! Sending Celery tasks from Rust, and waiting for their results.
//!
//! A [`CeleryClient`] holds one connection: a confirm channel to publish
//! on, and a reply queue of its own for the `rpc://` backend, declared as
//! Python's client declares its own (durable, deleted when unused, gone a
//! day after its last use). Tasks are published as Python's `delay` and
//! `apply_async` publish them: to the default exchange, routed by the
//! queue's name, after declaring the queue as Celery does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::{Map, Value};
use tokio::sync::Notify;

use super::message::Outgoing;
use super::result::Outcome;
use super::worker::{DEFAULT_QUEUE, declare_queue};
use crate::BusError;
use crate::trace::TraceContext;

/// How long a reply queue outlives its last use, as Celery's
/// `result_expires` default: one day.
const REPLY_QUEUE_EXPIRES_MS: i32 = 86_400_000;

/// How long any one call to RabbitMQ may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to RabbitMQ for sending Celery tasks.
pub struct CeleryClient {
    connection: Connection,
    publisher: Channel,
    /// This client's reply queue and the results it collects; `None` for
    /// a client that only sends.
    replies: Option<(String, Arc<Results>)>,
}

impl std::fmt::Debug for CeleryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CeleryClient")
            .field("reply_to", &self.replies.as_ref().map(|(q, _)| q))
            .finish()
    }
}

/// Results that arrived, by task id, until someone asks for them.
#[derive(Default)]
struct Results {
    arrived: Mutex<HashMap<String, Outcome>>,
    news: Notify,
}

/// A task to send: the equivalent of Python's `apply_async` options.
#[derive(Debug, Clone)]
pub struct Send {
    message: Outgoing,
    queue: String,
}

impl Send {
    /// A call of the task `name` with these arguments, to Celery's
    /// default queue, with a new id.
    pub fn task(
        name: impl Into<String>,
        args: Vec<Value>,
        kwargs: Map<String, Value>,
    ) -> Self {
        Send {
            message: Outgoing {
                id: uuid::Uuid::new_v4().to_string(),
                name: name.into(),
                args,
                kwargs,
                retries: 0,
                eta: None,
                expires: None,
                time_limit: None,
                soft_time_limit: None,
                root_id: None,
                parent_id: None,
                reply_to: None,
                ignore_result: false,
                traceparent: None,
            },
            queue: DEFAULT_QUEUE.to_owned(),
        }
    }

    /// The task id to use, e.g. one derived from an event's id so that
    /// sending again gives the same task.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.message.id = id.into();
        self
    }

    /// Run no sooner than `countdown` from now.
    pub fn countdown(self, countdown: Duration) -> Self {
        let eta = Utc::now() + countdown;
        self.eta(eta)
    }

    /// Run no sooner than `eta`.
    pub fn eta(mut self, eta: DateTime<Utc>) -> Self {
        self.message.eta = Some(eta);
        self
    }

    /// Not to be run after `expires`.
    pub fn expires(mut self, expires: DateTime<Utc>) -> Self {
        self.message.expires = Some(expires);
        self
    }

    /// Send to `queue` instead of `celery`.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// The hard and soft time limits, in seconds.
    pub fn time_limits(mut self, hard: Option<f64>, soft: Option<f64>) -> Self {
        self.message.time_limit = hard;
        self.message.soft_time_limit = soft;
        self
    }

    /// The trace the task belongs to.
    pub fn traceparent(mut self, trace: TraceContext) -> Self {
        self.message.traceparent = Some(trace);
        self
    }

    pub fn task_id(&self) -> &str {
        &self.message.id
    }
}

impl CeleryClient {
    /// Connects to RabbitMQ at `url` to send tasks whose results nobody
    /// waits for: they are sent with `ignore_result`.
    pub async fn sender(url: &str) -> Result<Self, BusError> {
        let connect = Connection::connect(url, ConnectionProperties::default());
        let connection = within("connect", connect).await?;
        let publisher =
            within("open a channel", connection.create_channel()).await?;
        within(
            "enable publisher confirms",
            publisher.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        Ok(CeleryClient {
            connection,
            publisher,
            replies: None,
        })
    }

    /// Connects to RabbitMQ at `url` and starts listening for results.
    pub async fn connect(url: &str) -> Result<Self, BusError> {
        let CeleryClient {
            connection,
            publisher,
            ..
        } = Self::sender(url).await?;

        let reply_to = uuid::Uuid::new_v4().to_string();
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-expires".into(),
            AMQPValue::LongInt(REPLY_QUEUE_EXPIRES_MS),
        );
        let options = QueueDeclareOptions {
            durable: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let replies =
            within("open a channel", connection.create_channel()).await?;
        within(
            "declare the reply queue",
            replies.queue_declare(reply_to.as_str().into(), options, arguments),
        )
        .await?;
        let mut consumer = within(
            "consume results",
            replies.basic_consume(
                reply_to.as_str().into(),
                "herald-celery-results".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            ),
        )
        .await?;
        let results = Arc::new(Results::default());
        let collecting = Arc::downgrade(&results);
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = consumer.next().await {
                let Some(results) = collecting.upgrade() else {
                    return;
                };
                if let Some((id, outcome)) = Outcome::from_reply(&delivery.data)
                {
                    results.arrived.lock().unwrap().insert(id, outcome);
                    results.news.notify_waiters();
                }
            }
        });

        Ok(CeleryClient {
            connection,
            publisher,
            replies: Some((reply_to, results)),
        })
    }

    /// Publishes the task, confirmed by RabbitMQ, and asks for its result
    /// on this client's reply queue; returns its id.
    pub async fn send(&self, send: Send) -> Result<String, BusError> {
        let Send { mut message, queue } = send;
        match &self.replies {
            Some((reply_to, _)) => message.reply_to = Some(reply_to.clone()),
            None => message.ignore_result = true,
        }
        declare_queue(&self.publisher, &queue, TIMEOUT).await?;
        let (properties, body) = message.encode();
        let confirmed = within("publish a task", async {
            self.publisher
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    &body,
                    properties,
                )
                .await?
                .await
        })
        .await?;
        match confirmed {
            Confirmation::Ack(None) => Ok(message.id),
            Confirmation::Ack(Some(_)) => Err(BusError::Unroutable {
                event_type: message.name,
            }),
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                Err(BusError::Nacked)
            }
        }
    }

    /// Waits up to `limit` for the result of the task `id` sent by this
    /// client; `None` when it has not come by then, or this client only
    /// sends.
    pub async fn result(&self, id: &str, limit: Duration) -> Option<Outcome> {
        let (_, results) = self.replies.as_ref()?;
        let waited = tokio::time::timeout(limit, async {
            loop {
                let news = results.news.notified();
                if let Some(outcome) =
                    results.arrived.lock().unwrap().remove(id)
                {
                    return outcome;
                }
                news.await;
            }
        });
        waited.await.ok()
    }

    pub async fn close(&self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// Runs a RabbitMQ call under the client's [`TIMEOUT`].
async fn within<T>(
    what: &'static str,
    operation: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, BusError> {
    crate::broker::amqp::within(TIMEOUT, what, operation).await
}
