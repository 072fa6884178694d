//! `herald dlq`: the dead letters of the system's queues, to look at, to
//! send back to their queue, or to throw away.
//!
//! It finds them where the services' flags say the bus is: in the SQLite
//! database of the data directory for the embedded bus (a file it will not
//! create), in `<queue>.dead` on RabbitMQ. Workers running in any process
//! pick a replayed message up at once on RabbitMQ, and within their poll
//! interval (half a second) on the embedded bus.

use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use herald::broker::amqp::AmqpOptions;
use herald::broker::embedded::EmbeddedOptions;
use herald::{AmqpBroker, DeadLetter, DeadLetters, EmbeddedBroker, Which};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::system::{BusChoice, DataArgs, DatabaseChoice, say};

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List the dead letters: id, event type, queue, attempts, when they
    /// first and last failed, and why.
    List(Target),
    /// Show one dead letter whole: its attributes and its payload.
    Show {
        /// The event id, as `list` shows it.
        id: Uuid,
        #[command(flatten)]
        target: Target,
    },
    /// Send dead letters back to their queue with a fresh attempt count.
    Replay(Selection),
    /// Delete dead letters for good.
    Purge(Selection),
}

/// Where the dead letters are.
#[derive(Debug, Args)]
pub struct Target {
    #[command(flatten)]
    data: DataArgs,

    /// The queue whose dead letters to work on; repeat for several
    /// [default: mailer].
    #[arg(long)]
    queue: Vec<String>,

    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

/// One dead letter by its id, or all of them.
#[derive(Debug, Args)]
pub struct Selection {
    /// The event id, as `list` shows it.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    id: Option<Uuid>,

    /// Every dead letter of the queues.
    #[arg(long)]
    all: bool,

    #[command(flatten)]
    target: Target,
}

impl Selection {
    fn which(&self) -> Which {
        match self.id {
            Some(id) => Which::One(id),
            None => Which::All,
        }
    }
}

pub async fn run(command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List(target) => list(&target).await,
        DlqCommand::Show { id, target } => show(id, &target).await,
        DlqCommand::Replay(selection) => replay(&selection).await,
        DlqCommand::Purge(selection) => purge(&selection).await,
    }
}

async fn list(target: &Target) -> anyhow::Result<()> {
    let store = open(target).await?;
    let mut letters = Vec::new();
    for queue in target.queues() {
        let listed = store.list(&queue).await;
        letters.extend(listed.map_err(|e| missing(e, &queue))?);
    }
    if target.json {
        let listed: Vec<Value> = letters.iter().map(summary).collect();
        say(&serde_json::to_string_pretty(&listed)?);
        return Ok(());
    }
    if letters.is_empty() {
        say(&format!(
            "no dead letters in {}",
            target.queues().join(", ")
        ));
        return Ok(());
    }
    say(&format!(
        "{:<36}  {:<22}  {:<10}  {:>8}  {:<20}  {:<20}  reason",
        "id", "event type", "queue", "attempts", "first failed", "last failed"
    ));
    for letter in &letters {
        say(&format!(
            "{:<36}  {:<22}  {:<10}  {:>8}  {:<20}  {:<20}  {}",
            letter.envelope.id,
            letter.envelope.event_type,
            letter.queue,
            letter.attempts,
            letter.first_failed_at.format("%Y-%m-%d %H:%M:%S"),
            letter.dead_at.format("%Y-%m-%d %H:%M:%S"),
            one_line(&letter.reason, 80),
        ));
    }
    Ok(())
}

async fn show(id: Uuid, target: &Target) -> anyhow::Result<()> {
    let store = open(target).await?;
    let mut found = None;
    for queue in target.queues() {
        let letters =
            store.list(&queue).await.map_err(|e| missing(e, &queue))?;
        if let Some(letter) = letters.into_iter().find(|l| l.envelope.id == id)
        {
            found = Some(letter);
            break;
        }
    }
    let Some(letter) = found else {
        bail!("no dead letter {id} in {}", target.queues().join(", "));
    };
    let whole = whole(&letter);
    if target.json {
        say(&serde_json::to_string_pretty(&whole)?);
        return Ok(());
    }
    let Value::Object(fields) = whole else {
        unreachable!("a dead letter shows as an object")
    };
    for (name, value) in fields {
        let text = match value {
            Value::String(text) => text,
            Value::Null => "-".to_owned(),
            other => serde_json::to_string_pretty(&other)?,
        };
        say(&format!("{name}: {text}"));
    }
    Ok(())
}

async fn replay(selection: &Selection) -> anyhow::Result<()> {
    settle(selection, "replayed", |store, queue, which| {
        Box::pin(async move { store.replay(&queue, which).await })
    })
    .await
}

async fn purge(selection: &Selection) -> anyhow::Result<()> {
    settle(selection, "purged", |store, queue, which| {
        Box::pin(async move { store.purge(&queue, which).await })
    })
    .await
}

/// Replays or purges the selection in every queue of the target, and says
/// how many; a given id that no queue holds is an error.
async fn settle<F>(
    selection: &Selection,
    done: &str,
    operation: F,
) -> anyhow::Result<()>
where
    F: Fn(
        Arc<dyn DeadLetters>,
        String,
        Which,
    ) -> herald::broker::BoxFuture<
        'static,
        Result<usize, herald::BusError>,
    >,
{
    let target = &selection.target;
    let store = open(target).await?;
    let which = selection.which();
    let mut counts = serde_json::Map::new();
    let mut total = 0;
    for queue in target.queues() {
        let count = operation(store.clone(), queue.clone(), which)
            .await
            .map_err(|e| missing(e, &queue))?;
        total += count;
        counts.insert(queue, json!(count));
    }
    if let (Which::One(id), 0) = (which, total) {
        bail!("no dead letter {id} in {}", target.queues().join(", "));
    }
    if target.json {
        say(&serde_json::to_string_pretty(&json!({ done: counts }))?);
    } else {
        for (queue, count) in counts {
            say(&format!("{done} {count} dead letter(s) of {queue}"));
        }
    }
    Ok(())
}

impl Target {
    fn queues(&self) -> Vec<String> {
        if self.queue.is_empty() {
            return vec![mailer::QUEUE.to_owned()];
        }
        let mut queues = Vec::new();
        for queue in &self.queue {
            if !queues.contains(queue) {
                queues.push(queue.clone());
            }
        }
        queues
    }
}

/// The dead letters where the flags say the bus is.
async fn open(target: &Target) -> anyhow::Result<Arc<dyn DeadLetters>> {
    let (bus, database) = target.data.choices()?;
    match bus {
        BusChoice::Amqp(url) => {
            let broker = AmqpBroker::connect(&url, AmqpOptions::default())
                .await
                .with_context(|| {
                    format!(
                        "cannot connect to RabbitMQ at {}",
                        herald::redact_credentials(&url)
                    )
                })?;
            Ok(Arc::new(broker))
        }
        BusChoice::Embedded => {
            let path = match database {
                DatabaseChoice::Sqlite(path) => path,
                DatabaseChoice::Postgres(_) => {
                    target.data.data_dir.join("herald.db")
                }
            };
            if !path.is_file() {
                bail!(
                    "no herald database at {}: give the --data-dir (or \
                     --database) the services run with",
                    path.display()
                );
            }
            let db = herald::sqlite::Database::open(&path)
                .await
                .with_context(|| format!("cannot open {}", path.display()))?;
            // Opening the bus would create its tables: first make sure
            // this is a herald database, and leave any other file alone.
            let bus: Option<String> = sqlx::query_scalar(
                "SELECT name FROM sqlite_master
                 WHERE type = 'table' AND name = 'bus_dead_letters'",
            )
            .fetch_optional(db.reader())
            .await
            .with_context(|| format!("cannot read {}", path.display()))?;
            if bus.is_none() {
                bail!(
                    "{} is not a herald database (it has no bus tables)",
                    path.display()
                );
            }
            let broker = EmbeddedBroker::open(db, EmbeddedOptions::default())
                .await
                .context("cannot read the embedded bus")?;
            Ok(Arc::new(broker))
        }
    }
}

/// The error, said plainly when it is a queue that does not exist.
fn missing(error: herald::BusError, queue: &str) -> anyhow::Error {
    let text = herald::error_chain(&error);
    if text.contains("NOT_FOUND") || text.contains("NOT-FOUND") {
        anyhow::anyhow!(
            "the broker has no dead-letter queue for {queue}: has a service \
             consumed {queue} on this --broker?"
        )
    } else {
        anyhow::Error::new(error)
            .context(format!("cannot work on the dead letters of {queue}"))
    }
}

/// A dead letter in a line of `list --json`.
fn summary(letter: &DeadLetter) -> Value {
    json!({
        "id": letter.envelope.id,
        "event_type": letter.envelope.event_type,
        "queue": letter.queue,
        "attempts": letter.attempts,
        "reason": letter.reason,
        "first_failed_at": letter.first_failed_at.to_rfc3339(),
        "last_failed_at": letter.dead_at.to_rfc3339(),
    })
}

/// A dead letter whole: its summary, its attributes, anything else the
/// message carried, and its payload exactly as it was sent: as text when
/// it is UTF-8, else in base64 (`payload_base64`).
fn whole(letter: &DeadLetter) -> Value {
    use base64::Engine;
    let envelope = &letter.envelope;
    let mut whole = summary(letter);
    whole["source"] = json!(envelope.source);
    whole["subject"] = json!(envelope.subject);
    // A message from another producer may have had no time at all.
    let known = envelope.time.timestamp() != 0;
    whole["time"] = json!(known.then(|| envelope.time.to_rfc3339()));
    whole["content_type"] = json!(envelope.content_type);
    whole["traceparent"] = json!(envelope.traceparent.map(|t| t.to_string()));
    if !letter.headers.is_empty() {
        let headers: serde_json::Map<String, Value> = letter
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), json!(value)))
            .collect();
        whole["headers"] = Value::Object(headers);
    }
    match std::str::from_utf8(&envelope.data) {
        Ok(text) => whole["payload"] = json!(text),
        Err(_) => {
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(&envelope.data);
            whole["payload_base64"] = json!(encoded);
        }
    }
    whole
}

/// `text` on one line, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match flat.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &flat[..end]),
        None => flat,
    }
}
