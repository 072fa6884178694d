//! herald: event-driven services over a durable bus.
//!
//! A service publishes [`Envelope`]s, each carrying one typed [`Event`]; a
//! [`Broker`] keeps them durably and hands them to the queues bound to
//! their type; a [`worker`] runs a [`Handler`] over a queue and settles
//! every delivery: acknowledged after success, retried with backoff after a
//! transient failure, dead-lettered after a permanent one.
//!
//! The default backend is [`EmbeddedBroker`]: the bus lives in the same
//! SQLite file as the service's own data, so a service can commit a change
//! and the event announcing it in one transaction.

pub mod broker;
pub mod celery;
pub mod db;
pub mod envelope;
pub mod metrics;
pub mod outbox;
pub mod postgres;
pub mod sqlite;
pub mod trace;
pub mod worker;

pub use broker::amqp::{AmqpBroker, ReconnectingAmqp};
pub use broker::embedded::EmbeddedBroker;
pub use broker::{
    Broker, BusError, DeadLetter, DeadLetters, Delivery, QueueDepth, Which,
};
pub use envelope::{DecodeError, Envelope, Event};
pub use trace::TraceContext;
pub use worker::{
    Handler, HandlerError, RetryPolicy, Subscription, WorkerOptions,
};

/// An error and all its causes, as one line: `outer: cause: root cause`.
/// A cause whose text the line already holds (some errors repeat their
/// source in their own message) is not said twice.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

/// A URL fit for logs: `scheme://user:secret@host` becomes
/// `scheme://user:***@host`, and the values of query parameters that carry
/// secrets (`password`, `token`, ...) become `***`. It errs on the side of
/// hiding: a URL that is not well formed (a `/` or `?` in the password)
/// loses everything up to its last `@`, whatever that was.
pub fn redact_credentials(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let rest = match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user =
                userinfo.split([':', '/', '?', '#']).next().unwrap_or("");
            let hidden = if userinfo.len() > user.len() {
                ":***"
            } else {
                ""
            };
            format!("{user}{hidden}@{host}")
        }
        None => rest.to_owned(),
    };
    let Some((path, query)) = rest.split_once('?') else {
        return format!("{scheme}://{rest}");
    };
    const SECRET: [&str; 6] =
        ["password", "pass", "pwd", "secret", "token", "sslpassword"];
    let query: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _))
                if SECRET.contains(&name.to_ascii_lowercase().as_str()) =>
            {
                format!("{name}=***")
            }
            _ => pair.to_owned(),
        })
        .collect();
    format!("{scheme}://{path}?{}", query.join("&"))
}

#[cfg(test)]
mod tests {
    use super::redact_credentials as redact;

    #[test]
    fn a_password_in_the_userinfo_is_hidden() {
        assert_eq!(
            redact("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(redact("postgres://me@host/db"), "postgres://me@host/db");
        assert_eq!(redact("smtp://host:25"), "smtp://host:25");
    }

    #[test]
    fn a_password_with_a_slash_or_a_question_mark_is_hidden_whole() {
        let shown = redact("postgres://me:pa/ss?wo#rd@host:5432/db");
        assert_eq!(shown, "postgres://me:***@host:5432/db");
    }

    #[test]
    fn secrets_in_the_query_are_hidden() {
        let shown =
            redact("postgres://me@host/db?password=LEAK&sslmode=disable");
        assert_eq!(shown, "postgres://me@host/db?password=***&sslmode=disable");
        assert!(!redact("amqp://h/v?Token=LEAK").contains("LEAK"));
    }
}
