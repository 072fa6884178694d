//! The envelope: what the bus carries for every event.
//!
//! Its attributes are those of CloudEvents 1.0 — `id`, `source`, `type`,
//! `time`, `subject`, `datacontenttype` — plus the W3C `traceparent`. The
//! payload is JSON. The `subject` is the ordering key: the thing the event
//! is about, such as a user id.

use chrono::{DateTime, Utc};
use serde::{Serialize, de::DeserializeOwned};
use uuid::Uuid;

use crate::trace::TraceContext;

/// The content type of every payload herald produces.
pub const JSON: &str = "application/json";

/// A typed event. Its `TYPE` names it on the bus and carries its version
/// (`user.registered.v1`): a change that old consumers cannot read is a new
/// type, not a new shape of the old one.
pub trait Event: Serialize + DeserializeOwned {
    /// The CloudEvents `type`.
    const TYPE: &'static str;

    /// The CloudEvents `subject`: the key events are ordered by.
    fn subject(&self) -> Option<String> {
        None
    }
}

/// One event on the bus, with its attributes and its encoded payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Unique per event; consumers use it to handle an event once even
    /// when the bus delivers it twice.
    pub id: Uuid,
    /// The producing service, e.g. `/herald/users`.
    pub source: String,
    pub event_type: String,
    pub subject: Option<String>,
    pub time: DateTime<Utc>,
    pub content_type: String,
    pub traceparent: Option<TraceContext>,
    pub data: Vec<u8>,
}

impl Envelope {
    /// Wraps `event` in a new envelope with a fresh, time-ordered id.
    pub fn new<E: Event>(
        source: &str,
        event: &E,
        traceparent: Option<TraceContext>,
    ) -> Result<Self, serde_json::Error> {
        Ok(Envelope {
            id: Uuid::now_v7(),
            source: source.to_owned(),
            event_type: E::TYPE.to_owned(),
            subject: event.subject(),
            time: Utc::now(),
            content_type: JSON.to_owned(),
            traceparent,
            data: serde_json::to_vec(event)?,
        })
    }

    /// Reads the payload as `E`, after checking that this envelope really
    /// carries an `E`. Unknown payload fields are ignored, so a producer can
    /// add fields without breaking its consumers.
    pub fn decode<E: Event>(&self) -> Result<E, DecodeError> {
        if self.event_type != E::TYPE {
            return Err(DecodeError::WrongType {
                expected: E::TYPE,
                found: self.event_type.clone(),
            });
        }
        if !self.content_type.starts_with(JSON) {
            return Err(DecodeError::ContentType(self.content_type.clone()));
        }
        serde_json::from_slice(&self.data).map_err(DecodeError::Payload)
    }
}

/// Why an envelope's payload could not be read as the expected event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("expected an event of type {expected}, found {found}")]
    WrongType {
        expected: &'static str,
        found: String,
    },
    #[error("unsupported content type {0:?}; herald reads application/json")]
    ContentType(String),
    /// Said without the serde message, which quotes the offending value
    /// (an address, say) word for word: only where it is and what kind of
    /// mistake it is.
    #[error(
        "payload does not match the event's contract ({kind} at line {line} \
         column {column})",
        kind = contract_error_kind(.0),
        line = .0.line(),
        column = .0.column()
    )]
    Payload(serde_json::Error),
}

fn contract_error_kind(error: &serde_json::Error) -> &'static str {
    match error.classify() {
        serde_json::error::Category::Data => {
            "a field is missing or of the wrong type or value"
        }
        serde_json::error::Category::Syntax => "not valid JSON",
        serde_json::error::Category::Eof => "the JSON ends early",
        serde_json::error::Category::Io => "it could not be read",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Pinged {
        target: String,
    }

    impl Event for Pinged {
        const TYPE: &'static str = "test.pinged.v1";
        fn subject(&self) -> Option<String> {
            Some(self.target.clone())
        }
    }

    #[derive(Serialize, Deserialize)]
    struct Ponged {}

    impl Event for Ponged {
        const TYPE: &'static str = "test.ponged.v1";
    }

    #[test]
    fn an_event_round_trips_through_its_envelope() {
        let event = Pinged { target: "a".into() };
        let envelope = Envelope::new("/test", &event, None).unwrap();
        assert_eq!(envelope.event_type, "test.pinged.v1");
        assert_eq!(envelope.subject.as_deref(), Some("a"));
        assert_eq!(envelope.decode::<Pinged>().unwrap(), event);
    }

    #[test]
    fn unknown_payload_fields_are_ignored() {
        let mut envelope =
            Envelope::new("/test", &Pinged { target: "a".into() }, None)
                .unwrap();
        envelope.data = br#"{"target":"b","added_later":1}"#.to_vec();
        assert_eq!(envelope.decode::<Pinged>().unwrap().target, "b");
    }

    #[test]
    fn decoding_as_another_type_is_refused() {
        let envelope =
            Envelope::new("/test", &Pinged { target: "a".into() }, None)
                .unwrap();
        let error = envelope.decode::<Ponged>().err().unwrap();
        assert!(matches!(error, DecodeError::WrongType { .. }), "{error}");
    }

    #[test]
    fn a_payload_that_breaks_the_contract_is_refused() {
        let mut envelope =
            Envelope::new("/test", &Pinged { target: "a".into() }, None)
                .unwrap();
        envelope.data = br#"{"target":5}"#.to_vec();
        let error = envelope.decode::<Pinged>().err().unwrap();
        assert!(matches!(error, DecodeError::Payload(_)), "{error}");
    }

    #[test]
    fn a_contract_error_never_quotes_the_payload() {
        #[derive(Debug, Serialize, serde::Deserialize)]
        enum Kind {
            Plain,
        }
        #[derive(Debug, Serialize, serde::Deserialize)]
        struct Typed {
            kind: Kind,
        }
        impl Event for Typed {
            const TYPE: &'static str = "test.typed.v1";
        }
        let mut envelope =
            Envelope::new("/test", &Typed { kind: Kind::Plain }, None).unwrap();
        envelope.data = br#"{"kind":"leak@example.com"}"#.to_vec();
        let said = envelope.decode::<Typed>().err().unwrap().to_string();
        assert!(!said.contains("leak"), "{said}");
        assert!(said.contains("line 1"), "{said}");
    }
}
