//! Celery's task message, protocol version 2: reading what a Python
//! producer sent, and writing what a Python worker accepts.
//!
//! A task message is an AMQP message whose application headers name the
//! task (`task`, `id`, `retries`, `eta`, `timelimit`, ...) and whose body
//! is the JSON array `[args, kwargs, embed]`; `embed` holds the canvas
//! (`callbacks`, `errbacks`, `chain`, `chord`). What herald does not
//! decode (other serializers, protocol version 1, canvas) is refused with
//! a [`Refusal`] that says so, for the dead letters.

use std::fmt;

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldArray, FieldTable, ShortString};
use serde_json::{Map, Value, json};

use crate::trace::TraceContext;

/// The only serializer herald speaks: Celery's default.
pub const JSON: &str = "application/json";

/// One task to run, as a producer sent it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    /// The task id: a UUID in practice, but any string to Celery.
    pub id: String,
    /// The registered task name, e.g. `tasks.send_welcome_email`.
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    /// How many times it was retried before this attempt.
    pub retries: u32,
    /// Not to be run before this time.
    pub eta: Option<DateTime<Utc>>,
    /// Not to be run after this time.
    pub expires: Option<DateTime<Utc>>,
    /// Celery's `timelimit` header: the hard limit, then the soft one, in
    /// seconds.
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub group: Option<String>,
    /// Where the result goes (the `rpc://` backend's reply queue).
    pub reply_to: Option<String>,
    pub ignore_result: bool,
    pub traceparent: Option<TraceContext>,
}

/// Why a message is not a task herald can run. Each is dead-lettered
/// with its text as the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No `task` header, and the body is not a protocol 1 message either.
    NotATask,
    /// A protocol 1 message: the task name inside the body.
    ProtocolOne,
    /// A serializer other than JSON: pickle, YAML, msgpack, ...
    ContentType(String),
    /// Compressed, or in an encoding other than UTF-8.
    Encoding(String),
    /// The headers or the body are not what protocol 2 says.
    Malformed(String),
    /// The message asks for canvas work herald does not do.
    Canvas(&'static str),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::NotATask => {
                write!(f, "not a Celery task message: it has no task header")
            }
            Refusal::ProtocolOne => write!(
                f,
                "Celery protocol version 1 is not supported; send with \
                 protocol 2, the default since Celery 4"
            ),
            Refusal::ContentType(kind) => write!(
                f,
                "content type {kind:?} is not supported; herald decodes \
                 only {JSON} (task_serializer = \"json\")"
            ),
            Refusal::Encoding(what) => write!(f, "{what} is not supported"),
            Refusal::Malformed(what) => {
                write!(f, "malformed Celery task message: {what}")
            }
            Refusal::Canvas(field) => write!(
                f,
                "the task carries {field}, and herald does not run Celery \
                 canvas (callbacks, errbacks, chains, chords)"
            ),
        }
    }
}

impl Task {
    /// Reads a task from an AMQP message's properties and body.
    pub fn decode(
        properties: &BasicProperties,
        body: &[u8],
    ) -> Result<Task, Refusal> {
        let empty = FieldTable::default();
        let headers = properties.headers().as_ref().unwrap_or(&empty);
        let header = |name: &str| headers.inner().get(name);

        let Some(name) = header("task") else {
            let v1 = serde_json::from_slice::<Map<String, Value>>(body)
                .is_ok_and(|body| body.contains_key("task"));
            return Err(if v1 {
                Refusal::ProtocolOne
            } else {
                Refusal::NotATask
            });
        };
        let content_type = properties
            .content_type()
            .as_ref()
            .map_or(JSON, ShortString::as_str);
        if content_type != JSON {
            return Err(Refusal::ContentType(content_type.to_owned()));
        }
        if header("compression").is_some() {
            return Err(Refusal::Encoding("a compressed body".into()));
        }
        let encoding = properties
            .content_encoding()
            .as_ref()
            .map_or("utf-8", ShortString::as_str);
        if !encoding.eq_ignore_ascii_case("utf-8") {
            return Err(Refusal::Encoding(format!("encoding {encoding:?}")));
        }

        let malformed = |what: &str| Refusal::Malformed(what.to_owned());
        let name = text(name).ok_or_else(|| malformed("task is not text"))?;
        let id = header("id")
            .and_then(text)
            .ok_or_else(|| malformed("no id header"))?;
        let (args, kwargs) = body_of(body)?;
        let (time_limit, soft_time_limit) =
            header("timelimit").map_or(Ok((None, None)), time_limits)?;
        Ok(Task {
            id,
            name,
            args,
            kwargs,
            // A count that is negative or absurd is read as none.
            retries: header("retries")
                .and_then(number)
                .filter(|n| (0.0..=f64::from(u32::MAX)).contains(n))
                .map_or(0, |n| n as u32),
            eta: time_header(header("eta"), "eta")?,
            expires: time_header(header("expires"), "expires")?,
            time_limit,
            soft_time_limit,
            root_id: header("root_id").and_then(text),
            parent_id: header("parent_id").and_then(text),
            group: header("group").and_then(text),
            reply_to: properties
                .reply_to()
                .as_ref()
                .map(|r| r.as_str().to_owned())
                .filter(|r| !r.is_empty()),
            ignore_result: matches!(
                header("ignore_result"),
                Some(AMQPValue::Boolean(true))
            ),
            traceparent: header("traceparent")
                .and_then(text)
                .and_then(|t| TraceContext::parse(&t)),
        })
    }
}

/// Where the result of a message goes, read even from a message that is
/// not a task herald can run, so that its caller hears why: the task id
/// (its `id` header, else its correlation id) and the reply queue.
pub fn reply_address(properties: &BasicProperties) -> Option<(String, String)> {
    let id = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("id"))
        .and_then(text)
        .or_else(|| {
            properties.correlation_id().as_ref().map(|c| c.to_string())
        })?;
    let reply_to = properties.reply_to().as_ref()?.to_string();
    (!reply_to.is_empty()).then_some((id, reply_to))
}

impl Refusal {
    /// The Python exception a caller's `AsyncResult.get()` raises for
    /// this refusal: its module and type.
    pub fn python_exception(&self) -> (&'static str, &'static str) {
        match self {
            Refusal::ContentType(_) | Refusal::Encoding(_) => {
                ("kombu.exceptions", "ContentDisallowed")
            }
            _ => ("builtins", "ValueError"),
        }
    }
}

/// `[args, kwargs, embed]`, with no canvas in `embed`.
fn body_of(body: &[u8]) -> Result<(Vec<Value>, Map<String, Value>), Refusal> {
    let malformed = |what: String| Refusal::Malformed(what);
    let text = std::str::from_utf8(body)
        .map_err(|e| malformed(format!("the body is not UTF-8: {e}")))?;
    let parts: Vec<Value> = serde_json::from_str(text)
        .map_err(|e| malformed(format!("the body is not a JSON array: {e}")))?;
    let [args, kwargs, embed] =
        <[Value; 3]>::try_from(parts).map_err(|_| {
            malformed("the body is not [args, kwargs, embed]".into())
        })?;
    let Value::Array(args) = args else {
        return Err(malformed("args is not a list".into()));
    };
    let Value::Object(kwargs) = kwargs else {
        return Err(malformed("kwargs is not an object".into()));
    };
    match embed {
        Value::Null => {}
        Value::Object(embed) => {
            for field in ["callbacks", "errbacks", "chain", "chord"] {
                let used = match embed.get(field) {
                    None | Some(Value::Null) => false,
                    Some(Value::Array(items)) => !items.is_empty(),
                    Some(_) => true,
                };
                if used {
                    return Err(Refusal::Canvas(field));
                }
            }
        }
        _ => return Err(malformed("embed is not an object".into())),
    }
    Ok((args, kwargs))
}

/// `timelimit`: `[hard, soft]`, each seconds or void.
fn time_limits(
    value: &AMQPValue,
) -> Result<(Option<f64>, Option<f64>), Refusal> {
    let AMQPValue::FieldArray(items) = value else {
        return Err(Refusal::Malformed("timelimit is not a list".into()));
    };
    let items = items.as_slice();
    let limit = |i: usize| {
        items
            .get(i)
            .and_then(number)
            .filter(|s| *s > 0.0 && s.is_finite())
    };
    Ok((limit(0), limit(1)))
}

/// An `eta` or `expires` header: ISO 8601, a naive time being UTC.
fn time_header(
    value: Option<&AMQPValue>,
    name: &str,
) -> Result<Option<DateTime<Utc>>, Refusal> {
    let Some(text) = value.and_then(text) else {
        return Ok(None);
    };
    let parsed = DateTime::parse_from_rfc3339(&text)
        .map(|t| t.to_utc())
        .or_else(|_| {
            NaiveDateTime::parse_from_str(&text, "%Y-%m-%dT%H:%M:%S%.f")
                .map(|t| t.and_utc())
        })
        .map_err(|_| {
            Refusal::Malformed(format!("{name} is not an ISO 8601 time"))
        })?;
    Ok(Some(parsed))
}

fn text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => {
            Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
        }
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn number(value: &AMQPValue) -> Option<f64> {
    Some(match value {
        AMQPValue::ShortShortInt(n) => f64::from(*n),
        AMQPValue::ShortShortUInt(n) => f64::from(*n),
        AMQPValue::ShortInt(n) => f64::from(*n),
        AMQPValue::ShortUInt(n) => f64::from(*n),
        AMQPValue::LongInt(n) => f64::from(*n),
        AMQPValue::LongUInt(n) => f64::from(*n),
        AMQPValue::LongLongInt(n) => *n as f64,
        AMQPValue::Float(n) => f64::from(*n),
        AMQPValue::Double(n) => *n,
        _ => return None,
    })
}

/// A task to send, and how: the equivalent of Python's `apply_async`.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub id: String,
    pub name: String,
    pub args: Vec<Value>,
    pub kwargs: Map<String, Value>,
    pub retries: u32,
    pub eta: Option<DateTime<Utc>>,
    pub expires: Option<DateTime<Utc>>,
    pub time_limit: Option<f64>,
    pub soft_time_limit: Option<f64>,
    pub root_id: Option<String>,
    pub parent_id: Option<String>,
    pub reply_to: Option<String>,
    /// Whether the worker should keep the result to itself (a caller that
    /// will not wait for it).
    pub ignore_result: bool,
    pub traceparent: Option<TraceContext>,
}

impl Outgoing {
    /// The AMQP properties and body Python's Celery 5 would publish for
    /// this task: the same headers, of the same AMQP types, and the body
    /// `[args, kwargs, embed]` with every canvas field null.
    pub fn encode(&self) -> (BasicProperties, Vec<u8>) {
        let mut headers = FieldTable::default();
        let mut set = |name: &str, value: AMQPValue| {
            headers.insert(name.into(), value);
        };
        let string = |s: &str| AMQPValue::LongString(s.into());
        let optional =
            |value: Option<&str>| value.map_or(AMQPValue::Void, string);
        let time = |t: Option<DateTime<Utc>>| {
            t.map_or(AMQPValue::Void, |t| {
                string(&t.to_rfc3339_opts(SecondsFormat::Micros, false))
            })
        };
        let seconds =
            |s: Option<f64>| s.map_or(AMQPValue::Void, AMQPValue::Double);

        // Python workers dispatch on `task` and read the rest by name;
        // `lang` says who sent it.
        set("lang", string("py"));
        set("task", string(&self.name));
        set("id", string(&self.id));
        set("shadow", AMQPValue::Void);
        set("eta", time(self.eta));
        set("expires", time(self.expires));
        set("group", AMQPValue::Void);
        set("group_index", AMQPValue::Void);
        set(
            "retries",
            AMQPValue::LongInt(self.retries.min(i32::MAX as u32) as i32),
        );
        let limits = FieldArray::from(vec![
            seconds(self.time_limit),
            seconds(self.soft_time_limit),
        ]);
        set("timelimit", AMQPValue::FieldArray(limits));
        set(
            "root_id",
            string(self.root_id.as_deref().unwrap_or(&self.id)),
        );
        set("parent_id", optional(self.parent_id.as_deref()));
        set("argsrepr", string(&python_repr_args(&self.args)));
        set(
            "kwargsrepr",
            string(&python_repr(&Value::Object(self.kwargs.clone()))),
        );
        set("origin", string(&origin()));
        set("ignore_result", AMQPValue::Boolean(self.ignore_result));
        set("replaced_task_nesting", AMQPValue::LongInt(0));
        set("stamped_headers", AMQPValue::Void);
        set("stamps", AMQPValue::FieldTable(FieldTable::default()));
        if let Some(trace) = self.traceparent {
            set("traceparent", string(&trace.to_string()));
        }

        let mut properties = BasicProperties::default()
            .with_content_type(JSON.into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(self.id.as_str().into())
            .with_delivery_mode(2)
            .with_priority(0)
            .with_headers(headers);
        if let Some(reply_to) = &self.reply_to {
            properties = properties.with_reply_to(reply_to.as_str().into());
        }
        if let Some(expires) = self.expires {
            let left = (expires - Utc::now()).num_milliseconds().max(0);
            properties = properties.with_expiration(left.to_string().into());
        }
        let body = format!(
            "[{}, {}, {NO_CANVAS}]",
            python_json(&Value::Array(self.args.clone())),
            python_json(&Value::Object(self.kwargs.clone())),
        );
        (properties, body.into_bytes())
    }
}

/// The body's `embed` when there is no canvas, its fields in Celery's
/// order.
const NO_CANVAS: &str =
    r#"{"callbacks": null, "errbacks": null, "chain": null, "chord": null}"#;

/// `gen<pid>@<host>`, as Celery names a producer.
fn origin() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("gen{}@{host}", std::process::id())
}

/// JSON as Python's `json.dumps` writes it by default: `", "` between
/// items, `": "` after keys, non-ASCII escaped as `\u` and four hex
/// digits.
pub fn python_json(value: &Value) -> String {
    let mut out = String::new();
    write_python_json(value, &mut out);
    out
}

fn write_python_json(value: &Value, out: &mut String) {
    match value {
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_python_json(item, out);
            }
            out.push(']');
        }
        Value::Object(fields) => {
            out.push('{');
            for (i, (key, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_ascii_string(key, out);
                out.push_str(": ");
                write_python_json(item, out);
            }
            out.push('}');
        }
        Value::String(text) => write_ascii_string(text, out),
        other => out.push_str(&other.to_string()),
    }
}

/// A JSON string with every non-ASCII character escaped, as Python's
/// `ensure_ascii` does (characters beyond the BMP as surrogate pairs).
fn write_ascii_string(text: &str, out: &mut String) {
    use std::fmt::Write;
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if c.is_ascii() && !c.is_ascii_control() => out.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
        }
    }
    out.push('"');
}

/// How Python's `repr` shows the tuple of `args`, for the `argsrepr`
/// header that monitors display, cut at 1024 characters as Celery's
/// `saferepr` does.
fn python_repr_args(args: &[Value]) -> String {
    let items: Vec<String> = args.iter().map(python_repr).collect();
    let text = match items.len() {
        1 => format!("({},)", items[0]),
        _ => format!("({})", items.join(", ")),
    };
    shorten(text)
}

/// How Python's `repr` shows a JSON value.
fn python_repr(value: &Value) -> String {
    let text = match value {
        Value::Null => "None".to_owned(),
        Value::Bool(true) => "True".to_owned(),
        Value::Bool(false) => "False".to_owned(),
        Value::Number(n) => n.to_string(),
        Value::String(s) => {
            let escaped = s.replace('\\', "\\\\").replace('\'', "\\'");
            format!("'{escaped}'")
        }
        Value::Array(items) => {
            let items: Vec<String> = items.iter().map(python_repr).collect();
            format!("[{}]", items.join(", "))
        }
        Value::Object(fields) => {
            let fields: Vec<String> = fields
                .iter()
                .map(|(k, v)| {
                    format!("{}: {}", python_repr(&json!(k)), python_repr(v))
                })
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
    };
    shorten(text)
}

fn shorten(text: String) -> String {
    const MAX: usize = 1024;
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}...", &text[..end]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn welcome() -> Outgoing {
        Outgoing {
            id: "6f1c8b52-3a0e-4c1e-9a51-6a1d0c2f7b10".into(),
            name: "tasks.send_welcome_email".into(),
            args: vec![json!("lilei@example.com"), json!("李雷")],
            kwargs: Map::new(),
            retries: 0,
            eta: None,
            expires: None,
            time_limit: None,
            soft_time_limit: None,
            root_id: None,
            parent_id: None,
            reply_to: Some("71fdfa19-5f63-340c-801c-41c7e65a01c2".into()),
            ignore_result: false,
            traceparent: None,
        }
    }

    #[test]
    fn the_body_is_byte_for_byte_what_python_celery_publishes() {
        let (_, body) = welcome().encode();
        // Captured from Python's Celery 5.7.0 for
        // send_welcome_email.delay("lilei@example.com", "李雷").
        let python = r#"[["lilei@example.com", "\u674e\u96f7"], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]"#;
        assert_eq!(String::from_utf8(body).unwrap(), python);
    }

    #[test]
    fn the_headers_have_the_names_and_types_python_celery_sends() {
        let (properties, _) = welcome().encode();
        let headers = properties.headers().clone().unwrap();
        let header = |name: &str| headers.inner().get(name).cloned();
        assert_eq!(header("lang"), Some(AMQPValue::LongString("py".into())));
        assert_eq!(header("retries"), Some(AMQPValue::LongInt(0)));
        assert_eq!(header("shadow"), Some(AMQPValue::Void));
        assert_eq!(header("ignore_result"), Some(AMQPValue::Boolean(false)));
        assert_eq!(
            header("argsrepr"),
            Some(AMQPValue::LongString(
                "('lilei@example.com', '李雷')".into()
            ))
        );
        assert_eq!(
            header("root_id"),
            Some(AMQPValue::LongString(welcome().id.as_str().into()))
        );
        assert_eq!(properties.delivery_mode(), &Some(2));
        assert_eq!(
            properties.correlation_id().as_ref().map(|c| c.as_str()),
            Some(welcome().id.as_str())
        );
    }

    #[test]
    fn what_herald_sends_it_reads_back() {
        let mut sent = welcome();
        sent.eta = Some(Utc::now());
        sent.time_limit = Some(30.0);
        let (properties, body) = sent.encode();
        let task = Task::decode(&properties, &body).unwrap();
        assert_eq!(task.id, sent.id);
        assert_eq!(task.name, sent.name);
        assert_eq!(task.args, sent.args);
        assert_eq!(task.time_limit, Some(30.0));
        assert_eq!(task.soft_time_limit, None);
        assert_eq!(task.reply_to, sent.reply_to);
        let eta = task.eta.unwrap();
        assert!(
            (eta - sent.eta.unwrap()).num_microseconds().unwrap().abs() < 2
        );
    }

    fn refusal(properties: BasicProperties, body: &str) -> Refusal {
        Task::decode(&properties, body.as_bytes()).unwrap_err()
    }

    fn task_headers() -> FieldTable {
        let mut headers = FieldTable::default();
        headers.insert("task".into(), AMQPValue::LongString("t".into()));
        headers.insert("id".into(), AMQPValue::LongString("1".into()));
        headers
    }

    #[test]
    fn what_herald_cannot_run_is_refused_with_a_reason() {
        let json = || {
            BasicProperties::default()
                .with_content_type(JSON.into())
                .with_headers(task_headers())
        };
        let v1 = r#"{"task": "t", "id": "1", "args": [], "kwargs": {}}"#;
        assert_eq!(
            refusal(BasicProperties::default(), v1),
            Refusal::ProtocolOne
        );
        assert_eq!(
            refusal(BasicProperties::default(), "[]"),
            Refusal::NotATask
        );
        let pickle =
            json().with_content_type("application/x-python-serialize".into());
        assert!(matches!(refusal(pickle, "x"), Refusal::ContentType(_)));
        let canvas = r#"[[], {}, {"callbacks": [{"task": "next"}]}]"#;
        assert_eq!(refusal(json(), canvas), Refusal::Canvas("callbacks"));
        let chain = r#"[[], {}, {"chain": [{"task": "next"}]}]"#;
        assert_eq!(refusal(json(), chain), Refusal::Canvas("chain"));
        for malformed in
            ["", "{}", "[[], {}]", "[{}, {}, null]", "[[], [], null]"]
        {
            assert!(
                matches!(refusal(json(), malformed), Refusal::Malformed(_)),
                "{malformed:?}"
            );
        }
    }

    #[test]
    fn absurd_retries_and_time_limits_are_read_as_none() {
        let mut headers = task_headers();
        headers.insert("retries".into(), AMQPValue::LongInt(-1));
        let limits = FieldArray::from(vec![
            AMQPValue::Double(f64::INFINITY),
            AMQPValue::Double(-3.0),
        ]);
        headers.insert("timelimit".into(), AMQPValue::FieldArray(limits));
        let properties = BasicProperties::default().with_headers(headers);
        let task = Task::decode(&properties, b"[[], {}, null]").unwrap();
        assert_eq!(task.retries, 0);
        assert_eq!((task.time_limit, task.soft_time_limit), (None, None));
    }

    #[test]
    fn a_refused_message_still_says_where_its_result_goes() {
        let properties = BasicProperties::default()
            .with_correlation_id("abc".into())
            .with_reply_to("reply-queue".into());
        assert_eq!(
            reply_address(&properties),
            Some(("abc".to_owned(), "reply-queue".to_owned()))
        );
        let no_reply =
            BasicProperties::default().with_correlation_id("abc".into());
        assert_eq!(reply_address(&no_reply), None);
    }

    #[test]
    fn a_naive_eta_is_utc() {
        let mut headers = task_headers();
        headers.insert(
            "eta".into(),
            AMQPValue::LongString("2026-08-21T10:00:00.123456".into()),
        );
        let properties = BasicProperties::default().with_headers(headers);
        let task = Task::decode(&properties, b"[[], {}, null]").unwrap();
        assert_eq!(
            task.eta.unwrap().to_rfc3339(),
            "2026-08-21T10:00:00.123456+00:00"
        );
    }
}
