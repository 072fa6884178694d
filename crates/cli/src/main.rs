//! The `herald` command: runs the reference system.
//!
//! `main` parses the command line, sets up logging and turns the outcome
//! of [`run`] into an exit code; each subcommand lives in its own module.

mod bench;
mod dlq;
mod serve;
mod system;
mod up;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::str::FromStr;

use clap::{Parser, Subcommand};
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::prelude::*;

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
    /// Measure the system: throughput and latency against its ceilings.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(error) = init_logging(&cli.log) {
        eprintln!("herald: {error}");
        return ExitCode::from(2);
    }

    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("herald: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
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
        // Interrupted, the bench still stops the system it started.
        Command::Bench(command) => tokio::select! {
            outcome = bench::run(command) => outcome,
            _ = system::shutdown_signal() => anyhow::bail!("interrupted"),
        },
    }
}

/// Logs go to stderr, filtered by `filter`; stdout is kept for the lines
/// meant for people.
fn init_logging(filter: &str) -> Result<(), String> {
    let invalid =
        |why: String| format!("invalid --log filter {filter:?}: {why}");
    // A bare word is a level, never a target: `infoo` is a typo, and
    // taking it as a target would silently turn every log off.
    for directive in filter.split(',').map(str::trim) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        LevelFilter::from_str(level).map_err(|_| {
            invalid(format!(
                "{level:?} is not a level (trace, debug, info, warn, error, off)"
            ))
        })?;
    }
    let mut targets =
        Targets::from_str(filter).map_err(|e| invalid(e.to_string()))?;
    // lapin logs each message RabbitMQ returns as unroutable whole,
    // headers and payload, which hold personal data; herald reports the
    // failure itself, by event id.
    if !filter.contains("lapin::returned_messages") {
        targets =
            targets.with_target("lapin::returned_messages", LevelFilter::OFF);
    }
    tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(std::io::stderr().is_terminal())
                .with_filter(targets),
        )
        .init();
    Ok(())
}
