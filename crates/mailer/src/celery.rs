//! The welcome email as a Celery task, for Python producers that call
//! `send_welcome_email.delay(user_id, user_name, email=None, locale=None)`
//! as they did before the mailer moved to herald.
//!
//! The task sends the same email as a `user.registered.v1` event, once per
//! task id however often the task is delivered, with the same failure
//! handling: the address is `email`, else `user_id` when that is an
//! address; without one the task fails for good (`ValueError`), as it
//! does for a name the users service would refuse. A call that does not
//! fit the signature fails with `TypeError`, as in Python.

use std::sync::Arc;
use std::time::SystemTime;

use contracts::{Locale, UserRegistered};
use herald::broker::BoxFuture;
use herald::celery::{Call, Task, TaskError};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{Mailer, Sent};

/// The task's registered name, as the Python service named it.
pub const TASK: &str = "tasks.send_welcome_email";

/// Its parameters, in the Python signature's order.
const PARAMS: &[&str] = &["user_id", "user_name", "email", "locale"];

/// `send_welcome_email(user_id, user_name, email=None, locale=None)`.
#[derive(Debug, Deserialize)]
struct Arguments {
    user_id: Value,
    user_name: Value,
    #[serde(default)]
    email: Option<String>,
    #[serde(default)]
    locale: Option<String>,
}

/// Runs [`TASK`] with the mailer.
#[derive(Debug, Clone)]
pub struct WelcomeTask {
    mailer: Arc<Mailer>,
}

impl WelcomeTask {
    pub fn new(mailer: Arc<Mailer>) -> Self {
        WelcomeTask { mailer }
    }

    async fn welcome(&self, call: &Call) -> Result<Value, TaskError> {
        let arguments: Arguments = call.arguments(PARAMS)?;
        // Python callers pass numbers too, which Python would format.
        let user_id = text_of(&arguments.user_id);
        let user_name = checked_name(&text_of(&arguments.user_name))?;
        let address = arguments
            .email
            .clone()
            .filter(|email| !email.trim().is_empty())
            .or_else(|| user_id.contains('@').then(|| user_id.clone()))
            .ok_or_else(|| {
                TaskError::value_error(
                    "no email address: email was not given and user_id is \
                     not an address",
                )
            })?;
        let event = UserRegistered {
            user_id,
            user_name,
            email: address.clone(),
            locale: locale(arguments.locale.as_deref()),
        };
        let id = task_uuid(&call.message.id);
        let sent = self
            .mailer
            .send_welcome(id, SystemTime::now(), &event)
            .await?;
        // A task id is mailed once: say so when this call sent nothing.
        Ok(json!({
            "sent_to": address,
            "user_name": event.user_name,
            "already_sent": sent == Sent::Before,
        }))
    }
}

impl Task for WelcomeTask {
    fn name(&self) -> &'static str {
        TASK
    }

    fn run<'a>(
        &'a self,
        call: &'a Call,
    ) -> BoxFuture<'a, Result<Value, TaskError>> {
        Box::pin(self.welcome(call))
    }
}

/// A JSON value as Python's `str` would show it: text as it is.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// The longest name accepted, as by the users service.
const MAX_NAME_CHARS: usize = 100;

/// `name`, trimmed, when the users service would accept it: 1 to 100
/// characters, none of them control characters.
fn checked_name(name: &str) -> Result<String, TaskError> {
    let name = name.trim();
    let length = name.chars().count();
    if length == 0 || length > MAX_NAME_CHARS {
        return Err(TaskError::value_error(format!(
            "user_name must be 1 to {MAX_NAME_CHARS} characters, not {length}"
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(TaskError::value_error(
            "user_name must not contain control characters",
        ));
    }
    Ok(name.to_owned())
}

/// The email's locale: Simplified Chinese for any `zh` tag, else English.
fn locale(tag: Option<&str>) -> Locale {
    match tag {
        Some(tag) if tag.to_ascii_lowercase().starts_with("zh") => {
            Locale::SimplifiedChinese
        }
        _ => Locale::English,
    }
}

/// The id the mailer records the send under: the task id when it is a
/// UUID, as Celery's are, else a UUID derived from it, the same every
/// time.
fn task_uuid(task_id: &str) -> Uuid {
    Uuid::parse_str(task_id).unwrap_or_else(|_| {
        Uuid::new_v5(&Uuid::NAMESPACE_OID, task_id.as_bytes())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_id_that_is_no_uuid_still_names_one_send() {
        let id = "welcome-42";
        assert_eq!(task_uuid(id), task_uuid(id));
        assert_ne!(task_uuid(id), task_uuid("welcome-43"));
        let uuid = "6f1c8b52-3a0e-4c1e-9a51-6a1d0c2f7b10";
        assert_eq!(task_uuid(uuid).to_string(), uuid);
    }

    #[test]
    fn a_name_the_users_service_would_refuse_fails_the_task() {
        assert_eq!(checked_name("  李雷 ").unwrap(), "李雷");
        assert!(checked_name("").is_err());
        assert!(checked_name(&"n".repeat(101)).is_err());
        assert!(checked_name("a\r\nBcc: x").is_err());
        assert_eq!(text_of(&json!(42)), "42");
    }

    #[test]
    fn any_chinese_tag_asks_for_the_chinese_email() {
        assert_eq!(locale(Some("zh-CN")), Locale::SimplifiedChinese);
        assert_eq!(locale(Some("zh")), Locale::SimplifiedChinese);
        assert_eq!(locale(Some("en-GB")), Locale::English);
        assert_eq!(locale(None), Locale::English);
    }
}
