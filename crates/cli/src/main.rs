//! The `herald` command: runs the reference system.
//!
//! `main` parses the command line, sets up logging and turns the outcome
//! of [`run`] into an exit code; each subcommand lives in its own module.

mod bench;
mod dlq;
mod serve;
mod stats;
mod system;
mod telemetry;
mod up;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "herald",
    version,
    about = "Event-driven microservices: \
    registrations over HTTP, a durable event bus, a welcome email."
)]
struct Cli {
    /// Log filter, e.g. `info` or `info,herald=debug`.
    #[arg(long, env = "HERALD_LOG", default_value = "info", global = true)]
    log: String,

    /// How log lines are written: text for people, json for collectors.
    #[arg(
        long,
        env = "HERALD_LOG_FORMAT",
        value_enum,
        default_value = "text",
        global = true
    )]
    log_format: telemetry::LogFormat,

    /// Export spans over OTLP (HTTP) to this collector, e.g.
    /// http://127.0.0.1:4318. Needs a herald built with `--features otlp`.
    #[arg(long, env = "HERALD_OTLP_ENDPOINT", global = true)]
    otlp_endpoint: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole system in this process: the users service and the
    /// mailer, on the embedded bus in DATA_DIR unless --broker and
    /// --database say otherwise.
    Up(up::UpArgs),
    /// Run one service in this process; run several processes for
    /// replicas.
    #[command(subcommand)]
    Serve(serve::ServeCommand),
    /// Look at, replay or purge the dead letters of the system's queues.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Latency and throughput of running services, per service and per
    /// event type, and of the system as a whole.
    Stats(stats::StatsArgs),
    /// Measure the system: throughput and latency against its ceilings.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let logging = telemetry::init_logging(
        &cli.log,
        cli.log_format,
        // Set but empty, as in `HERALD_OTLP_ENDPOINT=`, means none.
        cli.otlp_endpoint
            .as_deref()
            .filter(|e| !e.trim().is_empty()),
    );
    if let Err(error) = logging {
        eprintln!("herald: {error}");
        return ExitCode::from(2);
    }
    if let Err(error) = telemetry::init_metrics() {
        eprintln!("herald: cannot record metrics: {error}");
        return ExitCode::FAILURE;
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herald: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli.command));
    telemetry::shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("herald: {}", herald::error_chain(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Up(args) => up::run(args).await,
        Command::Serve(command) => serve::run(command).await,
        Command::Dlq(command) => dlq::run(command).await,
        // Watching ends at Ctrl-C, which is not a failure.
        Command::Stats(args) => tokio::select! {
            outcome = stats::run(args) => outcome,
            _ = system::shutdown_signal() => Ok(()),
        },
        // Interrupted, the bench still stops the system it started.
        Command::Bench(command) => tokio::select! {
            outcome = bench::run(command) => outcome,
            _ = system::shutdown_signal() => anyhow::bail!("interrupted"),
        },
    }
}
