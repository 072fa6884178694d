//! What herald measures about itself, through the `metrics` facade.
//!
//! The bus and the services record here; the process decides where the
//! numbers go by installing a recorder (the `herald` binary serves them in
//! the Prometheus text format at `/metrics`). Without a recorder every
//! call is a no-op.
//!
//! The words: a **service** is a named part of the system that does work
//! (`users` serves HTTP requests, `mailer` handles events); its latency is
//! the time one piece of its work takes. An event's **end-to-end latency**
//! is the time from the event's own timestamp to the moment a service
//! finished handling it.
//!
//! Every label set is bounded: services, routes, methods, statuses, queues
//! and event types come from code, never from a request. An event type no
//! subscription asked for is recorded as [`UNKNOWN_TYPE`].

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics::{
    Label, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

/// HTTP requests served, by service, route template, method and status.
pub const HTTP_REQUESTS: &str = "herald_http_requests_total";
/// How long HTTP requests took, labelled like [`HTTP_REQUESTS`].
pub const HTTP_DURATION: &str = "herald_http_request_duration_seconds";
/// Events made durable on the bus their consumers read, by type: committed
/// to the embedded bus, or confirmed by RabbitMQ. An event staged in an
/// outbox counts when its relay is confirmed.
pub const PUBLISHED: &str = "herald_events_published_total";
/// Events a service finished with, by service, type and outcome.
pub const HANDLED: &str = "herald_events_handled_total";
/// How long one run of a handler took, by service and type.
pub const HANDLER_DURATION: &str = "herald_handler_duration_seconds";
/// From the event's time to its successful handling, by service and type.
pub const EVENT_LATENCY: &str = "herald_event_latency_seconds";
/// The longest [`EVENT_LATENCY`] seen since the process started.
pub const EVENT_LATENCY_MAX: &str = "herald_event_latency_max_seconds";
/// The longest piece of work (a request, a handler run) of a service.
pub const SERVICE_LATENCY_MAX: &str = "herald_service_latency_max_seconds";
/// Messages waiting in a queue, ready to be handed out.
pub const QUEUE_DEPTH: &str = "herald_queue_depth";
/// How long the oldest message waiting in a queue has waited.
pub const QUEUE_OLDEST_AGE: &str = "herald_queue_oldest_age_seconds";
/// Messages dead-lettered, by queue and type.
pub const DEAD_LETTERS: &str = "herald_dead_letters_total";
/// Failed attempts scheduled to be tried again, by queue and type.
pub const RETRIES: &str = "herald_retries_total";
/// 1 while the process holds a connection to its broker, else 0.
pub const BROKER_CONNECTED: &str = "herald_broker_connected";
/// Connections to the broker made again after one was lost.
pub const BROKER_RECONNECTS: &str = "herald_broker_reconnects_total";
/// Events staged in an outbox and not yet relayed to the broker.
pub const OUTBOX_BACKLOG: &str = "herald_outbox_backlog";
/// Events relayed from an outbox to the broker, by type.
pub const OUTBOX_RELAYED: &str = "herald_outbox_relayed_total";
/// From an event's time to its relay's confirm by the broker, by type.
pub const OUTBOX_RELAY_LAG: &str = "herald_outbox_relay_lag_seconds";

/// The type label of events whose type no subscription asked for: their
/// type came from whoever published them, so it is not a label.
pub const UNKNOWN_TYPE: &str = "unknown";

/// Bucket bounds, in seconds, of every latency histogram: from half a
/// millisecond (a handler that does nothing) through the tens of
/// milliseconds of a password hash and an SMTP exchange to the minutes an
/// event waits while a broker or a mail server is away.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// What became of a delivery once its service was done with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Failed this time, and will be tried again.
    Retried,
    DeadLettered,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
        }
    }
}

/// Gives every metric its help text and unit, for the recorder to show.
/// Call once, after installing the recorder.
pub fn describe() {
    use Unit::{Count, Seconds};

    describe_counter!(HTTP_REQUESTS, Count, "HTTP requests served.");
    describe_histogram!(HTTP_DURATION, Seconds, "HTTP request duration.");
    describe_counter!(
        PUBLISHED,
        Count,
        "Events made durable on the bus consumers read."
    );
    describe_counter!(HANDLED, Count, "Deliveries handled, by outcome.");
    describe_histogram!(
        HANDLER_DURATION,
        Seconds,
        "Duration of one handler run."
    );
    describe_histogram!(
        EVENT_LATENCY,
        Seconds,
        "From the event's time to its successful handling."
    );
    describe_gauge!(EVENT_LATENCY_MAX, Seconds, "Longest event latency.");
    describe_gauge!(
        SERVICE_LATENCY_MAX,
        Seconds,
        "Longest request or handler run of a service."
    );
    describe_gauge!(QUEUE_DEPTH, Count, "Messages waiting in a queue.");
    describe_gauge!(
        QUEUE_OLDEST_AGE,
        Seconds,
        "Age of the oldest message waiting in a queue."
    );
    describe_counter!(DEAD_LETTERS, Count, "Messages dead-lettered.");
    describe_counter!(RETRIES, Count, "Failed attempts scheduled again.");
    describe_gauge!(BROKER_CONNECTED, "1 while connected to the broker.");
    describe_counter!(BROKER_RECONNECTS, Count, "Broker reconnections.");
    describe_gauge!(OUTBOX_BACKLOG, Count, "Events waiting in the outbox.");
    describe_counter!(OUTBOX_RELAYED, Count, "Events relayed to the broker.");
    describe_histogram!(
        OUTBOX_RELAY_LAG,
        Seconds,
        "From the event's time to the broker's confirm of its relay."
    );
}

/// One HTTP request served.
pub fn http_request(
    service: &'static str,
    method: &'static str,
    route: String,
    status: u16,
    took: Duration,
) {
    let status = status.to_string();
    let labels = labels(&[
        ("service", service),
        ("method", method),
        ("route", &route),
        ("status", &status),
    ]);
    counter!(HTTP_REQUESTS, labels.clone()).increment(1);
    histogram!(HTTP_DURATION, labels).record(took);
    raise_max(SERVICE_LATENCY_MAX, &[("service", service)], took);
}

/// One event published onto the bus or staged in an outbox.
pub fn published(event_type: &str) {
    counter!(PUBLISHED, "type" => event_type.to_owned()).increment(1);
}

/// One run of a handler, however it ended.
pub fn handler_ran(service: &'static str, event_type: &str, took: Duration) {
    let pairs = [("service", service), ("type", event_type)];
    histogram!(HANDLER_DURATION, labels(&pairs)).record(took);
    raise_max(SERVICE_LATENCY_MAX, &[("service", service)], took);
}

/// A service is done with a delivery, for now (`Retried`) or for good.
/// `latency` is the end-to-end latency of a success.
pub fn handled(
    service: &'static str,
    event_type: &str,
    outcome: Outcome,
    latency: Option<Duration>,
) {
    let pairs = [
        ("service", service),
        ("type", event_type),
        ("outcome", outcome.label()),
    ];
    counter!(HANDLED, labels(&pairs)).increment(1);
    if let Some(latency) = latency {
        let pairs = [("service", service), ("type", event_type)];
        histogram!(EVENT_LATENCY, labels(&pairs)).record(latency);
        raise_max(EVENT_LATENCY_MAX, &pairs, latency);
    }
}

/// A failed attempt that will be tried again.
pub fn retried(queue: &str, event_type: &str) {
    let pairs = [("queue", queue), ("type", event_type)];
    counter!(RETRIES, labels(&pairs)).increment(1);
}

/// A message moved to the dead letters.
pub fn dead_lettered(queue: &str, event_type: &str) {
    let pairs = [("queue", queue), ("type", event_type)];
    counter!(DEAD_LETTERS, labels(&pairs)).increment(1);
}

/// A queue's waiting messages, sampled.
pub fn queue_sampled(queue: &str, depth: u64, oldest: Option<Duration>) {
    gauge!(QUEUE_DEPTH, "queue" => queue.to_owned()).set(depth as f64);
    if let Some(age) = oldest {
        gauge!(QUEUE_OLDEST_AGE, "queue" => queue.to_owned()).set(age);
    }
}

/// The broker connection went up or down.
pub fn broker_connected(broker: &'static str, connected: bool) {
    gauge!(BROKER_CONNECTED, "broker" => broker).set(f64::from(connected));
}

/// A lost broker connection was made again.
pub fn broker_reconnected(broker: &'static str) {
    counter!(BROKER_RECONNECTS, "broker" => broker).increment(1);
}

/// The events waiting in an outbox, sampled.
pub fn outbox_backlog(outbox: &'static str, waiting: u64) {
    gauge!(OUTBOX_BACKLOG, "outbox" => outbox).set(waiting as f64);
}

/// An event relayed from an outbox, `lag` after its time.
pub fn relayed(event_type: &str, lag: Duration) {
    let labels = labels(&[("type", event_type)]);
    counter!(OUTBOX_RELAYED, labels.clone()).increment(1);
    histogram!(OUTBOX_RELAY_LAG, labels).record(lag);
}

/// The time since `time`, or zero for a time in the future (clocks of two
/// machines disagree a little).
pub fn since(time: chrono::DateTime<chrono::Utc>) -> Duration {
    (chrono::Utc::now() - time).to_std().unwrap_or_default()
}

/// Labels whose values are owned, as the recorder keeps them.
fn labels(pairs: &[(&'static str, &str)]) -> Vec<Label> {
    pairs
        .iter()
        .map(|(key, value)| Label::new(*key, (*value).to_owned()))
        .collect()
}

/// Sets the gauge `name` to `value` when that is the largest seen for its
/// labels. Histograms only bound the largest value by a bucket; operators
/// want the value itself.
fn raise_max(
    name: &'static str,
    labels: &[(&'static str, &str)],
    value: Duration,
) {
    static LARGEST: OnceLock<Mutex<HashMap<String, f64>>> = OnceLock::new();

    let value = value.as_secs_f64();
    let mut key = name.to_owned();
    for (_, label) in labels {
        key.push('\0');
        key.push_str(label);
    }
    let mut largest = LARGEST.get_or_init(Default::default).lock().unwrap();
    let seen = largest.entry(key).or_insert(f64::NEG_INFINITY);
    if value > *seen {
        *seen = value;
        gauge!(name, self::labels(labels)).set(value);
    }
}
