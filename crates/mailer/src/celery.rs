//! The welcome email as a Celery task, for Python producers that call
//! `send_welcome_email.delay(user_id, user_name, email=None, locale=None)`
//! as they did before the mailer moved to herald.
//!
//! The task sends the same email as a `user.registered.v1` event, once per
//! task id however often the task is delivered, with the same failure
//! handling: the address is `email`, else `user_id` when that is an
//! address; without one the task fails for good.

use std::sync::Arc;
use std::time::SystemTime;

use contracts::{Locale, UserRegistered};
use herald::HandlerError;
use herald::broker::BoxFuture;
use herald::celery::{Call, Task};
use serde::Deserialize;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::Mailer;

/// The task's registered name, as the Python service named it.
pub const TASK: &str = "tasks.send_welcome_email";

/// Its parameters, in the Python signature's order.
const PARAMS: &[&str] = &["user_id", "user_name", "email", "locale"];

/// `send_welcome_email(user_id, user_name, email=None, locale=None)`.
#[derive(Debug, Deserialize)]
struct Arguments {
    user_id: Value,
    user_name: String,
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

    async fn welcome(&self, call: &Call) -> Result<Value, HandlerError> {
        let arguments: Arguments = call.arguments(PARAMS)?;
        // Python callers pass numeric user ids too.
        let user_id = match &arguments.user_id {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        let address = arguments
            .email
            .clone()
            .filter(|email| !email.trim().is_empty())
            .or_else(|| user_id.contains('@').then(|| user_id.clone()))
            .ok_or_else(|| {
                HandlerError::permanent(
                    "no email address: email was not given and user_id is \
                     not an address",
                )
            })?;
        let event = UserRegistered {
            user_id,
            user_name: arguments.user_name,
            email: address.clone(),
            locale: locale(arguments.locale.as_deref()),
        };
        let id = task_uuid(&call.message.id);
        self.mailer
            .send_welcome(id, SystemTime::now(), &event)
            .await?;
        Ok(json!({ "sent_to": address, "user_name": event.user_name }))
    }
}

impl Task for WelcomeTask {
    fn name(&self) -> &'static str {
        TASK
    }

    fn run<'a>(
        &'a self,
        call: &'a Call,
    ) -> BoxFuture<'a, Result<Value, HandlerError>> {
        Box::pin(self.welcome(call))
    }
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
    fn any_chinese_tag_asks_for_the_chinese_email() {
        assert_eq!(locale(Some("zh-CN")), Locale::SimplifiedChinese);
        assert_eq!(locale(Some("zh")), Locale::SimplifiedChinese);
        assert_eq!(locale(Some("en-GB")), Locale::English);
        assert_eq!(locale(None), Locale::English);
    }
}
