//! What the process tells about itself: logs, metrics and spans.
//!
//! - Logs go to stderr, human-readable or one JSON object per line
//!   (`--log-format json`). Every line inside a request or a handled
//!   event carries that span's fields: its trace id, span id and event id.
//! - Metrics are recorded by herald's crates through the `metrics` facade
//!   into a Prometheus recorder installed here, and served as text at
//!   `GET /metrics` ([`metrics_router`]).
//! - Spans are exported over OTLP when the binary is built with the `otlp`
//!   feature and started with `--otlp-endpoint`.
//!
//! Benchmarks turn all of it off and on again ([`set_enabled`]) to measure
//! what it costs.

use std::io::IsTerminal;
use std::str::FromStr;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use clap::ValueEnum;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tracing::Metadata;
use tracing::subscriber::Interest;
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::layer::{Context, Filter};
use tracing_subscriber::prelude::*;

#[cfg(feature = "otlp")]
mod otlp;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line per event, for people; in colour on a terminal.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Whether logs, spans and metrics are recorded at all; see
/// [`set_enabled`].
static ENABLED: AtomicBool = AtomicBool::new(true);

/// The installed Prometheus recorder's handle, to render `/metrics`.
static METRICS: OnceLock<PrometheusHandle> = OnceLock::new();

/// How often the recorder drops its expired data.
const UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// Sets up logs on stderr, filtered by `filter`, and span export when
/// `otlp_endpoint` is given. Call once, before the runtime starts (the
/// OTLP exporter runs on a thread of its own).
pub fn init_logging(
    filter: &str,
    format: LogFormat,
    otlp_endpoint: Option<&str>,
) -> Result<(), String> {
    let targets = log_targets(filter)?;
    let filter = targets.and(Switch);
    let ansi = format == LogFormat::Text && std::io::stderr().is_terminal();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let fmt = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    tracing_subscriber::registry()
        .with(span_export(otlp_endpoint)?)
        .with(fmt)
        .init();
    Ok(())
}

/// The layer exporting spans over OTLP, when asked for.
#[cfg(feature = "otlp")]
fn span_export(
    endpoint: Option<&str>,
) -> Result<Option<otlp::BoxedLayer>, String> {
    endpoint.map(otlp::layer).transpose()
}

/// Without the `otlp` feature there is no exporter to ask for.
#[cfg(not(feature = "otlp"))]
fn span_export(
    endpoint: Option<&str>,
) -> Result<Option<tracing_subscriber::layer::Identity>, String> {
    match endpoint {
        None => Ok(None),
        Some(_) => Err("--otlp-endpoint needs a herald built with the \
                        `otlp` feature: cargo build --release --features otlp"
            .to_owned()),
    }
}

/// Flushes the spans not exported yet; call before the process exits.
pub fn shutdown() {
    #[cfg(feature = "otlp")]
    otlp::shutdown();
}

/// Parses the `--log` filter. A bare word is a level, never a target:
/// `infoo` is a typo, and taking it as a target would silently turn every
/// log off.
fn log_targets(filter: &str) -> Result<Targets, String> {
    let invalid =
        |why: String| format!("invalid --log filter {filter:?}: {why}");
    for directive in filter.split(',').map(str::trim) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        LevelFilter::from_str(level).map_err(|_| {
            invalid(format!(
                "{level:?} is not a level (trace, debug, info, warn, error, off)"
            ))
        })?;
    }
    let mut targets =
        Targets::from_str(filter).map_err(|e| invalid(e.to_string()))?;
    // lapin logs each message RabbitMQ returns as unroutable whole,
    // headers and payload, which hold personal data; herald reports the
    // failure itself, by event id.
    if !filter.contains("lapin::returned_messages") {
        targets =
            targets.with_target("lapin::returned_messages", LevelFilter::OFF);
    }
    Ok(targets)
}

/// Installs the Prometheus recorder that every metric of the process goes
/// to, with herald's latency buckets on every histogram.
pub fn init_metrics() -> anyhow::Result<()> {
    let recorder = PrometheusBuilder::new()
        .set_buckets(herald::metrics::LATENCY_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(Switched(recorder))
        .map_err(|_| anyhow::anyhow!("a metrics recorder is already set"))?;
    herald::metrics::describe();
    let _ = METRICS.set(handle);
    Ok(())
}

/// `GET /metrics`: every metric of the process in the Prometheus text
/// format. Also keeps the recorder tidy while the runtime runs.
pub fn metrics_router() -> Router {
    let handle = METRICS.get().cloned();
    if let Some(handle) = handle.clone() {
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(UPKEEP_PERIOD);
            loop {
                ticks.tick().await;
                handle.run_upkeep();
            }
        });
    }
    Router::new().route(
        "/metrics",
        get(move || {
            let text = handle.as_ref().map(PrometheusHandle::render);
            async move {
                let content_type = "text/plain; version=0.0.4; charset=utf-8";
                (
                    [(axum::http::header::CONTENT_TYPE, content_type)],
                    text.unwrap_or_default(),
                )
            }
        }),
    )
}

/// Turns logs, spans and metrics off (`false`) or on again, for the whole
/// process. Only benchmarks do this, to measure what they cost.
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The log filter half that [`set_enabled`] controls. It is asked at every
/// call site each time, never cached, so that switching takes effect at
/// once.
struct Switch;

impl<S> Filter<S> for Switch {
    fn enabled(&self, _: &Metadata<'_>, _: &Context<'_, S>) -> bool {
        enabled()
    }

    fn callsite_enabled(&self, _: &'static Metadata<'static>) -> Interest {
        Interest::sometimes()
    }
}

/// The Prometheus recorder behind the switch of [`set_enabled`]: switched
/// off, every metric handed out records nothing.
struct Switched(metrics_exporter_prometheus::PrometheusRecorder);

impl metrics::Recorder for Switched {
    fn describe_counter(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        self.0.describe_counter(key, unit, description);
    }

    fn describe_gauge(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        self.0.describe_gauge(key, unit, description);
    }

    fn describe_histogram(
        &self,
        key: metrics::KeyName,
        unit: Option<metrics::Unit>,
        description: metrics::SharedString,
    ) {
        self.0.describe_histogram(key, unit, description);
    }

    fn register_counter(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Counter {
        if enabled() {
            self.0.register_counter(key, metadata)
        } else {
            metrics::Counter::noop()
        }
    }

    fn register_gauge(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Gauge {
        if enabled() {
            self.0.register_gauge(key, metadata)
        } else {
            metrics::Gauge::noop()
        }
    }

    fn register_histogram(
        &self,
        key: &metrics::Key,
        metadata: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if enabled() {
            self.0.register_histogram(key, metadata)
        } else {
            metrics::Histogram::noop()
        }
    }
}
