//! `herald bench`: measurements anyone can rerun.
//!
//! `bench register` drives unique registrations over HTTP, either at a
//! fixed rate (open loop: each request is timed from when it was due, so a
//! slow server cannot hide its queueing) or at saturation (a fixed number
//! of requests always in flight). It reports HTTP latency, the latency from
//! registration to the email file appearing, `/healthz` latency during the
//! load, and, measured in the same run, the Argon2 ceiling: how many hashes
//! per second this machine manages on all its cores.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use users::domain::Password;
use users::password::Hasher;

#[path = "bench_bus.rs"]
mod bus;

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Registrations over HTTP, and the emails they cause.
    Register(RegisterArgs),
    /// Events through the bus, embedded or RabbitMQ: published, received,
    /// acknowledged.
    Bus(BusArgs),
}

#[derive(Debug, Args)]
pub struct BusArgs {
    /// Events to publish and consume.
    #[arg(long, default_value_t = 20_000,
          value_parser = clap::value_parser!(u64).range(1..=100_000_000))]
    events: u64,

    /// Payload size in bytes: a JSON string, so at least 2.
    #[arg(long, default_value_t = 200,
          value_parser = clap::value_parser!(u64).range(2..=1_048_576))]
    size: u64,

    /// Concurrent publishers.
    #[arg(long, default_value_t = 4,
          value_parser = clap::value_parser!(u64).range(1..=4096))]
    publishers: u64,

    /// Handlers run at once by the consuming worker.
    #[arg(long, default_value_t = 64,
          value_parser = clap::value_parser!(u64).range(1..=65_535))]
    concurrency: u64,

    /// `embedded`, or a RabbitMQ URL: then raw lapin doing the same work
    /// on the same broker is measured too, as the ceiling.
    #[arg(
        long,
        env = "HERALD_BROKER",
        default_value = "embedded",
        hide_env_values = true
    )]
    broker: String,

    /// Also run herald with its logs, spans and metrics switched off, to
    /// measure what the instrumentation costs (embedded bus only).
    #[arg(long)]
    compare_instrumentation: bool,

    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

/// A progress bar on stderr, drawn only when stderr is a terminal, so
/// that logs and piped output stay clean.
pub(crate) fn progress(total: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:>18} [{bar:40}] {pos}/{len} ({per_sec}, {eta} left)",
    )
    .expect("the template is valid")
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(what.to_owned());
    bar
}

/// Moves `bar` to `position(&state)` ten times a second until aborted.
pub(crate) fn tick<S: Send + Sync + 'static>(
    bar: indicatif::ProgressBar,
    state: S,
    position: impl Fn(&S) -> u64 + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            bar.set_position(position(&state));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The highest `--rate` accepted: far beyond what Argon2 allows here.
const MAX_RATE: f64 = 10_000.0;

/// Requests the open loop keeps in flight at most; beyond that the target
/// is saturated and further requests would only queue in this process.
const MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// Base URL of a running users service; give it again for each
    /// replica, and requests go to them in turn. Without it, the bench
    /// starts `herald up` on a fresh data directory and stops it after.
    #[arg(long)]
    target: Vec<String>,

    /// The Maildir (`new/` inside it) of the target's mailer, to measure
    /// register-to-email latency. Known when the bench starts the system.
    #[arg(long)]
    mail_dir: Option<PathBuf>,

    /// Registrations per second, sent open loop. Without it the bench
    /// saturates the service with `--concurrency` requests in flight.
    #[arg(long)]
    rate: Option<f64>,

    /// Requests in flight at saturation.
    #[arg(long, default_value_t = 8,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    concurrency: u64,

    /// Seconds of load.
    #[arg(long, default_value_t = 10,
          value_parser = clap::value_parser!(u64).range(1..=3_600))]
    duration_secs: u64,

    /// Seconds spent measuring the Argon2 ceiling; 0 skips it.
    #[arg(long, default_value_t = 5)]
    ceiling_secs: u64,

    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::Register(args) => register(args).await,
        BenchCommand::Bus(args) => bus::run(args).await,
    }
}

async fn register(args: RegisterArgs) -> anyhow::Result<()> {
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate <= MAX_RATE) {
            bail!(
                "--rate must be above 0 and at most {MAX_RATE} registrations \
                 per second"
            );
        }
        if rate * (args.duration_secs as f64) < 1.0 {
            bail!("--rate {rate} for {}s sends no request", args.duration_secs);
        }
    }
    let concurrency = args.concurrency as usize;
    // The system under test: given, or started here.
    let (system, bases, mail_dir) = if args.target.is_empty() {
        let system = System::start()?;
        let bases = vec![system.base.clone()];
        let mail = system.data.path().join("mail");
        (Some(system), bases, Some(mail))
    } else {
        let bases = args.target.iter();
        let bases = bases.map(|url| url.trim_end_matches('/').to_owned());
        (None, bases.collect(), args.mail_dir.clone())
    };
    // A Maildir that is not there would only be found missing after the
    // load: say so now.
    if let Some(dir) = &mail_dir
        && !dir.join("new").is_dir()
    {
        bail!(
            "--mail-dir {} has no new/ folder: give the Maildir the target's \
             mailer writes to",
            dir.display()
        );
    }
    let base = bases[0].clone();
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(concurrency.max(64))
        .build()?;
    let run_id = format!("{:06x}", fastrand::u32(..0xff_ffff));
    let load = Load {
        client: client.clone(),
        bases: Arc::new(bases),
        run_id,
    };

    // Warm up: the first registration opens connections and pages.
    for i in 0..4 {
        load.register(u64::MAX - i).await?;
    }

    let ceiling = if args.ceiling_secs > 0 {
        eprintln!("measuring the Argon2 ceiling for {}s", args.ceiling_secs);
        Some(argon2_ceiling(Duration::from_secs(args.ceiling_secs)).await?)
    } else {
        None
    };

    let duration = Duration::from_secs(args.duration_secs);
    let mode = match args.rate {
        Some(rate) => format!("open loop at {rate}/s"),
        None => format!("saturation, {concurrency} in flight"),
    };
    eprintln!("driving registrations for {}s ({mode})", args.duration_secs);
    let prober = tokio::spawn(probe_health(client, base.clone(), duration));
    let clock = progress(args.duration_secs, "seconds of load");
    let ticking = tick(clock.clone(), Instant::now(), |started: &Instant| {
        started.elapsed().as_secs()
    });
    let outcome = match args.rate {
        Some(rate) => load.open_loop(rate, duration).await,
        None => load.saturate(concurrency, duration).await,
    };
    ticking.abort();
    clock.finish_and_clear();
    let health = prober.await?;

    // Emails: wait for every accepted registration's, then time them by
    // the moment each file was written.
    let emails = match &mail_dir {
        Some(dir) => Some(
            email_latencies(
                &dir.join("new"),
                &outcome.sent,
                Duration::from_secs(30),
            )
            .await?,
        ),
        None => None,
    };
    let peak_rss_kib = system.as_ref().and_then(|s| s.peak_rss_kib());
    drop(system);

    let mut report = report(
        &mode,
        &outcome,
        ceiling,
        &health,
        emails.as_ref(),
        peak_rss_kib,
    );
    // At a fixed rate, throughput is the rate asked for: only saturation
    // says anything against the ceiling.
    if args.rate.is_some() {
        report["ratio_to_ceiling"] = Value::Null;
    }
    report["settings"] = json!({
        "rate": args.rate,
        "concurrency": args.rate.is_none().then_some(args.concurrency),
        "duration_secs": args.duration_secs,
        "targets": if args.target.is_empty() {
            json!(null)
        } else {
            json!(args.target)
        },
    });
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

/// `herald up` started from this executable on a fresh data directory.
struct System {
    child: Child,
    base: String,
    data: tempfile::TempDir,
}

impl System {
    fn start() -> anyhow::Result<Self> {
        let data = tempfile::tempdir()?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(data.path())
            .env("HERALD_LOG", "warn")
            .stdout(Stdio::piped())
            .spawn()
            .context("starting herald up")?;
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            let Some(line) = lines.next() else {
                bail!("herald up exited before printing its address");
            };
            if let Some(rest) = line?.strip_prefix("users") {
                break rest.split_whitespace().next().unwrap_or("").to_owned();
            }
        };
        std::thread::spawn(move || lines.for_each(drop));
        Ok(System { child, base, data })
    }

    /// The most memory the process has held resident, from /proc.
    fn peak_rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!(
            "/proc/{}/status",
            self.child.id()
        ))
        .ok()?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
}

impl Drop for System {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends registrations of unique users, to each replica in turn.
#[derive(Clone)]
struct Load {
    client: reqwest::Client,
    bases: Arc<Vec<String>>,
    run_id: String,
}

/// What a load phase saw.
#[derive(Default)]
struct Outcome {
    http: Option<Histogram<u64>>,
    accepted: u64,
    refused: u64,
    failed: u64,
    elapsed: Duration,
    /// Address of every accepted registration, with when it was sent.
    sent: HashMap<String, SystemTime>,
}

impl Outcome {
    fn record(&mut self, result: Attempt) {
        let http = self.http.get_or_insert_with(new_histogram);
        http.saturating_record(result.latency.as_micros() as u64);
        match result.status {
            Some(201) => {
                self.accepted += 1;
                self.sent.insert(result.address, result.sent_at);
            }
            Some(_) => self.refused += 1,
            None => self.failed += 1,
        }
    }
}

struct Attempt {
    status: Option<u16>,
    latency: Duration,
    address: String,
    sent_at: SystemTime,
}

impl Load {
    fn address(&self, n: u64) -> String {
        format!("bench-{}-{n}@example.com", self.run_id)
    }

    /// The registration URL of the replica whose turn request `n` is.
    fn url(&self, n: u64) -> String {
        let base = &self.bases[(n % self.bases.len() as u64) as usize];
        format!("{base}/user/register")
    }

    /// One registration that must succeed, with a clear error if not.
    async fn register(&self, n: u64) -> anyhow::Result<()> {
        let url = self.url(n);
        let response = self
            .client
            .post(&url)
            .json(&self.body(n))
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = response.status();
        if status != reqwest::StatusCode::CREATED {
            let body = response.text().await.unwrap_or_default();
            bail!("{url} answered {status} to a valid registration: {body}");
        }
        Ok(())
    }

    fn body(&self, n: u64) -> Value {
        json!({
            "user_id": self.address(n),
            "user_name": format!("Bench {n}"),
            "user_password": "correct horse battery staple",
        })
    }

    /// One registration, timed from `due`.
    async fn attempt(&self, n: u64, due: Instant) -> Attempt {
        let address = self.address(n);
        let sent_at = SystemTime::now();
        let response = self
            .client
            .post(self.url(n))
            .json(&self.body(n))
            .send()
            .await;
        let status = response.ok().map(|r| r.status().as_u16());
        Attempt {
            status,
            latency: due.elapsed(),
            address,
            sent_at,
        }
    }

    async fn open_loop(&self, rate: f64, duration: Duration) -> Outcome {
        let period = Duration::from_secs_f64(1.0 / rate);
        let total = (rate * duration.as_secs_f64()).round() as u64;
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        let mut outcome = Outcome::default();
        for n in 0..total {
            let due = start + period.mul_f64(n as f64);
            tokio::time::sleep_until(due.into()).await;
            // A target that cannot keep up makes requests pile up here;
            // past the bound, wait (the wait counts in their latency).
            while tasks.len() >= MAX_IN_FLIGHT {
                if let Some(done) = tasks.join_next().await {
                    outcome.record(done.expect("a request task never panics"));
                }
            }
            let load = self.clone();
            tasks.spawn(async move { load.attempt(n, due).await });
        }
        while let Some(result) = tasks.join_next().await {
            outcome.record(result.expect("a request task never panics"));
        }
        outcome.elapsed = start.elapsed();
        outcome
    }

    async fn saturate(
        &self,
        concurrency: usize,
        duration: Duration,
    ) -> Outcome {
        let start = Instant::now();
        let deadline = start + duration;
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut workers = tokio::task::JoinSet::new();
        for _ in 0..concurrency.max(1) {
            let load = self.clone();
            let next = next.clone();
            workers.spawn(async move {
                let mut attempts = Vec::new();
                while Instant::now() < deadline {
                    let n =
                        next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    attempts.push(load.attempt(n, Instant::now()).await);
                }
                attempts
            });
        }
        let mut outcome = Outcome::default();
        while let Some(attempts) = workers.join_next().await {
            for attempt in attempts.expect("a worker never panics") {
                outcome.record(attempt);
            }
        }
        outcome.elapsed = start.elapsed();
        outcome
    }
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds, from 1 µs to an hour, three significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// Hashes per second on every core at once, through the same hashing
/// pool and parameters the users service uses.
async fn argon2_ceiling(duration: Duration) -> anyhow::Result<f64> {
    let hasher = Hasher::per_core();
    let password =
        Password::parse("correct horse battery staple").expect("valid");
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    // Twice as many requests in flight as threads keeps every thread busy.
    for _ in 0..hasher.threads() * 2 {
        let (hasher, password) = (hasher.clone(), password.clone());
        workers.spawn(async move {
            let mut hashes = 0u64;
            while start.elapsed() < duration {
                hasher.hash(password.clone()).await?;
                hashes += 1;
            }
            anyhow::Ok(hashes)
        });
    }
    let mut total = 0;
    while let Some(hashes) = workers.join_next().await {
        total += hashes??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// GET /healthz every 20 ms for `duration`; latency per probe.
async fn probe_health(
    client: reqwest::Client,
    base: String,
    duration: Duration,
) -> Histogram<u64> {
    let mut histogram = new_histogram();
    let deadline = Instant::now() + duration;
    let mut ticks = tokio::time::interval(Duration::from_millis(20));
    while Instant::now() < deadline {
        ticks.tick().await;
        let started = Instant::now();
        let ok = client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ok {
            histogram.saturating_record(started.elapsed().as_micros() as u64);
        }
    }
    histogram
}

/// Register-to-email latencies: for each accepted registration, the time
/// from sending it to its email file being written (the file's mtime).
struct Emails {
    latency: Histogram<u64>,
    found: u64,
    missing: u64,
}

async fn email_latencies(
    new: &Path,
    sent: &HashMap<String, SystemTime>,
    limit: Duration,
) -> anyhow::Result<Emails> {
    let deadline = Instant::now() + limit;
    let mut written: HashMap<String, SystemTime> = HashMap::new();
    let mut seen_files = std::collections::HashSet::new();
    loop {
        for entry in std::fs::read_dir(new)
            .with_context(|| format!("reading {}", new.display()))?
        {
            let entry = entry?;
            if !seen_files.insert(entry.file_name()) {
                continue;
            }
            let modified = entry.metadata()?.modified()?;
            if let Some(address) = recipient(&entry.path())? {
                written.insert(address, modified);
            }
        }
        let found = sent.keys().filter(|a| written.contains_key(*a)).count();
        if found == sent.len() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut latency = new_histogram();
    let mut found = 0;
    for (address, sent_at) in sent {
        if let Some(at) = written.get(address) {
            let took = at.duration_since(*sent_at).unwrap_or_default();
            latency.saturating_record(took.as_micros() as u64);
            found += 1;
        }
    }
    Ok(Emails {
        latency,
        found,
        missing: sent.len() as u64 - found,
    })
}

/// The address in an email's `To:` header (`Name <address>`).
fn recipient(path: &Path) -> anyhow::Result<Option<String>> {
    let text = std::fs::read_to_string(path)?;
    let to = text
        .lines()
        .take_while(|l| !l.is_empty())
        .find_map(|l| l.strip_prefix("To: "));
    Ok(to.and_then(|to| {
        let start = to.rfind('<')? + 1;
        let end = to.rfind('>')?;
        Some(to[start..end].to_owned())
    }))
}

fn millis(histogram: &Histogram<u64>, quantile: f64) -> f64 {
    histogram.value_at_quantile(quantile) as f64 / 1000.0
}

fn summary(histogram: &Histogram<u64>) -> Value {
    json!({
        "count": histogram.len(),
        "p50_ms": millis(histogram, 0.50),
        "p90_ms": millis(histogram, 0.90),
        "p99_ms": millis(histogram, 0.99),
        "max_ms": histogram.max() as f64 / 1000.0,
    })
}

fn report(
    mode: &str,
    outcome: &Outcome,
    ceiling: Option<f64>,
    health: &Histogram<u64>,
    emails: Option<&Emails>,
    peak_rss_kib: Option<u64>,
) -> Value {
    let throughput = outcome.accepted as f64 / outcome.elapsed.as_secs_f64();
    json!({
        "mode": mode,
        "registrations": {
            "accepted": outcome.accepted,
            "refused": outcome.refused,
            "failed": outcome.failed,
            "per_second": throughput,
            "http": outcome.http.as_ref().map(summary),
        },
        "argon2_ceiling_per_second": ceiling,
        "ratio_to_ceiling": ceiling.map(|c| throughput / c),
        "register_to_email": emails.map(|e| json!({
            "found": e.found,
            "missing": e.missing,
            // No email found, no latency: not a row of zeros.
            "latency": (e.found > 0).then(|| summary(&e.latency)),
        })),
        "healthz_during_load": summary(health),
        "system_peak_rss_mib": peak_rss_kib.map(|k| k as f64 / 1024.0),
    })
}

fn print_table(report: &Value) {
    let line = |name: &str, s: &Value| {
        println!(
            "{name:<22} {:>8} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
            s["count"].as_u64().unwrap_or(0),
            s["p50_ms"].as_f64().unwrap_or(0.0),
            s["p90_ms"].as_f64().unwrap_or(0.0),
            s["p99_ms"].as_f64().unwrap_or(0.0),
            s["max_ms"].as_f64().unwrap_or(0.0),
        );
    };
    let r = &report["registrations"];
    println!("mode: {}", report["mode"].as_str().unwrap_or(""));
    println!(
        "registrations: {} accepted, {} refused, {} failed; {:.1}/s",
        r["accepted"],
        r["refused"],
        r["failed"],
        r["per_second"].as_f64().unwrap_or(0.0)
    );
    if let Some(ceiling) = report["argon2_ceiling_per_second"].as_f64() {
        match report["ratio_to_ceiling"].as_f64() {
            Some(ratio) => println!(
                "argon2 ceiling: {ceiling:.1} hashes/s; \
                 registrations/ceiling = {ratio:.2}"
            ),
            None => println!("argon2 ceiling: {ceiling:.1} hashes/s"),
        }
    }
    println!();
    println!(
        "{:<22} {:>8} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "p50", "p90", "p99", "max"
    );
    line("register (HTTP)", &r["http"]);
    if let Some(emails) = report["register_to_email"].as_object()
        && !emails["latency"].is_null()
    {
        // From sending the request to the email file's modification time.
        line("register -> email", &emails["latency"]);
    }
    line("healthz during load", &report["healthz_during_load"]);
    if let Some(emails) = report["register_to_email"].as_object() {
        println!(
            "\nemails: {} of {} accepted found, {} missing",
            emails["found"], r["accepted"], emails["missing"]
        );
    }
    println!(
        "\nregister -> email runs from sending the request to the email \
         file being written;\nHTTP latency runs from when the request was \
         due (open loop) or sent."
    );
    if let Some(rss) = report["system_peak_rss_mib"].as_f64() {
        println!("herald up peak resident memory: {rss:.1} MiB");
    }
}
