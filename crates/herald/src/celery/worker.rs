//! A Celery worker in Rust: consumes a Celery queue over RabbitMQ, runs
//! the tasks registered with it and reports each result to its caller
//! through the `rpc://` backend.
//!
//! What becomes of a task message:
//!
//! - Run, and its value returned to the caller (`SUCCESS`); acknowledged
//!   after the handler succeeded, so a worker that dies leaves it queued.
//! - Failed transiently: published again as Celery's `Task.retry` does,
//!   with `retries` one higher and an `eta` after herald's backoff, until
//!   the policy's last attempt.
//! - Failed for good, or on the last attempt: `FAILURE` to the caller,
//!   and the message to the dead letters (`<queue>.dead`) with the reason.
//! - Not runnable (an unknown task name, another serializer, protocol 1,
//!   canvas, a malformed body): dead-lettered at once with the reason, and
//!   `FAILURE` to the caller when it asked for a result. Never dropped,
//!   never looped.
//! - Past its `expires`: `REVOKED` to the caller, not run.
//!
//! A task with an `eta` more than a second away waits in a delay queue
//! (`<queue>.delay.<N>s`, the longest of 1 s, 2 s, 4 s ... 1 h that ends
//! before its time), which hands it back to the queue when its time to
//! live runs out; so waiting tasks hold no worker slot and no
//! unacknowledged message. Retries wait the same way. The `timelimit`
//! header's limits, when shorter than the worker's own, bound the run.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use futures_lite::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties,
};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;
use tracing::field::Empty;

use super::message;
use super::result::Outcome;
use crate::broker::BoxFuture;
use crate::broker::amqp::{RETRY_TIERS, within};
use crate::metrics::{self, Outcome as Settled};
use crate::worker::{HandlerError, RetryPolicy, shorten};
use crate::{BusError, trace};

/// Celery's default queue, exchange and routing key.
pub const DEFAULT_QUEUE: &str = "celery";

/// A task herald runs when Celery callers ask for it by name.
pub trait Task: Send + Sync + 'static {
    /// The registered name, e.g. `tasks.send_welcome_email`.
    fn name(&self) -> &'static str;

    /// Runs one call; the value is the task's result.
    fn run<'a>(
        &'a self,
        call: &'a Call,
    ) -> BoxFuture<'a, Result<Value, TaskError>>;
}

/// Why a task failed: whether to retry it, and the Python exception its
/// caller's `AsyncResult.get()` raises when it fails for good.
#[derive(Debug)]
pub struct TaskError {
    pub error: HandlerError,
    /// A built-in exception type: `Exception`, `ValueError`, `TypeError`.
    pub python_type: &'static str,
}

impl TaskError {
    /// A permanent failure raised as `ValueError` (a bad argument value).
    pub fn value_error(reason: impl Into<String>) -> Self {
        TaskError {
            error: HandlerError::permanent(reason),
            python_type: "ValueError",
        }
    }

    /// A permanent failure raised as `TypeError` (a call that does not fit
    /// the task's signature).
    pub fn type_error(reason: impl Into<String>) -> Self {
        TaskError {
            error: HandlerError::permanent(reason),
            python_type: "TypeError",
        }
    }
}

impl From<HandlerError> for TaskError {
    fn from(error: HandlerError) -> Self {
        TaskError {
            error,
            python_type: "Exception",
        }
    }
}

/// One call of a task, as its message asked for it.
#[derive(Debug, Clone)]
pub struct Call {
    pub message: message::Task,
}

impl Call {
    /// The call's arguments as `T`. Positional arguments take the names
    /// in `params`, in order; keyword arguments keep theirs. Too many
    /// positional arguments, an unknown keyword, or an argument given
    /// both ways fail the call for good with a `TypeError`, as Python's
    /// would.
    pub fn arguments<T: DeserializeOwned>(
        &self,
        params: &[&str],
    ) -> Result<T, TaskError> {
        let message = &self.message;
        if let Some(unknown) = message
            .kwargs
            .keys()
            .find(|k| !params.contains(&k.as_str()))
        {
            return Err(TaskError::type_error(format!(
                "{} got an unexpected keyword argument {:?}",
                message.name,
                shorten(unknown)
            )));
        }
        if message.args.len() > params.len() {
            return Err(TaskError::type_error(format!(
                "{} takes at most {} positional arguments ({}), {} given",
                message.name,
                params.len(),
                params.join(", "),
                message.args.len()
            )));
        }
        let mut named = Map::new();
        for (name, value) in params.iter().zip(&message.args) {
            named.insert((*name).to_owned(), value.clone());
        }
        for (name, value) in &message.kwargs {
            if named.insert(name.clone(), value.clone()).is_some() {
                return Err(TaskError::type_error(format!(
                    "{} got multiple values for argument {name:?}",
                    message.name
                )));
            }
        }
        serde_json::from_value(Value::Object(named)).map_err(|error| {
            TaskError::type_error(format!(
                "bad arguments for {}: {error}",
                message.name
            ))
        })
    }
}

/// How a Celery worker runs.
#[derive(Debug, Clone)]
pub struct CeleryOptions {
    /// The service's name in metrics and logs.
    pub service: &'static str,
    /// The queue to consume, declared as Celery declares it.
    pub queue: String,
    /// Tasks run at once (and the prefetch).
    pub concurrency: usize,
    /// A task still running after this long failed transiently, unless
    /// its `timelimit` header says sooner.
    pub time_limit: Duration,
    /// Attempts in all, the first included; retries are published anew.
    pub retry: RetryPolicy,
    /// On shutdown, how long running tasks may take to finish.
    pub shutdown_grace: Duration,
    /// How long any one call to RabbitMQ may take.
    pub timeout: Duration,
}

impl Default for CeleryOptions {
    fn default() -> Self {
        CeleryOptions {
            service: "celery",
            queue: DEFAULT_QUEUE.to_owned(),
            concurrency: 8,
            time_limit: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            shutdown_grace: Duration::from_secs(30),
            timeout: Duration::from_secs(10),
        }
    }
}

/// Runs `tasks` over the Celery queue at `url` until `shutdown`
/// completes. A lost connection is made again, with backoff; the tasks
/// it held are redelivered by RabbitMQ.
pub async fn serve(
    url: &str,
    tasks: Vec<Arc<dyn Task>>,
    options: CeleryOptions,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BusError> {
    let tasks: HashMap<&'static str, Arc<dyn Task>> =
        tasks.into_iter().map(|task| (task.name(), task)).collect();
    let tasks = Arc::new(tasks);
    tokio::pin!(shutdown);
    let mut wait = Duration::from_millis(250);
    loop {
        let session = Session::open(url, &options).await;
        let outcome = match session {
            Ok(session) => {
                wait = Duration::from_millis(250);
                session.run(&tasks, &options, &mut shutdown).await
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(()) => return Ok(()),
            Err(error) => tracing::warn!(
                error = %crate::error_chain(&error),
                "Celery worker lost RabbitMQ; connecting again in {wait:?}"
            ),
        }
        tokio::select! {
            _ = &mut shutdown => return Ok(()),
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// One connection's worth of consuming.
struct Session {
    connection: Connection,
    consuming: Channel,
    /// A channel in confirm mode for retries, results and dead letters.
    publisher: Channel,
}

impl Session {
    async fn open(
        url: &str,
        options: &CeleryOptions,
    ) -> Result<Self, BusError> {
        let limit = options.timeout;
        let connect = Connection::connect(url, ConnectionProperties::default());
        let connection = within(limit, "connect", connect).await?;
        let consuming =
            within(limit, "open a channel", connection.create_channel())
                .await?;
        let publisher =
            within(limit, "open a channel", connection.create_channel())
                .await?;
        within(
            limit,
            "enable publisher confirms",
            publisher.confirm_select(ConfirmSelectOptions::default()),
        )
        .await?;
        declare_queue(&consuming, &options.queue, limit).await?;
        let dead = format!("{}.dead", options.queue);
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        within(
            limit,
            "declare the dead letters",
            consuming.queue_declare(
                dead.as_str().into(),
                durable,
                FieldTable::default(),
            ),
        )
        .await?;
        declare_delay_queues(&consuming, &options.queue, limit).await?;
        let prefetch = options.concurrency.clamp(1, 65_535) as u16;
        within(
            limit,
            "set the prefetch",
            consuming.basic_qos(prefetch, BasicQosOptions::default()),
        )
        .await?;
        tracing::info!(
            queue = options.queue.as_str(),
            "consuming Celery tasks"
        );
        Ok(Session {
            connection,
            consuming,
            publisher,
        })
    }

    /// Consumes until `shutdown` (then `Ok`) or until the connection is
    /// lost (then the error).
    async fn run(
        self,
        tasks: &Arc<HashMap<&'static str, Arc<dyn Task>>>,
        options: &CeleryOptions,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), BusError> {
        let mut consumer = within(
            options.timeout,
            "start consuming",
            self.consuming.basic_consume(
                options.queue.as_str().into(),
                "herald-celery".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        let slots = Arc::new(Semaphore::new(options.concurrency.max(1)));
        let mut running = JoinSet::new();
        let lost = loop {
            let permit = tokio::select! {
                _ = &mut *shutdown => break None,
                permit = slots.clone().acquire_owned() => {
                    permit.expect("the semaphore is never closed")
                }
            };
            let delivery = tokio::select! {
                _ = &mut *shutdown => break None,
                next = consumer.next() => next,
            };
            let delivery = match delivery {
                Some(Ok(delivery)) => delivery,
                Some(Err(error)) => break Some(BusError::from(error)),
                None => break Some(BusError::Closed),
            };
            let handling = Handling {
                publisher: self.publisher.clone(),
                tasks: tasks.clone(),
                options: options.clone(),
            };
            running.spawn(async move {
                handling.handle_guarded(delivery).await;
                drop(permit);
            });
            while running.try_join_next().is_some() {}
        };

        // Let running tasks finish; what is cut off stays unacknowledged
        // and RabbitMQ hands it out again once the connection closes.
        let finished = tokio::time::timeout(options.shutdown_grace, async {
            while running.join_next().await.is_some() {}
        })
        .await;
        if finished.is_err() {
            tracing::warn!(
                abandoned = running.len(),
                "shutdown deadline passed; Celery tasks still running are \
                 handed back"
            );
            running.shutdown().await;
        }
        let _ = self.connection.close(200, "stopping".into()).await;
        match lost {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

/// Declares `queue` as Celery does: a durable direct exchange and a
/// durable queue of that name, bound by that name.
pub(crate) async fn declare_queue(
    channel: &Channel,
    queue: &str,
    limit: Duration,
) -> Result<(), BusError> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    within(
        limit,
        "declare a Celery exchange",
        channel.exchange_declare(
            queue.into(),
            lapin::ExchangeKind::Direct,
            durable_exchange,
            FieldTable::default(),
        ),
    )
    .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    within(
        limit,
        "declare a Celery queue",
        channel.queue_declare(queue.into(), durable, FieldTable::default()),
    )
    .await?;
    within(
        limit,
        "bind a Celery queue",
        channel.queue_bind(
            queue.into(),
            queue.into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ),
    )
    .await?;
    Ok(())
}

/// What handling one task message needs.
struct Handling {
    publisher: Channel,
    tasks: Arc<HashMap<&'static str, Arc<dyn Task>>>,
    options: CeleryOptions,
}

impl Handling {
    /// Handles `delivery`; should herald itself fail on it (a panic), the
    /// message is dead-lettered with that reason rather than left
    /// unacknowledged, to come back and fail again forever.
    async fn handle_guarded(&self, delivery: AmqpDelivery) {
        let handled = crate::worker::futures_catch_unwind(
            std::panic::AssertUnwindSafe(self.handle(&delivery)),
        )
        .await;
        if let Err(panic) = handled {
            let reason = format!(
                "herald failed while handling it: {}",
                crate::worker::panic_message(&panic)
            );
            tracing::error!(reason = reason.as_str(), "dead-lettering");
            if let Err(error) = self.dead_letter(&delivery, &reason, 1).await {
                tracing::warn!(
                    error = %crate::error_chain(&error),
                    "could not dead-letter it; RabbitMQ keeps it"
                );
            }
        }
    }

    async fn handle(&self, delivery: &AmqpDelivery) {
        let service = self.options.service;
        let span = tracing::info_span!(
            "handle",
            service,
            queue = self.options.queue.as_str(),
            task = Empty,
            task_id = Empty,
            retries = Empty,
            trace_id = Empty,
            span_id = Empty,
            parent_id = Empty,
        );
        let decoded =
            message::Task::decode(&delivery.properties, &delivery.data);
        let task = decoded.as_ref().ok().and_then(|m| {
            self.tasks
                .get(m.name.as_str())
                .map(|t| (t.name(), t.clone()))
        });
        let traceparent = decoded.as_ref().ok().and_then(|m| m.traceparent);
        if let Ok(message) = &decoded {
            span.record("task_id", message.id.as_str());
            span.record("retries", message.retries);
        }
        if let Some((name, _)) = &task {
            span.record("task", *name);
        }
        trace::continue_trace(&span, traceparent);

        async {
            let type_label =
                task.as_ref().map_or(metrics::UNKNOWN_TYPE, |t| t.0);
            let settled = match (decoded, task) {
                (Err(refusal), _) => {
                    let (module, kind) = refusal.python_exception();
                    let reason = refusal.to_string();
                    let failure = Outcome::Failure {
                        module: module.to_owned(),
                        kind: kind.to_owned(),
                        message: reason.clone(),
                    };
                    self.refuse(delivery, failure, &reason).await
                }
                (Ok(message), None) => {
                    let reason = format!(
                        "unknown task {:?}: this worker runs {}",
                        shorten(&message.name),
                        self.known_names()
                    );
                    // As Celery's own worker answers an unknown task.
                    let failure = Outcome::Failure {
                        module: "celery.exceptions".to_owned(),
                        kind: "NotRegistered".to_owned(),
                        message: reason.clone(),
                    };
                    self.refuse(delivery, failure, &reason).await
                }
                (Ok(message), Some((name, task))) => {
                    self.run(delivery, message, name, task).await
                }
            };
            match settled {
                // Waiting for its time, or expired: nothing was run.
                Ok(Recorded::Deferred | Recorded::Revoked) => {}
                Ok(Recorded::Settled(outcome)) => {
                    let queue = self.options.queue.as_str();
                    match outcome {
                        Settled::DeadLettered => {
                            metrics::dead_lettered(queue, type_label)
                        }
                        Settled::Retried => metrics::retried(queue, type_label),
                        _ => {}
                    }
                    metrics::handled(service, type_label, outcome, None);
                }
                Err(error) => {
                    tracing::warn!(
                        error = %crate::error_chain(&error),
                        "could not settle the task; RabbitMQ will hand it \
                         out again"
                    );
                    let _ = delivery
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await;
                }
            }
        }
        .instrument(span)
        .await;
    }

    fn known_names(&self) -> String {
        let mut names: Vec<&str> = self.tasks.keys().copied().collect();
        names.sort_unstable();
        names.join(", ")
    }

    /// Runs a task it knows, then settles its message by the outcome.
    async fn run(
        &self,
        delivery: &AmqpDelivery,
        message: message::Task,
        name: &'static str,
        task: Arc<dyn Task>,
    ) -> Result<Recorded, BusError> {
        // Not due yet: wait in a delay queue, holding no slot. The last
        // second is waited here.
        if let Some(eta) = message.eta {
            let wait = (eta - Utc::now()).to_std().unwrap_or_default();
            if wait >= Duration::from_secs(1) {
                self.defer(delivery, &delivery.properties, wait).await?;
                self.ack(delivery).await?;
                return Ok(Recorded::Deferred);
            }
            tokio::time::sleep(wait).await;
        }
        // Expiry is judged when the task is due, as Celery does.
        if message.expires.is_some_and(|expires| expires <= Utc::now()) {
            tracing::info!("the task expired before it could run; revoked");
            self.reply(&message, Outcome::Revoked).await?;
            self.ack(delivery).await?;
            return Ok(Recorded::Revoked);
        }

        let limit = [message.time_limit, message.soft_time_limit]
            .into_iter()
            .flatten()
            .filter_map(|s| Duration::try_from_secs_f64(s).ok())
            .fold(self.options.time_limit, Duration::min);
        let call = Call { message };
        let started = std::time::Instant::now();
        let run = async { Ok(task.run(&call).await) };
        let outcome = match crate::worker::run_guarded(run, limit).await {
            Ok(outcome) => outcome,
            Err(timed_out_or_panicked) => Err(timed_out_or_panicked.into()),
        };
        metrics::handler_ran(self.options.service, name, started.elapsed());
        let message = call.message;

        let error = match outcome {
            Ok(value) => {
                tracing::info!("task succeeded");
                self.reply(&message, Outcome::Success(value)).await?;
                self.ack(delivery).await?;
                return Ok(Recorded::Settled(Settled::Success));
            }
            Err(error) => error,
        };
        let attempts = message.retries.saturating_add(1);
        if let HandlerError::Transient {
            reason,
            retry_after,
        } = &error.error
            && attempts < self.options.retry.max_attempts
        {
            let delay = retry_after
                .unwrap_or_else(|| self.options.retry.backoff(attempts));
            self.retry_later(delivery, &message, delay).await?;
            tracing::info!(
                reason = reason.as_str(),
                retry_in_ms = delay.as_millis() as u64,
                "task failed; will retry"
            );
            self.ack(delivery).await?;
            return Ok(Recorded::Settled(Settled::Retried));
        }

        let reason = match &error.error {
            HandlerError::Permanent { reason } => reason.clone(),
            HandlerError::Transient { reason, .. } => {
                format!("gave up after {attempts} attempts: {reason}")
            }
        };
        tracing::warn!(reason = reason.as_str(), "task failed; dead-lettered");
        let failure = Outcome::Failure {
            module: "builtins".to_owned(),
            kind: error.python_type.to_owned(),
            message: error.error.to_string(),
        };
        self.reply(&message, failure).await?;
        self.dead_letter(delivery, &reason, attempts).await?;
        Ok(Recorded::Settled(Settled::DeadLettered))
    }

    /// Sets aside a message no task here can run, telling its caller
    /// `failure` when it asked for a result.
    async fn refuse(
        &self,
        delivery: &AmqpDelivery,
        failure: Outcome,
        reason: &str,
    ) -> Result<Recorded, BusError> {
        tracing::warn!(reason, "task message refused; dead-lettered");
        if let Some((id, reply_to)) =
            message::reply_address(&delivery.properties)
        {
            let (properties, body) = failure.reply(&id);
            self.publish("", &reply_to, properties, &body, false)
                .await?;
        }
        self.dead_letter(delivery, reason, 1).await?;
        Ok(Recorded::Settled(Settled::DeadLettered))
    }

    /// Publishes the outcome to the caller's reply queue, when it asked.
    async fn reply(
        &self,
        message: &message::Task,
        outcome: Outcome,
    ) -> Result<(), BusError> {
        let Some(reply_to) = message.reply_to.as_deref() else {
            return Ok(());
        };
        if message.ignore_result {
            return Ok(());
        }
        let (properties, body) = outcome.reply(&message.id);
        // The reply queue may be gone (the caller stopped waiting):
        // published without `mandatory`, such a result is dropped by
        // RabbitMQ, as with Celery.
        self.publish("", reply_to, properties, &body, false).await
    }

    /// Publishes the message again with `retries` one higher and an `eta`
    /// `delay` from now, as Celery's `Task.retry` does, to wait its turn
    /// in a delay queue.
    async fn retry_later(
        &self,
        delivery: &AmqpDelivery,
        message: &message::Task,
        delay: Duration,
    ) -> Result<(), BusError> {
        let eta = Utc::now() + delay;
        let retries = message.retries.saturating_add(1).min(i32::MAX as u32);
        let mut headers = headers_of(&delivery.properties);
        headers.insert("retries".into(), AMQPValue::LongInt(retries as i32));
        headers.insert(
            "eta".into(),
            AMQPValue::LongString(
                eta.to_rfc3339_opts(chrono::SecondsFormat::Micros, false)
                    .into(),
            ),
        );
        let properties = delivery.properties.clone().with_headers(headers);
        self.defer(delivery, &properties, delay).await
    }

    /// Publishes the message, with `properties`, to the delay queue that
    /// hands it back to the queue no later than `wait` from now; a wait
    /// under a second goes straight back.
    async fn defer(
        &self,
        delivery: &AmqpDelivery,
        properties: &BasicProperties,
        wait: Duration,
    ) -> Result<(), BusError> {
        let target = match delay_tier(wait) {
            Some(seconds) => delay_queue(&self.options.queue, seconds),
            None => self.options.queue.clone(),
        };
        let properties = properties.clone();
        self.publish("", &target, properties, &delivery.data, true)
            .await
    }

    /// Moves the message to `<queue>.dead`, whole, with the reason.
    async fn dead_letter(
        &self,
        delivery: &AmqpDelivery,
        reason: &str,
        attempts: u32,
    ) -> Result<(), BusError> {
        let mut headers = headers_of(&delivery.properties);
        headers.insert(
            crate::broker::amqp::REASON.into(),
            AMQPValue::LongString(reason.into()),
        );
        headers.insert(
            crate::broker::amqp::ATTEMPTS.into(),
            AMQPValue::LongUInt(attempts),
        );
        let now = crate::sqlite::now_millis();
        headers.insert(
            crate::broker::amqp::DEAD_AT.into(),
            AMQPValue::LongLongInt(now),
        );
        if !headers.contains_key(crate::broker::amqp::FIRST_FAILED) {
            headers.insert(
                crate::broker::amqp::FIRST_FAILED.into(),
                AMQPValue::LongLongInt(now),
            );
        }
        let properties = delivery.properties.clone().with_headers(headers);
        let dead = format!("{}.dead", self.options.queue);
        self.publish("", &dead, properties, &delivery.data, true)
            .await?;
        self.ack(delivery).await
    }

    async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: BasicProperties,
        body: &[u8],
        mandatory: bool,
    ) -> Result<(), BusError> {
        let confirmed = within(self.options.timeout, "publish", async {
            self.publisher
                .basic_publish(
                    exchange.into(),
                    routing_key.into(),
                    BasicPublishOptions {
                        mandatory,
                        ..BasicPublishOptions::default()
                    },
                    body,
                    properties,
                )
                .await?
                .await
        })
        .await?;
        match confirmed {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(_)) => Err(BusError::Unroutable {
                event_type: routing_key.to_owned(),
            }),
            Confirmation::Nack(_) | Confirmation::NotRequested => {
                Err(BusError::Nacked)
            }
        }
    }

    async fn ack(&self, delivery: &AmqpDelivery) -> Result<(), BusError> {
        within(
            self.options.timeout,
            "acknowledge",
            delivery.ack(BasicAckOptions::default()),
        )
        .await
        .map(drop)
    }
}

/// What became of a task message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    /// Run, retried or set aside, as metrics count it.
    Settled(Settled),
    /// Not due yet: waiting in a delay queue.
    Deferred,
    /// Expired before it was due: not run.
    Revoked,
}

/// The delay queue of `queue` whose messages wait `seconds`.
fn delay_queue(queue: &str, seconds: u64) -> String {
    format!("{queue}.delay.{seconds}s")
}

/// The longest delay tier that ends no later than `wait` from now; `None`
/// when even the shortest would.
fn delay_tier(wait: Duration) -> Option<u64> {
    RETRY_TIERS
        .iter()
        .rev()
        .copied()
        .find(|seconds| Duration::from_secs(*seconds) <= wait)
}

/// Declares the delay queues of `queue`: each holds its messages for its
/// time, then dead-letters them back to `queue` through the default
/// exchange.
async fn declare_delay_queues(
    channel: &Channel,
    queue: &str,
    limit: Duration,
) -> Result<(), BusError> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    for seconds in RETRY_TIERS {
        let mut arguments = FieldTable::default();
        arguments.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(seconds as i64 * 1000),
        );
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.into()),
        );
        let name = delay_queue(queue, seconds);
        within(
            limit,
            "declare a delay queue",
            channel.queue_declare(name.as_str().into(), durable, arguments),
        )
        .await?;
    }
    Ok(())
}

/// The message's application headers, to copy with changes.
fn headers_of(properties: &BasicProperties) -> FieldTable {
    properties.headers().clone().unwrap_or_default()
}
