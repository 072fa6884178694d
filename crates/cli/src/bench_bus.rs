//! `herald bench bus`: events through the embedded bus, end to end.
//!
//! Publishers commit events one by one (each publish is durable when it
//! returns); a worker receives them in batches, runs a handler that does
//! nothing, and acknowledges each. The clock runs from the first publish to
//! the last acknowledgement.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use herald::broker::BoxFuture;
use herald::broker::embedded::EmbeddedOptions;
use herald::sqlite::Database;
use herald::worker::{self, WorkerOptions};
use herald::{
    Broker, Delivery, EmbeddedBroker, Envelope, Handler, HandlerError,
    Subscription,
};
use serde_json::json;
use tokio::sync::{Notify, watch};

use super::BusArgs;

const EVENT_TYPE: &str = "bench.event.v1";
const QUEUE: &str = "bench";

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

pub async fn run(args: BusArgs) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = Database::open(&dir.path().join("bench.db")).await?;
    let broker = EmbeddedBroker::open(db, EmbeddedOptions::default()).await?;
    broker.bind(QUEUE, &[EVENT_TYPE]).await?;

    let counter = Arc::new(Counter {
        handled: AtomicU64::new(0),
        target: args.events,
        done: Notify::new(),
    });
    let (stop, mut stopped) = watch::channel(false);
    let subscription = Subscription {
        queue: QUEUE.into(),
        event_types: vec![EVENT_TYPE],
        options: WorkerOptions {
            concurrency: args.concurrency,
            ..WorkerOptions::default()
        },
    };
    let consumer = tokio::spawn(worker::run(
        Arc::new(broker.clone()),
        subscription,
        counter.clone(),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));

    eprintln!(
        "{} events of {} bytes, {} publishers, {} handlers",
        args.events, args.size, args.publishers, args.concurrency
    );
    let start = Instant::now();
    let mut publishers = tokio::task::JoinSet::new();
    let per_publisher = args.events.div_ceil(args.publishers.max(1));
    for p in 0..args.publishers.max(1) {
        let broker = broker.clone();
        let count =
            per_publisher.min(args.events.saturating_sub(p * per_publisher));
        let data = vec![b'x'; args.size];
        publishers.spawn(async move {
            for _ in 0..count {
                let envelope = Envelope {
                    id: uuid::Uuid::now_v7(),
                    source: "/bench".into(),
                    event_type: EVENT_TYPE.into(),
                    subject: None,
                    time: chrono::Utc::now(),
                    content_type: "application/octet-stream".into(),
                    traceparent: None,
                    data: data.clone(),
                };
                broker.publish(&envelope).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(published) = publishers.join_next().await {
        published??;
    }
    let published_in = start.elapsed();
    tokio::time::timeout(Duration::from_secs(600), counter.done.notified())
        .await
        .map_err(|_| {
            anyhow::anyhow!("not every event arrived in 10 minutes")
        })?;
    let elapsed = start.elapsed();
    stop.send(true)?;
    consumer.await??;

    let report = json!({
        "events": args.events,
        "size": args.size,
        "publish_per_second": args.events as f64 / published_in.as_secs_f64(),
        "end_to_end_per_second": args.events as f64 / elapsed.as_secs_f64(),
        "seconds": elapsed.as_secs_f64(),
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "embedded bus: {} events in {:.2}s: {:.0} events/s end to end \
             (publishing alone: {:.0}/s)",
            args.events,
            elapsed.as_secs_f64(),
            report["end_to_end_per_second"].as_f64().unwrap_or(0.0),
            report["publish_per_second"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}
