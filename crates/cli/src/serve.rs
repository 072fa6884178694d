//! `herald serve users` and `herald serve mailer`: one service in its own
//! process, so each can run as several replicas.
//!
//! On the embedded bus, the services of one system share a data directory
//! (one SQLite file); start the mailer once before the users service, so
//! that its queue is bound before the first registration. On RabbitMQ each
//! process has a data directory of its own: the users service's outbox,
//! the mailer's record of what it sent.

use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};

use crate::system::{
    self, CeleryArgs, HttpArgs, MailArgs, MetricsArgs, Stopper, Store,
    StoreArgs,
};

#[derive(Debug, Subcommand)]
pub enum ServeCommand {
    /// The users service: registrations over HTTP.
    Users(UsersArgs),
    /// The mailer: a welcome email for every registration.
    Mailer(MailerArgs),
}

#[derive(Debug, Args)]
pub struct UsersArgs {
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    celery: CeleryArgs,
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Debug, Args)]
pub struct MailerArgs {
    #[command(flatten)]
    metrics: MetricsArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    mail: MailArgs,
    #[command(flatten)]
    celery: CeleryArgs,
}

pub async fn run(command: ServeCommand) -> anyhow::Result<()> {
    match command {
        ServeCommand::Users(args) => users(args).await,
        ServeCommand::Mailer(args) => mailer(args).await,
    }
}

async fn users(args: UsersArgs) -> anyhow::Result<()> {
    let (choice, database) = args.store.data.choices()?;
    let welcome = args.http.welcome(&choice, &args.celery)?;
    let listener = system::listen(&args.http.listen).await?;
    let store = Store::open(&args.store, &database, &choice).await?;
    let bus = store.bus(&choice);

    let grace = Duration::from_secs(args.store.shutdown_grace_secs);
    let stopper = Stopper::new();
    system::say(&format!(
        "herald serve users: data in {}",
        store.description
    ));
    let tasks = system::start_users(
        &store, &bus, &choice, welcome, listener, grace, &stopper,
    )
    .await?;
    system::run_until_signal(stopper, tasks, grace).await?;
    store.close().await;
    Ok(())
}

async fn mailer(args: MailerArgs) -> anyhow::Result<()> {
    let (choice, database) = args.store.data.choices()?;
    system::check_celery(&args.mail, &choice)?;
    let listener = system::listen(&args.metrics.listen).await?;
    let (from, transport) =
        system::mail_transport(&args.mail, &args.store.data.data_dir)?;
    let store = Store::open(&args.store, &database, &choice).await?;
    let bus = store.bus(&choice);
    let (mailer, subscription) =
        system::open_mailer(&store, &*bus, from, transport).await?;

    let grace = Duration::from_secs(args.store.shutdown_grace_secs);
    let stopper = Stopper::new();
    system::say(&format!(
        "herald serve mailer: data in {}",
        store.description
    ));
    let metrics = system::start_metrics(listener, &stopper)?;
    let mailer = Arc::new(mailer);
    let celery = system::start_celery(
        &args.mail,
        &args.celery,
        &mailer,
        &choice,
        grace,
        &stopper,
    )?;
    let mailer = system::start_mailer(
        mailer,
        subscription,
        bus,
        &choice,
        grace,
        &stopper,
    );
    let tasks = [Some(metrics), celery, Some(mailer)].into_iter().flatten();
    system::run_until_signal(stopper, tasks.collect(), grace).await?;
    store.close().await;
    Ok(())
}
