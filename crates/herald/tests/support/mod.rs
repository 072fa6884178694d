//! What the RabbitMQ tests share: the broker's URL, and names of their
//! own, so that tests can run side by side on one broker.

#![allow(dead_code)]

/// Why a RabbitMQ test is ignored unless asked for.
pub const NEEDS_RABBITMQ: &str = "needs RabbitMQ: set HERALD_TEST_AMQP_URL";

/// The broker the tests run against.
pub fn amqp_url() -> String {
    std::env::var("HERALD_TEST_AMQP_URL").expect(NEEDS_RABBITMQ)
}

/// A queue and an event type no other test uses.
pub struct Names {
    pub queue: String,
    pub event_type: &'static str,
    /// A second event type, for events the queue should not handle.
    pub stray_type: String,
}

pub fn unique_names() -> Names {
    let unique = uuid::Uuid::new_v4().simple().to_string();
    Names {
        queue: format!("herald-test-{unique}"),
        // Bindings and subscriptions take `&'static str` event types; a
        // test's few leaked bytes are the price of a type of its own.
        event_type: Box::leak(format!("test.pinged.{unique}").into_boxed_str()),
        stray_type: format!("test.stray.{unique}"),
    }
}
