//! Task results as Celery's `rpc://` backend carries them: a message to
//! the caller's reply queue, through the default exchange, whose
//! correlation id is the task id and whose body is the result's meta.

use chrono::{SecondsFormat, Utc};
use lapin::BasicProperties;
use serde_json::{Value, json};

use super::message::{JSON, python_json};

/// The states a result reports, as Celery names them.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The task returned this value.
    Success(Value),
    /// The task failed for good: Python's `AsyncResult.get()` raises an
    /// exception of this type, from this module, with this message.
    Failure {
        module: String,
        kind: String,
        message: String,
    },
    /// The task was not run: it had expired.
    Revoked,
}

impl Outcome {
    /// A failure Python raises as a plain `Exception(message)`.
    pub fn failure(message: impl Into<String>) -> Self {
        Outcome::Failure {
            module: "builtins".to_owned(),
            kind: "Exception".to_owned(),
            message: message.into(),
        }
    }

    fn state(&self) -> &'static str {
        match self {
            Outcome::Success(_) => "SUCCESS",
            Outcome::Failure { .. } => "FAILURE",
            Outcome::Revoked => "REVOKED",
        }
    }

    /// The reply to publish for task `task_id`: its properties and body.
    pub fn reply(&self, task_id: &str) -> (BasicProperties, Vec<u8>) {
        let result = match self {
            Outcome::Success(value) => value.clone(),
            Outcome::Failure {
                module,
                kind,
                message,
            } => json!({
                "exc_type": kind,
                "exc_message": [message],
                "exc_module": module,
            }),
            Outcome::Revoked => json!({
                "exc_type": "TaskRevokedError",
                "exc_message": ["expired"],
                "exc_module": "celery.exceptions",
            }),
        };
        let meta = json!({
            "task_id": task_id,
            "status": self.state(),
            "result": result,
            "traceback": null,
            "children": [],
            "date_done": Utc::now()
                .to_rfc3339_opts(SecondsFormat::Micros, false),
        });
        let properties = BasicProperties::default()
            .with_content_type(JSON.into())
            .with_content_encoding("utf-8".into())
            .with_correlation_id(task_id.into())
            .with_delivery_mode(1)
            .with_priority(0)
            .with_headers(lapin::types::FieldTable::default());
        (properties, python_json(&meta).into_bytes())
    }

    /// Reads a reply's body; `None` for a state that is not final yet
    /// (`STARTED`, `RETRY`) or a body that is not a result.
    pub fn from_reply(body: &[u8]) -> Option<(String, Outcome)> {
        let meta: Value = serde_json::from_slice(body).ok()?;
        let task_id = meta["task_id"].as_str()?.to_owned();
        let outcome = match meta["status"].as_str()? {
            "SUCCESS" => Outcome::Success(meta["result"].clone()),
            "FAILURE" => {
                let error = &meta["result"];
                let message = match &error["exc_message"] {
                    Value::Array(parts) => parts
                        .iter()
                        .map(|p| {
                            p.as_str().map_or(p.to_string(), str::to_owned)
                        })
                        .collect::<Vec<_>>()
                        .join(", "),
                    Value::String(text) => text.clone(),
                    other => other.to_string(),
                };
                let text = |field: &str, default: &str| {
                    error[field].as_str().unwrap_or(default).to_owned()
                };
                Outcome::Failure {
                    module: text("exc_module", "builtins"),
                    kind: text("exc_type", "Exception"),
                    message,
                }
            }
            "REVOKED" => Outcome::Revoked,
            _ => return None,
        };
        Some((task_id, outcome))
    }
}
