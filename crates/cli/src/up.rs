//! `herald up`: the users service, the embedded bus and the mailer in one
//! process, on one SQLite file in the data directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use herald::broker::embedded::EmbeddedOptions;
use herald::sqlite::Database;
use herald::worker::{self, WorkerOptions};
use herald::{Broker, EmbeddedBroker};
use mailer::maildir::Maildir;
use mailer::transport::{SmtpRelay, Transport};
use mailer::{DEFAULT_FROM, Mailer};
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Address the users service listens on.
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:5000")]
    listen: String,

    /// Directory for the database (herald.db) and, by default, the mail.
    /// Created if missing.
    #[arg(long, env = "HERALD_DATA_DIR", default_value = "./var")]
    data_dir: PathBuf,

    /// Maildir that welcome emails are written to [default: DATA_DIR/mail].
    #[arg(long, env = "HERALD_MAIL_DIR")]
    mail_dir: Option<PathBuf>,

    /// Send mail over SMTP instead of to the Maildir:
    /// smtp://[user:pass@]host[:port] (STARTTLS when offered) or smtps://.
    #[arg(long, env = "HERALD_SMTP", hide_env_values = true)]
    smtp: Option<String>,

    /// The From of welcome emails.
    #[arg(long, env = "HERALD_MAIL_FROM", default_value = DEFAULT_FROM)]
    mail_from: String,

    /// Seconds a delivery stays leased to a consumer without renewal; how
    /// long work held by a killed process waits before it is redelivered.
    #[arg(long, env = "HERALD_LEASE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    lease_secs: u64,

    /// Seconds to let work in flight finish after SIGINT or SIGTERM.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3_600))]
    shutdown_grace_secs: u64,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    // Settle the configuration and take the port before touching the
    // disk, so that a mistake leaves nothing behind.
    let from = args.mail_from.parse().with_context(|| {
        format!(
            "--mail-from {:?} is not a mailbox; give `address` or \
             `Name <address>`",
            args.mail_from
        )
    })?;
    let smtp = match args.smtp.as_deref().map(str::trim) {
        Some("") | None => None,
        Some(url) => {
            Some(SmtpRelay::from_url(url).map_err(anyhow::Error::msg)?)
        }
    };
    let listener = TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;

    create_dir(&args.data_dir, "data directory")?;
    let transport = match smtp {
        Some(relay) => Transport::Smtp(relay),
        None => {
            let dir =
                args.mail_dir.clone().unwrap_or(args.data_dir.join("mail"));
            create_dir(&dir, "Maildir")?;
            Transport::Maildir(Maildir::open(&dir).with_context(|| {
                format!("cannot create the Maildir {}", dir.display())
            })?)
        }
    };

    // One database holds the users, the bus and the mailer's records.
    let db_path = args.data_dir.join("herald.db");
    let db = Database::open(&db_path)
        .await
        .with_context(|| format!("cannot open {}", db_path.display()))?;
    let options = EmbeddedOptions {
        lease: Duration::from_secs(args.lease_secs),
        ..EmbeddedOptions::default()
    };
    let broker = EmbeddedBroker::open(db.clone(), options)
        .await
        .context("cannot prepare the embedded bus")?;
    let mailer = Mailer::open(db.clone(), from, transport)
        .await
        .context("cannot prepare the mailer")?;
    let users = users::Users::open(broker.clone())
        .await
        .context("cannot prepare the users service")?;

    // Bind the mailer's queue before the first registration can arrive, so
    // that no event is published to nobody.
    let subscription = mailer::subscription(WorkerOptions {
        shutdown_grace: Duration::from_secs(args.shutdown_grace_secs),
        ..WorkerOptions::default()
    });
    broker
        .bind(&subscription.queue, &subscription.event_types)
        .await
        .context("cannot bind the mailer's queue")?;

    let address = listener.local_addr()?;
    println!("herald up: data in {}", db_path.display());
    println!(
        "users    http://{address}  POST /user/register, GET /healthz, GET /readyz"
    );
    println!(
        "mailer   {} from queue {} -> {}",
        <contracts::UserRegistered as herald::Event>::TYPE,
        mailer::QUEUE,
        mailer.transport().describe()
    );

    // Run both until a signal, then stop both gracefully.
    let (stop, stopped) = watch::channel(false);
    let until_stopped = move || {
        let mut stopped = stopped.clone();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    };
    let worker = tokio::spawn(worker::run(
        Arc::new(broker) as Arc<dyn Broker>,
        subscription,
        Arc::new(mailer),
        until_stopped(),
    ));
    let server = tokio::spawn(users::serve(users, listener, until_stopped()));

    shutdown_signal().await;
    tracing::info!(
        "shutting down: finishing requests and deliveries in flight"
    );
    let _ = stop.send(true);

    // Both stop within the grace period; what is still open after it is
    // cut off (a client that never finishes its request cannot hold the
    // process), and undelivered events wait in the database.
    let grace = Duration::from_secs(args.shutdown_grace_secs);
    let (served, worked) = tokio::join!(
        finish_within(grace, server, "users service"),
        // The mailer hands back what it holds at its own deadline; a
        // moment more lets it say so before it is cut off.
        finish_within(grace + Duration::from_secs(2), worker, "mailer"),
    );
    if let Some(served) = served {
        served.context("the users service failed")?;
    }
    if let Some(worked) = worked {
        worked.context("the mailer failed")?;
    }
    db.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Waits for `task` until `grace` has passed, then aborts it. `None` when
/// it had to be aborted.
async fn finish_within<T>(
    grace: Duration,
    mut task: tokio::task::JoinHandle<T>,
    what: &str,
) -> Option<T> {
    match tokio::time::timeout(grace, &mut task).await {
        Ok(Ok(outcome)) => Some(outcome),
        Ok(Err(panicked)) => {
            tracing::error!(error = %panicked, "the {what} task failed");
            None
        }
        Err(_) => {
            tracing::warn!(
                "the {what} did not stop within {grace:?}; cutting it off"
            );
            task.abort();
            None
        }
    }
}

/// Creates `dir` if needed, and says plainly when the path is taken by
/// something that is not a directory.
fn create_dir(dir: &Path, what: &str) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "the {what} {} exists and is not a directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the {what} {}", dir.display()))
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate =
            signal(SignalKind::terminate()).expect("can listen for SIGTERM");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
