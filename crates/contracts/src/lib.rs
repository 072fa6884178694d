//! The events herald's services exchange.
//!
//! Each event is a type here, named on the bus by its versioned CloudEvents
//! `type`. Producers and consumers depend on this crate rather than on each
//! other. Rules for changing an event:
//!
//! - Adding an optional field is compatible: consumers ignore fields they
//!   do not know, and read a missing optional field as absent.
//! - Removing or retyping a field, or changing its meaning, is a new event
//!   version (`.v2`), published beside the old one until every consumer has
//!   moved.

use herald::Event;
use serde::{Deserialize, Serialize};

/// The language an email or a reply is written in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize,
)]
pub enum Locale {
    #[default]
    #[serde(rename = "en")]
    English,
    #[serde(rename = "zh-CN")]
    SimplifiedChinese,
}

impl Locale {
    /// The BCP 47 tag, as the API and events spell it.
    pub fn tag(self) -> &'static str {
        match self {
            Locale::English => "en",
            Locale::SimplifiedChinese => "zh-CN",
        }
    }
}

/// `user.registered.v1`: a user registered and can now be welcomed.
///
/// Published by the users service in the same transaction that stores the
/// user, so it exists exactly when the user does. Its subject (the ordering
/// key) is the user id. It carries the address to write to, but never the
/// password or its hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegistered {
    /// The id the user registered with, unique among users.
    pub user_id: String,
    /// The user's display name, trimmed, without control characters.
    pub user_name: String,
    /// Where the welcome email goes.
    pub email: String,
    /// The language to welcome the user in; English when absent.
    #[serde(default)]
    pub locale: Locale,
}

impl Event for UserRegistered {
    const TYPE: &'static str = "user.registered.v1";

    fn subject(&self) -> Option<String> {
        Some(self.user_id.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_registered_has_its_documented_wire_form() {
        let event = UserRegistered {
            user_id: "alice".into(),
            user_name: "Alice".into(),
            email: "alice@example.com".into(),
            locale: Locale::SimplifiedChinese,
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "user_id": "alice",
                "user_name": "Alice",
                "email": "alice@example.com",
                "locale": "zh-CN",
            })
        );
    }

    #[test]
    fn an_event_without_a_locale_reads_as_english() {
        let event: UserRegistered = serde_json::from_str(
            r#"{"user_id":"a","user_name":"A","email":"a@example.com"}"#,
        )
        .unwrap();
        assert_eq!(event.locale, Locale::English);
    }
}
