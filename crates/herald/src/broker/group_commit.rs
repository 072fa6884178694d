//! Group commit for the embedded broker's hottest writes.
//!
//! SQLite runs one write transaction at a time, and each costs a `BEGIN`, a
//! `COMMIT` and a round trip to the connection's thread. Publishes and
//! acknowledgements are small and frequent, so they are queued to one
//! writer task that runs everything waiting in a single transaction. Under
//! load, hundreds of operations share one commit; alone, an operation
//! commits at once. Each caller still learns its own outcome only after
//! the commit: a publish is durable when it returns.

use std::sync::Arc;

use sqlx::{Sqlite, Transaction};
use tokio::sync::{mpsc, oneshot};

use super::embedded::EmbeddedBroker;
use super::{BusError, DeliveryTag};
use crate::envelope::Envelope;
use crate::sqlite::Database;

/// The most operations one transaction takes.
const MAX_BATCH: usize = 512;

/// A write waiting for its batch.
#[derive(Debug)]
pub(crate) enum Op {
    Publish(Envelope),
    Ack(DeliveryTag),
}

#[derive(Debug)]
struct Request {
    op: Op,
    done: oneshot::Sender<Result<(), BusError>>,
}

/// The queue to the writer task. The task ends when every handle is gone.
#[derive(Debug, Clone)]
pub(crate) struct GroupCommit {
    requests: mpsc::UnboundedSender<Request>,
}

impl GroupCommit {
    /// Starts the writer task on `db`; `committed` runs after every commit
    /// that published something.
    pub(crate) fn start(
        db: Database,
        committed: impl Fn() + Send + 'static,
    ) -> Self {
        let (requests, queue) = mpsc::unbounded_channel();
        tokio::spawn(write_batches(db, queue, committed));
        GroupCommit { requests }
    }

    /// Runs `op` in the next batch and returns its outcome once committed.
    pub(crate) async fn run(&self, op: Op) -> Result<(), BusError> {
        let (done, outcome) = oneshot::channel();
        self.requests
            .send(Request { op, done })
            .map_err(|_| BusError::Closed)?;
        outcome.await.map_err(|_| BusError::Closed)?
    }
}

async fn write_batches(
    db: Database,
    mut queue: mpsc::UnboundedReceiver<Request>,
    committed: impl Fn(),
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let published = batch.iter().any(|r| matches!(r.op, Op::Publish(_)));
        match run_batch(&db, &batch).await {
            Ok(outcomes) => {
                if published {
                    committed();
                }
                for (request, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = request.done.send(outcome);
                }
            }
            Err(error) => {
                // Nothing of the batch was committed: each caller gets the
                // failure and may try again.
                let error = Arc::new(error);
                for request in batch.drain(..) {
                    let _ =
                        request.done.send(Err(BusError::Shared(error.clone())));
                }
            }
        }
    }
}

/// Runs every operation in one transaction. An operation can fail on its
/// own (an unroutable event, a lost lease) without failing the others.
async fn run_batch(
    db: &Database,
    batch: &[Request],
) -> Result<Vec<Result<(), BusError>>, sqlx::Error> {
    let mut tx = db.begin().await?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for request in batch {
        outcomes.push(apply(&mut tx, &request.op).await?);
    }
    tx.commit().await?;
    Ok(outcomes)
}

async fn apply(
    tx: &mut Transaction<'static, Sqlite>,
    op: &Op,
) -> Result<Result<(), BusError>, sqlx::Error> {
    match op {
        Op::Publish(envelope) => {
            match EmbeddedBroker::stage(tx, envelope).await {
                Err(BusError::Database(error)) => Err(error),
                outcome => Ok(outcome),
            }
        }
        Op::Ack(tag) => {
            let deleted = sqlx::query(
                "DELETE FROM bus_messages WHERE seq = ? AND lease = ?",
            )
            .bind(tag.seq)
            .bind(tag.lease)
            .execute(&mut **tx)
            .await?
            .rows_affected();
            Ok(if deleted == 1 {
                Ok(())
            } else {
                Err(BusError::LeaseLost { seq: tag.seq })
            })
        }
    }
}
