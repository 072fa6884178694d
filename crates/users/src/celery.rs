//! The welcome email asked for the Python way: a `tasks.send_welcome_email`
//! Celery task, sent through the outbox, so that the Python service's
//! unchanged Celery worker sends it.
//!
//! [`CeleryRelay`] stands where the relay's broker stands. For each
//! `user.registered.v1` it sends the task `send_welcome_email(user_id,
//! user_name, email=..., locale=...)`, whose task id is the event's id,
//! and, when asked, publishes the event too. Like any relay publish, the
//! outbox entry goes only after RabbitMQ confirmed; a relay retried after
//! a failure may send the task again, with the same task id.

use std::sync::Arc;
use std::time::Duration;

use contracts::UserRegistered;
use herald::broker::BoxFuture;
use herald::celery::{CeleryClient, Send};
use herald::{Broker, BusError, Delivery, Envelope, Event};
use serde_json::{Map, json};

/// The task's registered name in the Python service.
pub const WELCOME_TASK: &str = "tasks.send_welcome_email";

/// How a registration asks for its welcome email, and where a Celery task
/// for it goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WelcomeRoute {
    pub welcome: Welcome,
    /// The Celery queue of the task (Celery's default is `celery`).
    pub queue: String,
}

/// How a registration asks for its welcome email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Welcome {
    /// A `user.registered.v1` event, for herald's mailer.
    Event,
    /// A Celery task, for the Python service's worker.
    Celery,
    /// Both, while the two run side by side.
    Both,
}

/// The relay's broker, sending Celery tasks for registrations.
pub struct CeleryRelay {
    events: Arc<dyn Broker>,
    url: String,
    route: WelcomeRoute,
    /// The connection tasks are sent on, made on first use and again
    /// after a failure.
    client: tokio::sync::Mutex<Option<CeleryClient>>,
}

impl std::fmt::Debug for CeleryRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CeleryRelay")
            .field("route", &self.route)
            .finish()
    }
}

impl CeleryRelay {
    /// Sends welcome tasks to the RabbitMQ at `url`, and events to
    /// `events` when `route` asks for them.
    pub fn new(
        events: Arc<dyn Broker>,
        url: &str,
        route: WelcomeRoute,
    ) -> Self {
        CeleryRelay {
            events,
            url: url.to_owned(),
            route,
            client: tokio::sync::Mutex::new(None),
        }
    }

    async fn publish_welcome(
        &self,
        envelope: &Envelope,
    ) -> Result<(), BusError> {
        let is_registration = envelope.event_type == UserRegistered::TYPE;
        let welcome = self.route.welcome;
        if is_registration && welcome != Welcome::Event {
            self.send_task(envelope).await?;
        }
        if !is_registration || welcome != Welcome::Celery {
            self.events.publish(envelope).await?;
        }
        Ok(())
    }

    /// Sends the welcome task for the registration `envelope` announces.
    async fn send_task(&self, envelope: &Envelope) -> Result<(), BusError> {
        let event: UserRegistered = envelope
            .decode()
            .map_err(|e| BusError::Corrupt(e.to_string()))?;
        let mut kwargs = Map::new();
        kwargs.insert("email".into(), json!(event.email));
        kwargs.insert("locale".into(), json!(event.locale.tag()));
        let args = vec![json!(event.user_id), json!(event.user_name)];
        let mut task =
            Send::task(WELCOME_TASK, args, kwargs).id(envelope.id.to_string());
        task = task.queue(self.route.queue.as_str());
        if let Some(trace) = envelope.traceparent {
            task = task.traceparent(trace);
        }

        let mut client = self.client.lock().await;
        if client.is_none() {
            *client = Some(CeleryClient::sender(&self.url).await?);
        }
        let sent = client.as_ref().expect("connected above").send(task).await;
        if sent.is_err() {
            // Connect afresh next time: the connection may be gone.
            if let Some(lost) = client.take() {
                tokio::spawn(async move { lost.close().await });
            }
        }
        sent.map(drop)
    }
}

impl Broker for CeleryRelay {
    fn bind<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        self.events.bind(queue, event_types)
    }

    fn bind_ordered<'a>(
        &'a self,
        queue: &'a str,
        event_types: &'a [&'a str],
    ) -> BoxFuture<'a, Result<(), BusError>> {
        self.events.bind_ordered(queue, event_types)
    }

    fn publish<'a>(
        &'a self,
        envelope: &'a Envelope,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        Box::pin(self.publish_welcome(envelope))
    }

    fn receive<'a>(
        &'a self,
        queue: &'a str,
        max: usize,
    ) -> BoxFuture<'a, Result<Vec<Delivery>, BusError>> {
        self.events.receive(queue, max)
    }

    fn ack<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        self.events.ack(delivery)
    }

    fn retry<'a>(
        &'a self,
        delivery: &'a Delivery,
        delay: Duration,
        error: &'a str,
    ) -> BoxFuture<'a, Result<Duration, BusError>> {
        self.events.retry(delivery, delay, error)
    }

    fn release<'a>(
        &'a self,
        delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        self.events.release(delivery)
    }

    fn dead_letter<'a>(
        &'a self,
        delivery: &'a Delivery,
        reason: &'a str,
    ) -> BoxFuture<'a, Result<(), BusError>> {
        self.events.dead_letter(delivery, reason)
    }

    fn is_ready(&self) -> BoxFuture<'_, bool> {
        self.events.is_ready()
    }

    fn queue_depth<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<herald::QueueDepth, BusError>> {
        self.events.queue_depth(queue)
    }
}
