//! Workers: run a handler over a queue and settle every delivery.
//!
//! A [`Subscription`] names the queue, the event types bound to it and how
//! its deliveries are handled: how many at once, under what time limit,
//! with what [`RetryPolicy`]. The handler's result decides what happens to
//! a delivery:
//!
//! - `Ok(())`: acknowledged.
//! - [`HandlerError::Transient`]: offered again after a backoff, until the
//!   policy's last attempt, then dead-lettered with the last error. A
//!   handler that panics or runs out of time failed transiently.
//! - [`HandlerError::Permanent`]: dead-lettered at once.
//!
//! A delivery that no handler could make sense of (an event type the
//! subscription did not ask for, a payload that is not JSON text) is
//! dead-lettered before the handler runs, with a reason that says what was
//! wrong: garbage never loops, and never reaches handler code.
//!
//! Shutting down stops receiving, lets handlers in flight finish until a
//! deadline, then stops the rest and hands their deliveries back to the
//! broker, to be delivered again at once: nothing is acknowledged without
//! having been handled, and nothing waits for a lease to run out.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::broker::{BoxFuture, Broker, BusError, Delivery};
use crate::metrics::{self, Outcome};

/// Handles one delivery at a time; many may run at once.
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>>;
}

/// Why a handler did not succeed, which decides what becomes of the
/// delivery.
#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    /// Worth trying again: a timeout, a refused connection, a busy server.
    #[error("{reason}")]
    Transient {
        reason: String,
        /// Wait this long before the next attempt instead of the policy's
        /// backoff, e.g. when a server said when to come back.
        retry_after: Option<Duration>,
    },
    /// Will fail the same way every time: dead-letter it.
    #[error("{reason}")]
    Permanent { reason: String },
}

impl HandlerError {
    pub fn transient(reason: impl Into<String>) -> Self {
        HandlerError::Transient {
            reason: reason.into(),
            retry_after: None,
        }
    }

    pub fn permanent(reason: impl Into<String>) -> Self {
        HandlerError::Permanent {
            reason: reason.into(),
        }
    }
}

/// How often and how long to wait between attempts at a failing delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 8,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(600),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): exponential
    /// backoff with full jitter, a random time between zero and
    /// `min(cap, base × 2^(attempt - 1))`, so that consumers failing
    /// together do not retry together.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(32);
        let ceiling = self
            .base
            .saturating_mul(1u32 << exponent.min(31))
            .min(self.cap);
        ceiling.mul_f64(fastrand::f64())
    }
}

/// Which queue to consume and for which events.
#[derive(Debug, Clone)]
pub struct Subscription {
    /// The service whose work this is, as metrics and logs name it;
    /// `None` for plumbing, such as an outbox relay, that records metrics
    /// of its own.
    pub service: Option<&'static str>,
    pub queue: String,
    pub event_types: Vec<&'static str>,
    pub options: WorkerOptions,
}

/// How a worker runs its handler.
#[derive(Debug, Clone, Copy)]
pub struct WorkerOptions {
    /// Deliveries handled at once.
    pub concurrency: usize,
    /// A handler still running after this long failed transiently.
    pub handler_timeout: Duration,
    pub retry: RetryPolicy,
    /// On shutdown, how long handlers in flight may take to finish before
    /// their deliveries are handed back.
    pub shutdown_grace: Duration,
    /// Handle the events of one key (their `subject`) one at a time, in
    /// publish order, retries included; events of different keys still
    /// run in parallel. See [`Broker::bind_ordered`].
    pub per_key_order: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 8,
            handler_timeout: Duration::from_secs(60),
            retry: RetryPolicy::default(),
            shutdown_grace: Duration::from_secs(30),
            per_key_order: false,
        }
    }
}

/// Binds the subscription's queue, then handles its deliveries until
/// `shutdown` completes. Returns after the graceful stop.
pub async fn run(
    broker: Arc<dyn Broker>,
    subscription: Subscription,
    handler: Arc<dyn Handler>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), BusError> {
    let queue = subscription.queue.as_str();
    let options = subscription.options;
    if options.per_key_order {
        broker
            .bind_ordered(queue, &subscription.event_types)
            .await?;
    } else {
        broker.bind(queue, &subscription.event_types).await?;
    }
    let context = Arc::new(Context {
        service: subscription.service,
        broker: broker.clone(),
        handler,
        event_types: subscription.event_types.into(),
        options,
        unsettled: Unsettled::default(),
        // Where the broker cannot keep a key's order across a retry, the
        // worker retries in place, holding the key's later events.
        retry_in_place: options.per_key_order
            && !broker.keeps_order_across_retries(),
    });
    let lanes = Lanes::default();
    let sampler = tokio::spawn(sample_depth(broker.clone(), queue.to_owned()));

    let slots = Arc::new(Semaphore::new(options.concurrency.max(1)));
    let mut in_flight = JoinSet::new();
    tokio::pin!(shutdown);

    loop {
        // Wait for a free slot, then take as many deliveries as there are
        // free slots, so that nothing is received that cannot start now.
        let first = tokio::select! {
            _ = &mut shutdown => break,
            permit = slots.clone().acquire_owned() => {
                permit.expect("the semaphore is never closed")
            }
        };
        let free = 1 + slots.available_permits();
        let batch = tokio::select! {
            _ = &mut shutdown => break,
            batch = broker.receive(queue, free) => batch,
        };
        let batch = match batch {
            Ok(batch) => batch,
            Err(error) => {
                tracing::error!(
                    queue, error = %error, "could not receive; retrying"
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };

        let mut first = Some(first);
        for delivery in batch {
            let permit = match first.take() {
                Some(permit) => permit,
                None => slots
                    .clone()
                    .try_acquire_owned()
                    .expect("received no more than the free slots"),
            };
            let job = Job {
                unsettled: context.unsettled.hold(&delivery),
                delivery,
                permit,
            };
            let key = job.delivery.envelope.subject.clone();
            match key.filter(|_| options.per_key_order) {
                // One lane per key: its events run one at a time, in order.
                Some(key) => {
                    if let Some(job) = lanes.enqueue(&key, job) {
                        let (context, lanes) = (context.clone(), lanes.clone());
                        in_flight.spawn(async move {
                            lanes.run(&key, job, &context).await;
                        });
                    }
                }
                None => {
                    let context = context.clone();
                    in_flight.spawn(async move { context.handle(job).await });
                }
            }
        }
        // Reap finished handlers so the set does not grow without bound.
        while in_flight.try_join_next().is_some() {}
    }

    sampler.abort();
    drain(in_flight, options.shutdown_grace, queue).await;
    hand_back(&*broker, context.unsettled.take(), queue).await;
    Ok(())
}

/// How often a worker samples its queue's depth for the metrics.
const DEPTH_SAMPLE_PERIOD: Duration = Duration::from_secs(5);

/// Records how many messages wait in `queue`, and how old the oldest is,
/// every [`DEPTH_SAMPLE_PERIOD`], until aborted.
async fn sample_depth(broker: Arc<dyn Broker>, queue: String) {
    let mut ticks = tokio::time::interval(DEPTH_SAMPLE_PERIOD);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        match broker.queue_depth(&queue).await {
            Ok(depth) => {
                metrics::queue_sampled(&queue, depth.waiting, depth.oldest)
            }
            Err(error) => tracing::debug!(
                queue,
                error = %crate::error_chain(&error),
                "could not sample the queue's depth"
            ),
        }
    }
}

/// What every handling task of a worker shares.
struct Context {
    service: Option<&'static str>,
    broker: Arc<dyn Broker>,
    handler: Arc<dyn Handler>,
    event_types: Arc<[&'static str]>,
    options: WorkerOptions,
    unsettled: Unsettled,
    retry_in_place: bool,
}

/// A delivery to handle, with its slot of the worker's concurrency.
struct Job {
    delivery: Delivery,
    permit: tokio::sync::OwnedSemaphorePermit,
    unsettled: u64,
}

/// How long an ordered event may be held, retried in place, before it is
/// given up: below RabbitMQ's consumer timeout (30 minutes by default),
/// which would otherwise take it away mid-retry.
const IN_PLACE_HOLD_LIMIT: Duration = Duration::from_secs(25 * 60);

impl Context {
    /// Handles one delivery and settles it, in a span that continues the
    /// event's trace, so that every log line of it carries the event's id
    /// and its trace's.
    async fn handle(&self, job: Job) {
        let Job {
            mut delivery,
            permit,
            unsettled,
        } = job;
        let span = tracing::info_span!(
            "handle",
            service = tracing::field::Empty,
            queue = delivery.queue.as_str(),
            event_id = %delivery.envelope.id,
            attempt = delivery.attempt,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
            parent_id = tracing::field::Empty,
        );
        if let Some(service) = self.service {
            span.record("service", service);
        }
        crate::trace::continue_trace(&span, delivery.envelope.traceparent);
        let recorded = Recorded {
            service: self.service,
            event_type: self.type_label(&delivery),
        };
        async {
            let outcome = self.outcome(&mut delivery, &recorded).await;
            let settled =
                settle(&*self.broker, outcome, &delivery, &self.options).await;
            if let Some(settled) = settled {
                recorded.settled(settled, &delivery);
            }
        }
        .instrument(span)
        .await;
        self.unsettled.settled(unsettled);
        drop(permit);
    }

    /// The event type as metrics name it: one the subscription asked for,
    /// or [`metrics::UNKNOWN_TYPE`].
    fn type_label(&self, delivery: &Delivery) -> &'static str {
        let event_type = delivery.envelope.event_type.as_str();
        self.event_types
            .iter()
            .find(|known| **known == event_type)
            .copied()
            .unwrap_or(metrics::UNKNOWN_TYPE)
    }

    /// The handler's outcome for `delivery`, after any retries in place.
    async fn outcome(
        &self,
        delivery: &mut Delivery,
        recorded: &Recorded,
    ) -> Result<(), HandlerError> {
        if let Some(reason) = unhandleable(delivery, &self.event_types) {
            return Err(HandlerError::Permanent { reason });
        }
        let held_since = tokio::time::Instant::now();
        loop {
            let started = std::time::Instant::now();
            let outcome =
                run_handler(&*self.handler, delivery, &self.options).await;
            recorded.ran(started.elapsed());
            let Err(HandlerError::Transient {
                reason,
                retry_after,
            }) = &outcome
            else {
                return outcome;
            };
            let policy = &self.options.retry;
            if !self.retry_in_place || delivery.attempt >= policy.max_attempts {
                return outcome;
            }
            let delay =
                retry_after.unwrap_or_else(|| policy.backoff(delivery.attempt));
            if held_since.elapsed() + delay > IN_PLACE_HOLD_LIMIT {
                return Err(HandlerError::permanent(format!(
                    "gave up after holding it in order for {:?}: {reason}",
                    held_since.elapsed()
                )));
            }
            tracing::info!(
                reason = reason.as_str(),
                retry_in_ms = delay.as_millis() as u64,
                "transient failure; retrying in place to keep its key in order"
            );
            recorded.settled(Outcome::Retried, delivery);
            tokio::time::sleep(delay).await;
            delivery.attempt += 1;
        }
    }
}

/// Records what a worker does with one delivery, under the labels its
/// metrics carry.
struct Recorded {
    service: Option<&'static str>,
    event_type: &'static str,
}

impl Recorded {
    /// One run of the handler.
    fn ran(&self, took: Duration) {
        if let Some(service) = self.service {
            metrics::handler_ran(service, self.event_type, took);
        }
    }

    /// The delivery was settled with `outcome`.
    fn settled(&self, outcome: Outcome, delivery: &Delivery) {
        let queue = delivery.queue.as_str();
        match outcome {
            Outcome::Success => {}
            Outcome::Retried => metrics::retried(queue, self.event_type),
            Outcome::DeadLettered => {
                metrics::dead_lettered(queue, self.event_type)
            }
        }
        if let Some(service) = self.service {
            let latency = (outcome == Outcome::Success)
                .then(|| metrics::since(delivery.envelope.time));
            metrics::handled(service, self.event_type, outcome, latency);
        }
    }
}

/// The events waiting behind the one in flight, for each key that has
/// one in flight.
#[derive(Clone, Default)]
struct Lanes {
    waiting: Arc<Mutex<HashMap<String, std::collections::VecDeque<Job>>>>,
}

impl Lanes {
    /// Queues `job` behind its key's event in flight; returns it when the
    /// key has none, for the caller to start a lane with.
    fn enqueue(&self, key: &str, job: Job) -> Option<Job> {
        let mut waiting = self.waiting.lock().unwrap();
        match waiting.get_mut(key) {
            Some(queue) => {
                queue.push_back(job);
                None
            }
            None => {
                waiting.insert(key.to_owned(), Default::default());
                Some(job)
            }
        }
    }

    /// Handles `first`, then each event of `key` that queued behind it, in
    /// order, until none is left.
    async fn run(&self, key: &str, first: Job, context: &Context) {
        let mut job = first;
        loop {
            context.handle(job).await;
            let mut waiting = self.waiting.lock().unwrap();
            let next = waiting.get_mut(key).and_then(|queue| queue.pop_front());
            match next {
                Some(next) => job = next,
                None => {
                    waiting.remove(key);
                    return;
                }
            }
        }
    }
}

/// The deliveries handed to handlers and not settled yet, so that those
/// still running at the shutdown deadline can be handed back.
#[derive(Clone, Default)]
struct Unsettled {
    held: Arc<Mutex<HashMap<u64, Delivery>>>,
    next: Arc<std::sync::atomic::AtomicU64>,
}

impl Unsettled {
    fn hold(&self, delivery: &Delivery) -> u64 {
        use std::sync::atomic::Ordering;
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        self.held.lock().unwrap().insert(key, delivery.clone());
        key
    }

    fn settled(&self, key: u64) {
        self.held.lock().unwrap().remove(&key);
    }

    fn take(&self) -> Vec<Delivery> {
        self.held.lock().unwrap().drain().map(|(_, d)| d).collect()
    }
}

/// Returns deliveries whose handlers were stopped to the broker, to be
/// delivered again at once without counting the attempt.
async fn hand_back(
    broker: &dyn Broker,
    deliveries: Vec<Delivery>,
    queue: &str,
) {
    if deliveries.is_empty() {
        return;
    }
    let mut handed_back = 0;
    for delivery in &deliveries {
        match broker.release(delivery).await {
            Ok(()) => handed_back += 1,
            Err(error) => tracing::warn!(
                queue,
                event_id = %delivery.envelope.id,
                error = %error,
                "could not hand a delivery back; it is delivered again \
                 when its lease runs out"
            ),
        }
    }
    tracing::info!(queue, handed_back, "handed unfinished deliveries back");
}

/// Waits for handlers in flight until `grace` runs out, then stops the
/// rest.
async fn drain(mut in_flight: JoinSet<()>, grace: Duration, queue: &str) {
    while in_flight.try_join_next().is_some() {}
    if in_flight.is_empty() {
        return;
    }
    tracing::info!(queue, in_flight = in_flight.len(), "finishing handlers");
    let finished = tokio::time::timeout(grace, async {
        while in_flight.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            queue,
            abandoned = in_flight.len(),
            "shutdown deadline passed; stopping the handlers still running"
        );
        in_flight.shutdown().await;
    }
}

/// Why `delivery` cannot be handled as sent, whatever the handler: its
/// event type is not one the subscription asked for, or its payload is not
/// JSON text. `None` when the handler should have it.
fn unhandleable(delivery: &Delivery, event_types: &[&str]) -> Option<String> {
    let envelope = &delivery.envelope;
    if !event_types.contains(&envelope.event_type.as_str()) {
        return Some(format!(
            "unknown event type {:?}: queue {} handles {}",
            shorten(&envelope.event_type),
            delivery.queue,
            event_types.join(", ")
        ));
    }
    if !envelope.content_type.starts_with(crate::envelope::JSON) {
        return Some(format!(
            "content type {:?} is not {}",
            shorten(&envelope.content_type),
            crate::envelope::JSON
        ));
    }
    if let Err(error) = std::str::from_utf8(&envelope.data) {
        return Some(format!("the payload is not UTF-8: {error}"));
    }
    if let Err(error) =
        serde_json::from_slice::<serde::de::IgnoredAny>(&envelope.data)
    {
        return Some(format!("the payload is not JSON: {error}"));
    }
    None
}

/// Text from a message, cut short enough for a log line or a reason.
pub(crate) fn shorten(text: &str) -> String {
    const MAX: usize = 100;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// Settles one delivery by its handler's outcome; returns what became of
/// it, or `None` when the broker could not be told.
async fn settle(
    broker: &dyn Broker,
    outcome: Result<(), HandlerError>,
    delivery: &Delivery,
    options: &WorkerOptions,
) -> Option<Outcome> {
    let event_type = delivery.envelope.event_type.as_str();
    let attempt = delivery.attempt;

    let (settled, outcome) = match outcome {
        Ok(()) => {
            tracing::debug!(event_type, "handled");
            (broker.ack(delivery).await, Outcome::Success)
        }
        Err(HandlerError::Permanent { reason }) => {
            tracing::warn!(
                event_type,
                reason,
                "permanent failure; dead-lettered"
            );
            let settled = broker.dead_letter(delivery, &reason).await;
            (settled, Outcome::DeadLettered)
        }
        Err(HandlerError::Transient { reason, .. })
            if attempt >= options.retry.max_attempts =>
        {
            tracing::warn!(
                event_type,
                reason,
                "failed on the last attempt; dead-lettered"
            );
            let reason = format!("gave up after {attempt} attempts: {reason}");
            let settled = broker.dead_letter(delivery, &reason).await;
            (settled, Outcome::DeadLettered)
        }
        Err(HandlerError::Transient {
            reason,
            retry_after,
        }) => {
            let delay =
                retry_after.unwrap_or_else(|| options.retry.backoff(attempt));
            let scheduled = broker.retry(delivery, delay, &reason).await;
            if let Ok(wait) = &scheduled {
                let retry_in_ms = wait.as_millis() as u64;
                // One failure is routine; a run of them is worth a warning
                // before the message runs out of attempts.
                if attempt >= 3 {
                    tracing::warn!(
                        event_type,
                        reason,
                        retry_in_ms,
                        "failing repeatedly; will retry"
                    );
                } else {
                    tracing::info!(
                        event_type,
                        reason,
                        retry_in_ms,
                        "transient failure; will retry"
                    );
                }
            }
            (scheduled.map(drop), Outcome::Retried)
        }
    };

    match settled {
        Ok(()) => Some(outcome),
        Err(error) => {
            tracing::warn!(
                event_type,
                error = %error,
                "could not settle; the broker will deliver it again"
            );
            None
        }
    }
}

/// The handler's result, with a panic or a timeout turned into a transient
/// failure.
async fn run_handler(
    handler: &dyn Handler,
    delivery: &Delivery,
    options: &WorkerOptions,
) -> Result<(), HandlerError> {
    run_guarded(handler.handle(delivery), options.handler_timeout).await
}

/// Runs a handler's `work` for at most `limit`, a panic or a timeout
/// turned into a transient failure.
pub(crate) async fn run_guarded<T>(
    work: impl Future<Output = Result<T, HandlerError>>,
    limit: Duration,
) -> Result<T, HandlerError> {
    use std::panic::AssertUnwindSafe;

    let timed = tokio::time::timeout(
        limit,
        futures_catch_unwind(AssertUnwindSafe(work)),
    );
    match timed.await {
        Ok(Ok(result)) => result,
        Ok(Err(panic)) => Err(HandlerError::transient(format!(
            "handler panicked: {}",
            panic_message(&panic)
        ))),
        Err(_) => Err(HandlerError::transient(format!(
            "handler timed out after {limit:?}"
        ))),
    }
}

/// Polls `future`, turning a panic inside it into an error.
pub(crate) async fn futures_catch_unwind<F: Future>(
    future: std::panic::AssertUnwindSafe<F>,
) -> Result<F::Output, Box<dyn std::any::Any + Send>> {
    let mut future = std::pin::pin!(future.0);
    std::future::poll_fn(move |cx| {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            future.as_mut().poll(cx)
        })) {
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Ok(std::task::Poll::Ready(output)) => {
                std::task::Poll::Ready(Ok(output))
            }
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    })
    .await
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "a non-text panic".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_stays_under_the_exponential_ceiling_and_the_cap() {
        let policy = RetryPolicy {
            max_attempts: 8,
            base: Duration::from_secs(1),
            cap: Duration::from_secs(10),
        };
        for _ in 0..1000 {
            assert!(policy.backoff(1) <= Duration::from_secs(1));
            assert!(policy.backoff(3) <= Duration::from_secs(4));
            assert!(policy.backoff(10) <= Duration::from_secs(10));
            assert!(policy.backoff(u32::MAX) <= Duration::from_secs(10));
        }
    }

    #[test]
    fn backoff_is_jittered() {
        let policy = RetryPolicy::default();
        let waits: std::collections::HashSet<_> =
            (0..50).map(|_| policy.backoff(5)).collect();
        assert!(waits.len() > 1);
    }
}
