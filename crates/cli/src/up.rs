//! `herald up`: the whole system in one process. With the embedded bus
//! (the default) everything lives in one SQLite file in the data
//! directory; with `--broker amqp://…` events go through RabbitMQ.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;

use crate::system::{
    self, BusChoice, HttpArgs, MailArgs, Stopper, Store, StoreArgs,
};

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    http: HttpArgs,
    #[command(flatten)]
    store: StoreArgs,
    #[command(flatten)]
    mail: MailArgs,
}

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    // Check every flag and take the port before writing anything.
    let choice = BusChoice::parse(&args.store.broker)?;
    let listener = system::listen(&args.http).await?;
    let (from, transport) =
        system::mail_transport(&args.mail, &args.store.data_dir)?;

    let store = Store::open(&args.store).await?;
    let bus = store.bus(&choice);
    let mailer =
        mailer::Mailer::open(store.db.clone(), from, transport).await?;
    let subscription = system::bind_mailer_queue(&*bus).await?;

    let grace = Duration::from_secs(args.store.shutdown_grace_secs);
    let stopper = Stopper::new();
    system::say(&format!("herald up: data in {}", store.path.display()));
    let mut tasks =
        system::start_users(&store, &bus, &choice, listener, grace, &stopper)
            .await?;
    system::say(&system::mailer_line(&mailer, &choice));
    tasks.push((
        "mailer",
        system::spawn_worker(
            bus,
            subscription,
            Arc::new(mailer),
            grace,
            &stopper,
        ),
    ));

    system::run_until_signal(stopper, tasks, grace).await?;
    store.db.close().await;
    Ok(())
}
