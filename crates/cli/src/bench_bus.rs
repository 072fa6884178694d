//! `herald bench bus`: events through the bus, end to end.
//!
//! Publishers publish events one by one (each publish is durable when it
//! returns: committed, or confirmed by RabbitMQ); a worker receives them,
//! runs a handler that does nothing, and acknowledges each. The clock runs
//! from the first publish to the last acknowledgement.
//!
//! On the embedded bus the same run measures the ceiling below herald: the
//! same rows inserted into and deleted from a SQLite table of the same
//! file settings (WAL, `synchronous = NORMAL`, one writer), by sqlx, in
//! transactions of [`CEILING_BATCH`] rows, one multi-row statement each:
//! the most any single writer could make of that work.
//!
//! On RabbitMQ the same run measures the ceiling below herald: raw lapin
//! publishing with a confirm per message and consuming with an ack per
//! message, with the same publishers, prefetch and payloads, on the same
//! broker.
//!
//! With `--compare-instrumentation` the embedded run is made four times,
//! herald's logs, spans and metrics switched off, on, on and off, each on
//! a database of its own, to measure what the instrumentation costs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_lite::StreamExt;
use herald::broker::BoxFuture;
use herald::broker::amqp::AmqpOptions;
use herald::broker::embedded::EmbeddedOptions;
use herald::sqlite::Database;
use herald::worker::{self, WorkerOptions};
use herald::{
    AmqpBroker, Broker, Delivery, EmbeddedBroker, Envelope, Handler,
    HandlerError, Subscription,
};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::BusArgs;
use crate::system::BusChoice;

/// Counts deliveries and says when the last one arrived.
struct Counter {
    handled: AtomicU64,
    target: u64,
    done: Notify,
}

impl Handler for Counter {
    fn handle<'a>(
        &'a self,
        _delivery: &'a Delivery,
    ) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(async move {
            if self.handled.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
                self.done.notify_one();
            }
            Ok(())
        })
    }
}

/// One measured run: events per second end to end and publishing alone.
struct Rates {
    end_to_end: f64,
    publish: f64,
}

impl Rates {
    /// The mean of several runs' rates.
    fn mean(runs: &[Rates]) -> Rates {
        let n = runs.len().max(1) as f64;
        Rates {
            end_to_end: runs.iter().map(|r| r.end_to_end).sum::<f64>() / n,
            publish: runs.iter().map(|r| r.publish).sum::<f64>() / n,
        }
    }
}

pub async fn run(args: BusArgs) -> anyhow::Result<()> {
    let choice = BusChoice::parse(&args.broker)?;
    if args.compare_instrumentation && !matches!(choice, BusChoice::Embedded) {
        anyhow::bail!(
            "--compare-instrumentation measures the embedded bus only"
        );
    }
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let queue = format!("herald-bench-{run_id}");
    let event_type: &'static str =
        Box::leak(format!("bench.{run_id}.v1").into_boxed_str());
    eprintln!(
        "{} events of {} bytes, {} publishers, {} handlers, on {}",
        args.events,
        args.size,
        args.publishers,
        args.concurrency,
        choice.describe()
    );

    let dir = tempfile::tempdir()?;
    let mut uninstrumented = None;
    let (herald, ceiling) = match &choice {
        BusChoice::Embedded => {
            // Compared, the two alternate, off-on-on-off, each on a new
            // database, so that neither gains from going first or last.
            let rates = if args.compare_instrumentation {
                let mut on = Vec::new();
                let mut off = Vec::new();
                for (round, enabled) in
                    [false, true, true, false].iter().enumerate()
                {
                    crate::telemetry::set_enabled(*enabled);
                    let db = dir.path().join(format!("bench-{round}.db"));
                    let rates = embedded(&db, &queue, event_type, &args).await;
                    crate::telemetry::set_enabled(true);
                    if *enabled {
                        on.push(rates?)
                    } else {
                        off.push(rates?)
                    }
                }
                uninstrumented = Some(Rates::mean(&off));
                Rates::mean(&on)
            } else {
                let db = dir.path().join("bench.db");
                embedded(&db, &queue, event_type, &args).await?
            };
            let ceiling = raw_sqlite(&dir.path().join("raw.db"), &args).await?;
            (rates, Some(ceiling))
        }
        BusChoice::Amqp(url) => {
            let options = AmqpOptions {
                prefetch: args.concurrency.clamp(1, 65_535) as u16,
                ..AmqpOptions::default()
            };
            let broker = AmqpBroker::connect(url, options).await?;
            let rates = through_herald(
                Arc::new(broker.clone()),
                &queue,
                event_type,
                &args,
            )
            .await;
            if let Err(error) = broker.delete(&queue).await {
                tracing::warn!(error = %error, "could not delete {queue}");
            }
            broker.close().await;
            let raw = raw_lapin(url, &format!("{queue}-raw"), &args).await;
            delete_queues(url, &[format!("{queue}-raw")]).await;
            (rates?, Some(raw?))
        }
    };

    let report = json!({
        "events": args.events,
        "size": args.size,
        "publishers": args.publishers,
        "concurrency": args.concurrency,
        "broker": choice.describe(),
        "herald": rates_json(&herald),
        "ceiling": ceiling.as_ref().map(rates_json),
        "ceiling_is": match choice {
            BusChoice::Embedded => "raw SQLite",
            BusChoice::Amqp(_) => "raw lapin",
        },
        "ratio": ceiling.as_ref().map(|c| herald.end_to_end / c.end_to_end),
        "uninstrumented": uninstrumented.as_ref().map(rates_json),
        "instrumented_ratio": uninstrumented
            .as_ref()
            .map(|u| herald.end_to_end / u.end_to_end),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    // One row per run, herald's end-to-end rate against each.
    let row = |name: &str, rates: &Rates| {
        println!(
            "{name:<32} {:>12.0} {:>12.0} {:>14.2}",
            rates.end_to_end,
            rates.publish,
            herald.end_to_end / rates.end_to_end
        );
    };
    println!(
        "{:<32} {:>12} {:>12} {:>14}",
        "run", "events/s", "publish/s", "herald / this"
    );
    row("herald", &herald);
    if let Some(bare) = &uninstrumented {
        row("herald, no logs/spans/metrics", bare);
    }
    if let Some(ceiling) = &ceiling {
        let name = match choice {
            BusChoice::Embedded => "raw SQLite (ceiling)",
            BusChoice::Amqp(_) => "raw lapin (ceiling)",
        };
        row(name, ceiling);
        println!(
            "\nherald / ceiling: {:.2}",
            herald.end_to_end / ceiling.end_to_end
        );
    }
    if let Some(bare) = &uninstrumented {
        println!(
            "instrumented / uninstrumented: {:.2}",
            herald.end_to_end / bare.end_to_end
        );
    }
    Ok(())
}

fn rates_json(rates: &Rates) -> Value {
    json!({ "end_to_end_per_second": rates.end_to_end,
            "publish_per_second": rates.publish })
}

/// A run through a new embedded bus in the SQLite file `db`.
async fn embedded(
    db: &std::path::Path,
    queue: &str,
    event_type: &'static str,
    args: &BusArgs,
) -> anyhow::Result<Rates> {
    let db = Database::open(db).await?;
    let broker = EmbeddedBroker::open(db, EmbeddedOptions::default()).await?;
    through_herald(Arc::new(broker), queue, event_type, args).await
}

/// Publishers and a worker through herald's `broker`.
async fn through_herald(
    broker: Arc<dyn Broker>,
    queue: &str,
    event_type: &'static str,
    args: &BusArgs,
) -> anyhow::Result<Rates> {
    broker.bind(queue, &[event_type]).await?;
    let counter = Arc::new(Counter {
        handled: AtomicU64::new(0),
        target: args.events,
        done: Notify::new(),
    });
    let (stop, mut stopped) = watch::channel(false);
    let subscription = Subscription {
        service: Some("bench"),
        queue: queue.to_owned(),
        event_types: vec![event_type],
        options: WorkerOptions {
            concurrency: args.concurrency as usize,
            ..WorkerOptions::default()
        },
    };
    let consumer = tokio::spawn(worker::run(
        broker.clone(),
        subscription,
        counter.clone(),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));

    let start = Instant::now();
    let mut publishers = tokio::task::JoinSet::new();
    for count in shares(args.events, args.publishers) {
        let broker = broker.clone();
        let data = payload(args.size as usize);
        publishers.spawn(async move {
            for _ in 0..count {
                let envelope = Envelope {
                    id: uuid::Uuid::now_v7(),
                    source: "/bench".into(),
                    event_type: event_type.into(),
                    subject: None,
                    time: chrono::Utc::now(),
                    content_type: herald::envelope::JSON.into(),
                    // Events carry a trace, as a registration's does.
                    traceparent: Some(herald::TraceContext::new_root()),
                    data: data.clone(),
                };
                broker.publish(&envelope).await?;
            }
            anyhow::Ok(())
        });
    }
    let bar = super::progress(args.events, "events handled");
    let ticking = super::tick(bar.clone(), counter.clone(), |counter| {
        counter.handled.load(Ordering::Relaxed)
    });
    while let Some(published) = publishers.join_next().await {
        published??;
    }
    let published_in = start.elapsed();
    let done = wait_for(counter.done.notified()).await;
    ticking.abort();
    bar.finish_and_clear();
    done?;
    let elapsed = start.elapsed();
    stop.send(true)?;
    consumer.await??;
    Ok(Rates {
        end_to_end: args.events as f64 / elapsed.as_secs_f64(),
        publish: args.events as f64 / published_in.as_secs_f64(),
    })
}

/// The most rows one transaction of the SQLite ceiling takes: as many as
/// herald's group commit puts in one.
const CEILING_BATCH: u64 = 512;

/// The SQLite ceiling: the events' rows inserted, then deleted, in
/// batched transactions on one writer, with the bus's file settings.
async fn raw_sqlite(
    path: &std::path::Path,
    args: &BusArgs,
) -> anyhow::Result<Rates> {
    let db = Database::open(path).await?;
    sqlx::query(
        "CREATE TABLE rows (seq INTEGER PRIMARY KEY, event_id TEXT NOT NULL,
             event_type TEXT NOT NULL, time TEXT NOT NULL,
             payload BLOB NOT NULL)",
    )
    .execute(db.writer())
    .await?;
    let data = payload(args.size as usize);

    // One multi-row statement per transaction each way: the most a single
    // writer makes of this work.
    let start = Instant::now();
    for first in (0..args.events).step_by(CEILING_BATCH as usize) {
        let last = (first + CEILING_BATCH).min(args.events);
        let mut insert = sqlx::QueryBuilder::new(
            "INSERT INTO rows (seq, event_id, event_type, time, payload) ",
        );
        insert.push_values(first..last, |mut row, seq| {
            row.push_bind(seq as i64)
                .push_bind(uuid::Uuid::now_v7().to_string())
                .push_bind("bench.v1")
                .push_bind(chrono::Utc::now().to_rfc3339())
                .push_bind(data.clone());
        });
        let mut tx = db.begin().await?;
        insert.build().execute(&mut *tx).await?;
        tx.commit().await?;
    }
    let published_in = start.elapsed();
    for first in (0..args.events).step_by(CEILING_BATCH as usize) {
        let last = (first + CEILING_BATCH).min(args.events);
        let mut tx = db.begin().await?;
        sqlx::query("DELETE FROM rows WHERE seq >= ? AND seq < ?")
            .bind(first as i64)
            .bind(last as i64)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
    let elapsed = start.elapsed();
    db.close().await;
    Ok(Rates {
        end_to_end: args.events as f64 / elapsed.as_secs_f64(),
        publish: args.events as f64 / published_in.as_secs_f64(),
    })
}

/// The same work with lapin alone: persistent messages, a confirm awaited
/// per publish on one confirm channel, a consumer acking each message.
async fn raw_lapin(
    url: &str,
    queue: &str,
    args: &BusArgs,
) -> anyhow::Result<Rates> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .context("connecting for the raw lapin run")?;
    let publisher = connection.create_channel().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    publisher
        .queue_declare(queue.into(), durable, FieldTable::default())
        .await?;

    let consuming = connection.create_channel().await?;
    consuming
        .basic_qos(
            args.concurrency.clamp(1, 65_535) as u16,
            BasicQosOptions::default(),
        )
        .await?;
    let mut consumer = consuming
        .basic_consume(
            queue.into(),
            "raw-bench".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let target = args.events;
    let consumed = tokio::spawn(async move {
        let mut acks = tokio::task::JoinSet::new();
        let mut seen = 0;
        while seen < target {
            let Some(delivery) = consumer.next().await else {
                anyhow::bail!("the raw consumer closed early");
            };
            let delivery = delivery?;
            acks.spawn(async move {
                delivery.ack(BasicAckOptions::default()).await
            });
            seen += 1;
        }
        while let Some(acked) = acks.join_next().await {
            acked??;
        }
        anyhow::Ok(())
    });

    let start = Instant::now();
    let mut publishers = tokio::task::JoinSet::new();
    for count in shares(args.events, args.publishers) {
        let channel = publisher.clone();
        let queue = queue.to_owned();
        let data = payload(args.size as usize);
        publishers.spawn(async move {
            for _ in 0..count {
                let confirm = channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        &data,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await?
                    .await?;
                anyhow::ensure!(confirm.is_ack(), "the broker nacked");
            }
            anyhow::Ok(())
        });
    }
    while let Some(published) = publishers.join_next().await {
        published??;
    }
    let published_in = start.elapsed();
    wait_for(consumed).await???;
    let elapsed = start.elapsed();
    let _ = connection.close(200, "done".into()).await;
    Ok(Rates {
        end_to_end: args.events as f64 / elapsed.as_secs_f64(),
        publish: args.events as f64 / published_in.as_secs_f64(),
    })
}

/// `total` split as evenly as possible among `parts`.
fn shares(total: u64, parts: u64) -> Vec<u64> {
    let parts = parts.max(1);
    (0..parts)
        .map(|p| total / parts + u64::from(p < total % parts))
        .collect()
}

/// A JSON payload of `size` bytes (a string of `x`), as handlers expect
/// JSON: a worker dead-letters anything else before its handler runs.
fn payload(size: usize) -> Vec<u8> {
    let mut data = vec![b'x'; size.max(2)];
    data[0] = b'"';
    *data.last_mut().expect("at least two bytes") = b'"';
    data
}

async fn wait_for<T>(done: impl Future<Output = T>) -> anyhow::Result<T> {
    tokio::time::timeout(Duration::from_secs(600), done)
        .await
        .map_err(|_| anyhow::anyhow!("not every event arrived in 10 minutes"))
}

async fn delete_queues(url: &str, queues: &[String]) {
    let Ok(connection) =
        Connection::connect(url, ConnectionProperties::default()).await
    else {
        return;
    };
    if let Ok(channel) = connection.create_channel().await {
        for queue in queues {
            let _ = channel
                .queue_delete(
                    queue.as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await;
        }
    }
    let _ = connection.close(200, "done".into()).await;
}
