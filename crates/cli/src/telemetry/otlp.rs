//! Span export over OTLP: herald's spans, sent as protobuf over HTTP to an
//! OpenTelemetry collector.
//!
//! Three pieces take part. The *layer* turns each `tracing` span into an
//! OpenTelemetry span. The *tracer provider* hands finished spans to a
//! batch processor, which posts them from a thread of its own, with
//! reqwest's blocking client, to `<endpoint>/v1/traces`. The *adopter* is
//! herald's [`SpanExporter`]: when a request or an event opens a span, it
//! makes the OpenTelemetry span a child of the incoming trace context and
//! gives back the ids the span was exported with, so that log lines,
//! events and the trace backend all name the same span.
//!
//! Only spans at `info` and above are exported, not log events: a span's
//! fields are ids, while a log line may say more than a trace backend needs
//! to hold. [`set_enabled`](super::set_enabled) turns span export off along
//! with the logs.

use std::sync::OnceLock;
use std::time::Duration;

use herald::trace::{SpanExporter, TraceContext};
use opentelemetry::Context;
use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    TracerProvider,
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::{Layer, Registry};

/// The span-export layer, boxed so that the subscriber's type does not
/// depend on whether it is there.
pub type BoxedLayer = Box<dyn Layer<Registry> + Send + Sync>;

/// The provider behind the layer, kept for [`shutdown`] to flush.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// How long one post of spans to the collector may take, connection
/// included.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long [`shutdown`] waits for the last spans to go: one post and a
/// little.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(6);

/// The path OTLP over HTTP takes traces at, below the collector's base URL.
const TRACES_PATH: &str = "/v1/traces";

/// Builds the layer exporting spans to the OTLP/HTTP collector at
/// `endpoint`, a base URL such as `http://127.0.0.1:4318`, and installs
/// herald's span exporter. Call once, outside any async runtime: the
/// blocking HTTP client cannot be built inside one.
pub fn layer(endpoint: &str) -> Result<BoxedLayer, String> {
    let url = traces_url(endpoint)?;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
        .with_endpoint(url)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        .map_err(|e| format!("cannot export spans to {endpoint}: {e}"))?;

    // Finished spans queue up and leave in batches, from the processor's
    // thread, so that no request waits on the collector.
    let resource = Resource::builder().with_service_name("herald").build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("herald");
    if PROVIDER.set(provider).is_err() {
        return Err("span export is already set up".to_owned());
    }

    // From here on, the spans herald places in a trace take their ids
    // from OpenTelemetry.
    herald::trace::set_exporter(Box::new(Adopter));
    let exported =
        filter_fn(|meta| meta.is_span() && *meta.level() <= Level::INFO);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(exported.and(super::Switch));
    Ok(Box::new(layer))
}

/// Sends the spans not exported yet and stops the exporter's thread,
/// waiting at most [`SHUTDOWN_TIMEOUT`]. Spans that end afterwards are
/// dropped.
pub fn shutdown() {
    let Some(provider) = PROVIDER.get() else {
        return;
    };
    if let Err(error) = provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT) {
        tracing::warn!(%error, "not every span could be exported");
    }
}

/// The URL spans are posted to: `endpoint` with the traces path added, as
/// the OTLP spec asks of a base URL, unless it ends with it already.
fn traces_url(endpoint: &str) -> Result<String, String> {
    let invalid =
        |why: &str| format!("invalid --otlp-endpoint {endpoint:?}: {why}");
    let base = endpoint.trim().trim_end_matches('/');
    let Some(rest) = base.strip_prefix("http://") else {
        return Err(invalid(
            "expected an http:// URL such as http://127.0.0.1:4318 \
             (span export has no TLS)",
        ));
    };
    if rest.is_empty() || rest.starts_with('/') {
        return Err(invalid("no host"));
    }
    if base.ends_with(TRACES_PATH) {
        Ok(base.to_owned())
    } else {
        Ok(format!("{base}{TRACES_PATH}"))
    }
}

/// herald's [`SpanExporter`] over the OpenTelemetry layer.
#[derive(Debug)]
struct Adopter;

impl SpanExporter for Adopter {
    fn adopt(
        &self,
        span: &tracing::Span,
        parent: Option<TraceContext>,
    ) -> Option<TraceContext> {
        // An explicit parent, empty for a root, so that the span never
        // inherits whatever span happens to be current.
        let parent_cx = match parent {
            Some(parent) => {
                Context::new().with_remote_span_context(remote(parent))
            }
            None => Context::new(),
        };
        if let Err(error) = span.set_parent(parent_cx) {
            tracing::debug!(%error, "span left out of its trace");
            return None;
        }

        // Reading the context starts the OpenTelemetry span, ids and all.
        let context = span.context();
        let own = context.span().span_context().clone();
        if !own.is_valid() {
            return None;
        }
        TraceContext::from_parts(
            u128::from_be_bytes(own.trace_id().to_bytes()),
            u64::from_be_bytes(own.span_id().to_bytes()),
            own.trace_flags().to_u8(),
        )
    }
}

/// The span context of a parent that lives in another process, or came
/// with an event.
fn remote(parent: TraceContext) -> SpanContext {
    let (trace_id, span_id, flags) = parent.parts();
    SpanContext::new(
        TraceId::from(trace_id),
        SpanId::from(span_id),
        TraceFlags::new(flags),
        true,
        TraceState::NONE,
    )
}
