//! `herald up`: the whole system in one process. With the embedded bus
//! (the default) everything lives in one SQLite file in the data
//! directory; with `--broker amqp://…` events go through RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::system::{
    self, CeleryArgs, HttpArgs, MailArgs, Stopper, Store, StoreArgs,
};

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    mail: MailArgs,
    #[command(flatten)]
    celery: CeleryArgs,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    // Check every flag and take the port before writing anything.
    let (choice, database) = args.store.data.choices()?;
    let welcome = args.http.welcome(&choice, &args.celery)?;
    system::check_celery(&args.mail, &choice)?;
    let listener = system::listen(&args.http.listen).await?;
    let (from, transport) =
        system::mail_transport(&args.mail, &args.store.data.data_dir)?;

    let store = Store::open(&args.store, &database, &choice).await?;
    let bus = store.bus(&choice);
    let (mailer, subscription) =
        system::open_mailer(&store, &*bus, from, transport).await?;

    let grace = Duration::from_secs(args.store.shutdown_grace_secs);
    let stopper = Stopper::new();
    system::say(&format!("herald up: data in {}", store.description));
    let mut tasks = system::start_users(
        &store, &bus, &choice, welcome, listener, grace, &stopper,
    )
    .await?;
    let mailer = Arc::new(mailer);
    if let Some(celery) = system::start_celery(
        &args.mail,
        &args.celery,
        &mailer,
        &choice,
        grace,
        &stopper,
    )? {
        tasks.push(celery);
    }
    tasks.push(system::start_mailer(
        mailer,
        subscription,
        bus,
        &choice,
        grace,
        &stopper,
    ));

    system::run_until_signal(stopper, tasks, grace).await?;
    store.close().await;
    Ok(())
}
