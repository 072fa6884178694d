//! The pieces `herald up` and `herald serve` assemble: the flags they
//! share, the store, the bus, each service, and the graceful stop.
//!
//! A process keeps its services' state in its database: by default a SQLite
//! file in the data directory, which with the embedded bus holds the bus
//! too; or PostgreSQL, shared by replicas: the users, the outbox they
//! relay from, the mailer's record of what it sent.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use contracts::UserRegistered;
use herald::broker::amqp::AmqpOptions;
use herald::broker::embedded::EmbeddedOptions;
use herald::db::Db;
use herald::outbox::Outbox;
use herald::worker::{self, Subscription, WorkerOptions};
use herald::{
    Broker, BusError, EmbeddedBroker, Event, Handler, ReconnectingAmqp,
    postgres, sqlite,
};
use mailer::maildir::Maildir;
use mailer::transport::{SmtpRelay, Transport};
use mailer::{DEFAULT_FROM, Mailer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use users::celery::{CeleryRelay, Welcome, WelcomeRoute};
use users::store::UserStore;

use crate::telemetry;

/// Where a process keeps its data and which bus it speaks to.
#[derive(Debug, Args)]
pub struct DataArgs {
    /// Directory for the SQLite database (herald.db) and, by default, the
    /// mail. The services create it if missing.
    #[arg(long, env = "HERALD_DATA_DIR", default_value = "./var")]
    pub data_dir: PathBuf,

    /// Where the services keep their state: sqlite://PATH, or a PostgreSQL
    /// URL, postgres://user:pass@host:port/db, which replicas can share
    /// [default: sqlite://DATA_DIR/herald.db].
    #[arg(long, env = "HERALD_DATABASE", hide_env_values = true)]
    pub database: Option<String>,

    /// The event bus: `embedded` (in the data directory's database) or a
    /// RabbitMQ URL, amqp://user:pass@host:port/vhost (or amqps://).
    #[arg(
        long,
        env = "HERALD_BROKER",
        default_value = "embedded",
        hide_env_values = true
    )]
    pub broker: String,
}

impl DataArgs {
    /// The bus and the database the flags name, checked.
    pub fn choices(&self) -> anyhow::Result<(BusChoice, DatabaseChoice)> {
        let bus = BusChoice::parse(&self.broker)?;
        let database =
            DatabaseChoice::parse(self.database.as_deref(), &self.data_dir)?;
        Ok((bus, database))
    }
}

/// The data flags, and how the process runs its bus.
#[derive(Debug, Args)]
pub struct StoreArgs {
    #[command(flatten)]
    pub data: DataArgs,

    /// Seconds a delivery stays leased to a consumer without renewal; how
    /// long work held by a killed process waits before it is redelivered
    /// (embedded bus).
    #[arg(long, env = "HERALD_LEASE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub lease_secs: u64,

    /// Seconds to let work in flight finish after SIGINT or SIGTERM.
    #[arg(long, env = "HERALD_SHUTDOWN_GRACE_SECS", default_value_t = 30,
          value_parser = clap::value_parser!(u64).range(0..=3_600))]
    pub shutdown_grace_secs: u64,
}

/// Where the users service listens.
#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Address the users service listens on.
    #[arg(long, env = "HERALD_LISTEN", default_value = "127.0.0.1:5000")]
    pub listen: String,

    /// How a registration asks for its welcome email: `event`
    /// (user.registered.v1, for herald's mailer), `celery` (the Celery
    /// task tasks.send_welcome_email, for a Python Celery worker; needs
    /// --broker amqp://...) or `both`.
    #[arg(long, env = "HERALD_WELCOME", value_enum, default_value = "event")]
    pub welcome: WelcomeChoice,
}

/// `--welcome`: see [`users::celery::Welcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WelcomeChoice {
    Event,
    Celery,
    Both,
}

impl HttpArgs {
    /// The `--welcome` asked for, refused without RabbitMQ, before
    /// anything starts.
    pub fn welcome(
        &self,
        choice: &BusChoice,
        celery: &CeleryArgs,
    ) -> anyhow::Result<WelcomeRoute> {
        let (welcome, name) = match self.welcome {
            WelcomeChoice::Event => (Welcome::Event, "event"),
            WelcomeChoice::Celery => (Welcome::Celery, "celery"),
            WelcomeChoice::Both => (Welcome::Both, "both"),
        };
        if welcome != Welcome::Event && matches!(choice, BusChoice::Embedded) {
            anyhow::bail!(
                "--welcome {name} needs RabbitMQ: give --broker amqp://..., \
                 where the Celery worker takes its tasks"
            );
        }
        Ok(WelcomeRoute {
            welcome,
            queue: celery.celery_queue.clone(),
        })
    }
}

/// Where a service without an API serves its metrics.
#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// Address the mailer serves GET /metrics and GET /healthz on.
    #[arg(
        long = "listen",
        env = "HERALD_MAILER_LISTEN",
        default_value = "127.0.0.1:5001"
    )]
    pub listen: String,
}

/// Serves `GET /metrics` and `GET /healthz` on `listener` until the stop.
pub fn start_metrics(
    listener: TcpListener,
    stopper: &Stopper,
) -> anyhow::Result<Running> {
    let address = listener.local_addr()?;
    say(&format!("metrics  http://{address}/metrics"));
    let healthz = || async { axum::Json(serde_json::json!({"status": "ok"})) };
    let router = telemetry::metrics_router()
        .route("/healthz", axum::routing::get(healthz));
    let server = users::serve(router, listener, stopper.stopped());
    Ok(("metrics server", task(server)))
}

/// Where the mailer sends welcome emails.
#[derive(Debug, Args)]
pub struct MailArgs {
    /// Maildir that welcome emails are written to [default: DATA_DIR/mail].
    #[arg(long, env = "HERALD_MAIL_DIR")]
    pub mail_dir: Option<PathBuf>,

    /// Send mail over SMTP instead of to the Maildir:
    /// smtp://[user:pass@]host[:port] (STARTTLS when offered) or smtps://.
    #[arg(long, env = "HERALD_SMTP", hide_env_values = true)]
    pub smtp: Option<String>,

    /// The From of welcome emails.
    #[arg(long, env = "HERALD_MAIL_FROM", default_value = DEFAULT_FROM)]
    pub mail_from: String,

    /// Also run the Celery task tasks.send_welcome_email for Python
    /// callers, from the queue --celery-queue names (needs --broker
    /// amqp://...).
    #[arg(long, env = "HERALD_CELERY")]
    pub celery: bool,
}

/// Where the welcome email's Celery task travels.
#[derive(Debug, Args)]
pub struct CeleryArgs {
    /// The Celery queue of tasks.send_welcome_email: the one the mailer's
    /// --celery consumes, and the users service's --welcome celery sends
    /// to. Declared as Celery declares it.
    #[arg(long, env = "HERALD_CELERY_QUEUE", default_value = "celery")]
    pub celery_queue: String,
}

/// The bus a process was told to use.
#[derive(Debug, Clone)]
pub enum BusChoice {
    Embedded,
    Amqp(String),
}

impl BusChoice {
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let text = text.trim();
        if text.is_empty() || text == "embedded" {
            Ok(BusChoice::Embedded)
        } else if let Some(url) = with_scheme(text, &["amqp", "amqps"]) {
            // Check it now: a URL that cannot work should stop the start,
            // not look like a broker that is down.
            if let Err(why) = url.parse::<lapin::uri::AMQPUri>() {
                // Some of these messages quote the URL; say less then.
                let why = if why.contains('\'') {
                    "malformed"
                } else {
                    &why
                };
                anyhow::bail!(
                    "--broker {} is not a valid AMQP URL: {why}",
                    herald::redact_credentials(&url)
                );
            }
            Ok(BusChoice::Amqp(url))
        } else {
            anyhow::bail!(
                "--broker must be `embedded` or an amqp:// or amqps:// URL, \
                 not {:?}",
                herald::redact_credentials(text)
            )
        }
    }

    pub fn describe(&self) -> String {
        match self {
            BusChoice::Embedded => "embedded".to_owned(),
            BusChoice::Amqp(url) => herald::redact_credentials(url),
        }
    }
}

/// The database a process was told to keep its state in.
#[derive(Debug, Clone)]
pub enum DatabaseChoice {
    Sqlite(PathBuf),
    Postgres(String),
}

impl DatabaseChoice {
    pub fn parse(text: Option<&str>, data_dir: &Path) -> anyhow::Result<Self> {
        let text = text.map(str::trim).unwrap_or_default();
        if text.is_empty() {
            return Ok(DatabaseChoice::Sqlite(data_dir.join("herald.db")));
        }
        if let Some(url) = with_scheme(text, &["sqlite"]) {
            let path = &url["sqlite://".len()..];
            if path.is_empty() {
                anyhow::bail!("--database sqlite:// needs a file path");
            }
            return Ok(DatabaseChoice::Sqlite(PathBuf::from(path)));
        }
        if let Some(url) = with_scheme(text, &["postgres", "postgresql"]) {
            return Ok(DatabaseChoice::Postgres(url));
        }
        anyhow::bail!(
            "--database must be sqlite://PATH or a postgres:// URL, not {:?}",
            herald::redact_credentials(text)
        )
    }
}

/// `text` with its scheme in lower case, when it is a URL with one of
/// `schemes` (compared without case, as URL schemes are).
fn with_scheme(text: &str, schemes: &[&str]) -> Option<String> {
    let (scheme, rest) = text.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    schemes
        .contains(&scheme.as_str())
        .then(|| format!("{scheme}://{rest}"))
}

/// The services' database and, when there is one, the embedded bus.
pub struct Store {
    /// Where the services keep their state.
    pub db: Db,
    /// The embedded bus, in a SQLite database: the services' own when it
    /// is SQLite, else the data directory's. Absent on PostgreSQL and
    /// RabbitMQ together, which need no local file.
    pub embedded: Option<EmbeddedBroker>,
    /// Where the data is, for people.
    pub description: String,
}

impl Store {
    pub async fn open(
        args: &StoreArgs,
        database: &DatabaseChoice,
        bus: &BusChoice,
    ) -> anyhow::Result<Self> {
        let sqlite_path = match (database, bus) {
            (DatabaseChoice::Sqlite(path), _) => Some(path.clone()),
            (DatabaseChoice::Postgres(_), BusChoice::Embedded) => {
                create_dir(&args.data.data_dir, "data directory")?;
                Some(args.data.data_dir.join("herald.db"))
            }
            (DatabaseChoice::Postgres(_), BusChoice::Amqp(_)) => None,
        };
        // PostgreSQL first: when it is unreachable, nothing is written.
        let postgres = match database {
            DatabaseChoice::Postgres(url) => {
                let shown = herald::redact_credentials(url);
                let db =
                    postgres::Database::open(url).await.with_context(|| {
                        format!("cannot connect to PostgreSQL at {shown}")
                    })?;
                Some((db, shown))
            }
            DatabaseChoice::Sqlite(_) => None,
        };
        let sqlite = match &sqlite_path {
            Some(path) => Some(open_sqlite(path, args).await?),
            None => None,
        };
        let embedded = sqlite.as_ref().map(|(_, bus)| bus.clone());

        let (db, description) = match (postgres, sqlite) {
            (Some((db, shown)), _) => {
                let description = match &sqlite_path {
                    Some(path) => format!("{shown}, bus in {}", path.display()),
                    None => shown,
                };
                (Db::Postgres(db), description)
            }
            (None, Some((db, _))) => (
                Db::Sqlite(db),
                sqlite_path.unwrap_or_default().display().to_string(),
            ),
            (None, None) => {
                unreachable!("a SQLite choice always opens its file")
            }
        };
        Ok(Store {
            db,
            embedded,
            description,
        })
    }

    /// The bus services publish to and consume from.
    pub fn bus(&self, choice: &BusChoice) -> Arc<dyn Broker> {
        match (choice, &self.embedded) {
            (BusChoice::Embedded, Some(embedded)) => Arc::new(embedded.clone()),
            (BusChoice::Embedded, None) => {
                unreachable!("the embedded bus is opened when chosen")
            }
            (BusChoice::Amqp(url), _) => {
                let broker = ReconnectingAmqp::new(url, AmqpOptions::default());
                // Connect at once, so readiness is true from the start;
                // a failure is logged, and tried again on first use.
                let eager = broker.clone();
                tokio::spawn(async move { eager.connect().await });
                Arc::new(broker)
            }
        }
    }

    pub async fn close(&self) {
        self.db.close().await;
        if let Some(embedded) = &self.embedded {
            embedded.database().close().await;
        }
    }
}

/// Opens the SQLite database at `path` and the embedded bus in it.
async fn open_sqlite(
    path: &Path,
    args: &StoreArgs,
) -> anyhow::Result<(sqlite::Database, EmbeddedBroker)> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        create_dir(parent, "data directory")?;
    }
    let db = sqlite::Database::open(path)
        .await
        .with_context(|| format!("cannot open {}", path.display()))?;
    let options = EmbeddedOptions {
        lease: Duration::from_secs(args.lease_secs),
        ..EmbeddedOptions::default()
    };
    let embedded = EmbeddedBroker::open(db.clone(), options)
        .await
        .context("cannot prepare the embedded bus")?;
    Ok((db, embedded))
}

/// Checks the mail flags and prepares the transport.
pub fn mail_transport(
    args: &MailArgs,
    data_dir: &Path,
) -> anyhow::Result<(lettre::message::Mailbox, Transport)> {
    let from = args.mail_from.parse().with_context(|| {
        format!(
            "--mail-from {:?} is not a mailbox; give `address` or \
             `Name <address>`",
            args.mail_from
        )
    })?;
    let transport = match args.smtp.as_deref().map(str::trim) {
        Some("") | None => {
            let dir = args.mail_dir.clone().unwrap_or(data_dir.join("mail"));
            create_dir(&dir, "Maildir")?;
            Transport::Maildir(Maildir::open(&dir).with_context(|| {
                format!("cannot create the Maildir {}", dir.display())
            })?)
        }
        Some(url) => Transport::Smtp(
            SmtpRelay::from_url(url).map_err(anyhow::Error::msg)?,
        ),
    };
    Ok((from, transport))
}

/// Prints a line for people on stdout. A closed stdout (`herald up | head`)
/// is no reason to stop serving, so a failed write is ignored.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// Binds the listener early, so a bad address fails before anything is
/// written.
pub async fn listen(address: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))
}

/// Opens the mailer and makes sure its queue exists before any
/// registration can be published, so that no event goes to nobody. With
/// RabbitMQ down this waits, retrying, until it is up.
pub async fn open_mailer(
    store: &Store,
    bus: &dyn Broker,
    from: lettre::message::Mailbox,
    transport: Transport,
) -> anyhow::Result<(Mailer, Subscription)> {
    let mailer = Mailer::open(store.db.clone(), from, transport)
        .await
        .context("cannot prepare the mailer")?;
    let subscription = mailer::subscription(WorkerOptions::default());
    retry_until_done("bind the mailer's queue", || {
        bus.bind(&subscription.queue, &subscription.event_types)
    })
    .await;
    Ok((mailer, subscription))
}

/// Says where the mailer's mail goes and starts it.
pub fn start_mailer(
    mailer: Arc<Mailer>,
    subscription: Subscription,
    bus: Arc<dyn Broker>,
    choice: &BusChoice,
    grace: Duration,
    stopper: &Stopper,
) -> Running {
    say(&format!(
        "mailer   {} from queue {} on {} -> {}",
        UserRegistered::TYPE,
        mailer::QUEUE,
        choice.describe(),
        mailer.transport().describe()
    ));
    (
        "mailer",
        spawn_worker(bus, subscription, mailer, grace, stopper),
    )
}

/// Refuses `--celery` without RabbitMQ, before anything starts.
pub fn check_celery(args: &MailArgs, choice: &BusChoice) -> anyhow::Result<()> {
    if args.celery && matches!(choice, BusChoice::Embedded) {
        anyhow::bail!(
            "--celery needs RabbitMQ: give --broker amqp://..., where the \
             Celery callers send their tasks"
        );
    }
    Ok(())
}

/// Starts the mailer's Celery worker, when `--celery` asks for it: the
/// welcome email as the task `tasks.send_welcome_email` on the `celery`
/// queue of the RabbitMQ in `choice`.
pub fn start_celery(
    args: &MailArgs,
    queue: &CeleryArgs,
    mailer: &Arc<Mailer>,
    choice: &BusChoice,
    grace: Duration,
    stopper: &Stopper,
) -> anyhow::Result<Option<Running>> {
    if !args.celery {
        return Ok(None);
    }
    check_celery(args, choice)?;
    let BusChoice::Amqp(url) = choice else {
        unreachable!("checked: --celery runs on RabbitMQ");
    };
    // The same patience with a mail server as for events.
    let retry = mailer::subscription(WorkerOptions::default()).options.retry;
    let options = herald::celery::CeleryOptions {
        service: mailer::SERVICE,
        queue: queue.celery_queue.clone(),
        retry,
        shutdown_grace: grace,
        ..herald::celery::CeleryOptions::default()
    };
    say(&format!(
        "celery   {} from queue {} on {}",
        mailer::celery::TASK,
        options.queue,
        choice.describe()
    ));
    let task: Arc<dyn herald::celery::Task> =
        Arc::new(mailer::celery::WelcomeTask::new(mailer.clone()));
    let url = url.clone();
    let stopped = stopper.stopped();
    let worker = tokio::spawn(async move {
        herald::celery::serve(&url, vec![task], options, stopped)
            .await
            .map_err(anyhow::Error::from)
    });
    Ok(Some(("Celery worker", worker)))
}

async fn retry_until_done<F, Fut>(what: &str, mut attempt: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), BusError>>,
{
    let mut wait = Duration::from_millis(250);
    while let Err(error) = attempt().await {
        tracing::warn!(
            error = %herald::error_chain(&error),
            "cannot {what} yet; retrying in {wait:?}"
        );
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}

/// A part of the process that runs until the stop: its name, for the
/// logs, and its task.
pub type Running = (&'static str, JoinHandle<anyhow::Result<()>>);

/// Tells every part of the process when to stop.
pub struct Stopper {
    stop: watch::Sender<bool>,
}

impl Stopper {
    pub fn new() -> Self {
        Stopper {
            stop: watch::Sender::new(false),
        }
    }

    /// A future that completes when the stop is given.
    pub fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut stopped = self.stop.subscribe();
        async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Runs `handler` over `subscription` on `bus` until the stop.
pub fn spawn_worker(
    bus: Arc<dyn Broker>,
    mut subscription: Subscription,
    handler: Arc<dyn Handler>,
    grace: Duration,
    stopper: &Stopper,
) -> JoinHandle<anyhow::Result<()>> {
    subscription.options.shutdown_grace = grace;
    task(worker::run(bus, subscription, handler, stopper.stopped()))
}

/// Starts the users service on `listener`, and the relay that carries its
/// outbox to the bus when events are not staged on the bus itself (the
/// embedded bus in the same SQLite database).
pub async fn start_users(
    store: &Store,
    bus: &Arc<dyn Broker>,
    choice: &BusChoice,
    welcome: WelcomeRoute,
    listener: TcpListener,
    grace: Duration,
    stopper: &Stopper,
) -> anyhow::Result<Vec<Running>> {
    let mut tasks = Vec::new();
    // Welcome emails asked of a Python Celery worker go out through the
    // same relay as events.
    let relay_target: Arc<dyn Broker> = match choice {
        BusChoice::Amqp(url) if welcome.welcome != Welcome::Event => {
            let and_event = match welcome.welcome {
                Welcome::Both => ", and the event",
                _ => "",
            };
            say(&format!(
                "welcome  {} to queue {} on {}{and_event}",
                users::celery::WELCOME_TASK,
                welcome.queue,
                choice.describe(),
            ));
            Arc::new(CeleryRelay::new(bus.clone(), url, welcome))
        }
        _ => bus.clone(),
    };
    let user_store = match (&store.db, &store.embedded) {
        (Db::Postgres(db), _) => {
            let outbox = Outbox::open(db.clone())
                .await
                .context("cannot prepare the outbox")?;
            let relay = outbox.clone();
            let (bus, stopped) = (relay_target.clone(), stopper.stopped());
            tasks.push((
                "outbox relay",
                task(async move { relay.relay(bus, stopped).await }),
            ));
            UserStore::postgres(outbox).await
        }
        (Db::Sqlite(_), Some(embedded)) => {
            if let BusChoice::Amqp(_) = choice {
                tasks.push((
                    "outbox relay",
                    start_sqlite_relay(embedded, &relay_target, grace, stopper)
                        .await?,
                ));
            }
            UserStore::sqlite(embedded.clone()).await
        }
        (Db::Sqlite(_), None) => {
            unreachable!("a SQLite database always has its embedded bus")
        }
    };
    let mut users = users::Users::new(
        user_store.context("cannot prepare the users service")?,
    );
    if let BusChoice::Amqp(_) = choice {
        users = users.relayed_to(bus.clone());
    }

    let address = listener.local_addr()?;
    say(&format!("metrics  http://{address}/metrics"));
    say(&format!(
        "users    http://{address}  POST /user/register, GET /healthz, \
         GET /readyz, GET /metrics"
    ));
    let router = users.router().merge(telemetry::metrics_router());
    tasks.push((
        "users service",
        task(users::serve(router, listener, stopper.stopped())),
    ));
    Ok(tasks)
}

/// Relays the SQLite outbox (the embedded bus's `outbox` queue) to `bus`.
async fn start_sqlite_relay(
    embedded: &EmbeddedBroker,
    bus: &Arc<dyn Broker>,
    grace: Duration,
    stopper: &Stopper,
) -> anyhow::Result<JoinHandle<anyhow::Result<()>>> {
    let subscription = users::relay::subscription();
    embedded
        .bind(&subscription.queue, &subscription.event_types)
        .await
        .context("cannot bind the outbox")?;
    let relay = Arc::new(users::relay::Relay::new(bus.clone()));
    let outbox: Arc<dyn Broker> = Arc::new(embedded.clone());
    Ok(spawn_worker(outbox, subscription, relay, grace, stopper))
}

/// Waits for SIGINT or SIGTERM, then stops everything within the grace
/// period: what is still open after it is cut off (a client that never
/// finishes its request cannot hold the process), and what was not
/// delivered waits in its queue.
pub async fn run_until_signal(
    stopper: Stopper,
    tasks: Vec<Running>,
    grace: Duration,
) -> anyhow::Result<()> {
    shutdown_signal().await;
    tracing::info!(
        "shutting down: finishing requests and deliveries in flight"
    );
    stopper.stop();

    // Workers hand back what they hold at their own deadline; a moment
    // more lets them say so before they are cut off.
    let limit = grace + Duration::from_secs(2);
    let finish_all = async {
        let mut failure = None;
        for (what, task) in tasks {
            if let Some(Err(error)) = finish_within(limit, task, what).await {
                failure
                    .get_or_insert(error.context(format!("the {what} failed")));
            }
        }
        failure
    };
    // A second signal means "now": stop waiting. Work left in flight is
    // delivered again later, as after a crash.
    let failure = tokio::select! {
        failure = finish_all => failure,
        _ = shutdown_signal() => Some(anyhow::anyhow!(
            "stopped at a second signal without finishing the work in flight"
        )),
    };
    match failure {
        Some(error) => Err(error),
        None => {
            tracing::info!("stopped");
            Ok(())
        }
    }
}

/// Waits for `task` until `grace` has passed, then aborts it. `None` when
/// it had to be aborted or panicked.
async fn finish_within<T>(
    grace: Duration,
    mut task: JoinHandle<T>,
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

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
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

/// Creates `dir` if needed, and says plainly when the path is taken by
/// something that is not a directory.
pub fn create_dir(dir: &Path, what: &str) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!(
            "the {what} {} exists and is not a directory",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the {what} {}", dir.display()))
}

/// Adapts a worker's or a server's result for [`run_until_signal`].
pub fn task<E>(
    future: impl Future<Output = Result<(), E>> + Send + 'static,
) -> JoinHandle<anyhow::Result<()>>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::spawn(async move { future.await.map_err(anyhow::Error::from) })
}
