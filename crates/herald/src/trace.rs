//! W3C trace context: the `traceparent` that ties an HTTP request to the
//! events it caused and to the work those events caused in turn.
//!
//! herald carries the context in every event and gives each request and
//! each handled event a `tracing` span whose `trace_id`, `span_id` and
//! `parent_id` fields place it in its trace, so that every log line of it
//! says which trace it belongs to. Exporting spans to a tracing backend is
//! left to a [`SpanExporter`] the process may install.

use std::fmt;
use std::sync::OnceLock;

/// One position in a distributed trace: the trace it belongs to and the
/// span that is current, in the `traceparent` format
/// `00-<trace id>-<parent span id>-<flags>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceContext {
    trace_id: u128,
    span_id: u64,
    flags: u8,
}

impl TraceContext {
    /// Starts a new trace, sampled.
    pub fn new_root() -> Self {
        TraceContext {
            trace_id: nonzero_u128(),
            span_id: nonzero_u64(),
            flags: 0x01,
        }
    }

    /// A new span in the same trace, with this one as its parent.
    pub fn child(&self) -> Self {
        TraceContext {
            span_id: nonzero_u64(),
            ..*self
        }
    }

    /// Reads a `traceparent` header. Returns `None` for anything that is
    /// not a well-formed context, as the W3C spec asks: a malformed header
    /// starts a new trace rather than failing the request. A version
    /// above 00 is read by its first four fields, which later versions
    /// keep, as the spec says to.
    pub fn parse(header: &str) -> Option<Self> {
        let header = header.trim();
        let mut parts = header.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let version = lower_hex::<u8>(version, 2)?;
        let extended = parts.next().is_some();
        if version == 0xff || (version == 0 && extended) {
            return None;
        }
        let trace_id = lower_hex::<u128>(trace, 32)?;
        let span_id = lower_hex::<u64>(span, 16)?;
        let flags = lower_hex::<u8>(flags, 2)?;
        if trace_id == 0 || span_id == 0 {
            return None;
        }
        Some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// A context from its parts; `None` when an id is zero, which W3C
    /// reserves for "no trace".
    pub fn from_parts(trace_id: u128, span_id: u64, flags: u8) -> Option<Self> {
        (trace_id != 0 && span_id != 0).then_some(TraceContext {
            trace_id,
            span_id,
            flags,
        })
    }

    /// The trace id, span id and flags.
    pub fn parts(&self) -> (u128, u64, u8) {
        (self.trace_id, self.span_id, self.flags)
    }

    /// The trace id as 32 lower-case hex digits, as logs show it.
    pub fn trace_id(&self) -> String {
        format!("{:032x}", self.trace_id)
    }

    /// The span id as 16 lower-case hex digits, as logs show it.
    pub fn span_id(&self) -> String {
        format!("{:016x}", self.span_id)
    }
}

/// Hands spans to a tracing backend (OpenTelemetry, say) and lets that
/// backend choose their ids, so that what is exported and what events
/// carry agree.
pub trait SpanExporter: Send + Sync + 'static {
    /// Makes `span`, not yet entered, the child of `parent` (a root when
    /// `None`) and returns the context the backend gave it; `None` when
    /// the backend does not see this span.
    fn adopt(
        &self,
        span: &tracing::Span,
        parent: Option<TraceContext>,
    ) -> Option<TraceContext>;
}

static EXPORTER: OnceLock<Box<dyn SpanExporter>> = OnceLock::new();

/// Installs the process's span exporter; only the first one counts.
pub fn set_exporter(exporter: Box<dyn SpanExporter>) {
    if EXPORTER.set(exporter).is_err() {
        tracing::warn!("a span exporter was already installed");
    }
}

/// Places `span` in a trace: as the child of `parent` when the request or
/// event came with one, else at the root of a new trace. Records its
/// `trace_id`, `span_id` and `parent_id` fields (declare them `Empty`) and
/// returns its context, the one events published under it carry.
pub fn continue_trace(
    span: &tracing::Span,
    parent: Option<TraceContext>,
) -> TraceContext {
    let exported = EXPORTER.get().and_then(|e| e.adopt(span, parent));
    let context = exported.unwrap_or_else(|| {
        parent.map_or_else(TraceContext::new_root, |parent| parent.child())
    });
    span.record("trace_id", context.trace_id());
    span.record("span_id", context.span_id());
    if let Some(parent) = parent {
        span.record("parent_id", parent.span_id());
    }
    context
}

impl fmt::Display for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{:032x}-{:016x}-{:02x}",
            self.trace_id, self.span_id, self.flags
        )
    }
}

impl fmt::Debug for TraceContext {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TraceContext({self})")
    }
}

/// Parses exactly `digits` lower-case hex digits.
fn lower_hex<T: FromHex>(text: &str, digits: usize) -> Option<T> {
    let well_formed = text.len() == digits
        && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if well_formed { T::from_hex(text) } else { None }
}

trait FromHex: Sized {
    fn from_hex(text: &str) -> Option<Self>;
}

macro_rules! from_hex {
    ($($t:ty),*) => {$(
        impl FromHex for $t {
            fn from_hex(text: &str) -> Option<Self> {
                <$t>::from_str_radix(text, 16).ok()
            }
        }
    )*};
}
from_hex!(u8, u64, u128);

fn nonzero_u128() -> u128 {
    loop {
        let id = fastrand::u128(..);
        if id != 0 {
            return id;
        }
    }
}

fn nonzero_u64() -> u64 {
    fastrand::u64(1..)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str =
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_round_trips() {
        let context = TraceContext::parse(SAMPLE).unwrap();
        assert_eq!(context.to_string(), SAMPLE);
        assert_eq!(context.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn a_later_version_is_read_by_the_fields_it_shares_with_00() {
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x";
        let context = TraceContext::parse(later).unwrap();
        assert_eq!(context.to_string(), SAMPLE);
    }

    #[test]
    fn a_child_keeps_the_trace_and_changes_the_span() {
        let parent = TraceContext::parse(SAMPLE).unwrap();
        let child = parent.child();
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.to_string(), parent.to_string());
    }

    #[test]
    fn a_continued_trace_is_a_child_of_its_parent_or_a_new_root() {
        let parent = TraceContext::parse(SAMPLE).unwrap();
        let span = tracing::Span::none();
        let child = continue_trace(&span, Some(parent));
        assert_eq!(child.trace_id(), parent.trace_id());
        assert_ne!(child.span_id(), parent.span_id());

        let root = continue_trace(&span, None);
        assert_ne!(root.trace_id(), parent.trace_id());
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        for bad in [
            "",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x",
            "00-+bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
    }
}
