//! `herald stats`: what the running services say about themselves.
//!
//! It reads `/metrics` from each URL given (replicas of one service add
//! up) and prints, for each service and each event type, how many pieces
//! of work it saw, their latency (mean, p50, p90, p99, max) and the
//! throughput over the last window. A service's work is the HTTP requests
//! it served and the event deliveries it handled; an event type's latency
//! is its end-to-end latency, from the event's time to its handling.
//!
//! Then the system's own model of itself: over its S services, the mean
//! latency D = (1/S) Σ D_i and the mean throughput T = (1/S) Σ T_i; the
//! same over its E event types. A service or event type that has done no
//! work yet has no latency, and is left out of D (not out of T).
//!
//! Latencies are counted since each process started, and percentiles are
//! estimated from the histogram buckets (exact to within a bucket).
//! Throughput needs two readings: the window between them is `--window`,
//! or with `--watch` the time between refreshes.

mod exposition;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use herald::metrics::{
    EVENT_LATENCY, EVENT_LATENCY_MAX, HANDLER_DURATION, HTTP_DURATION,
    SERVICE_LATENCY_MAX,
};
use serde_json::{Value, json};

use exposition::{Group, Sample};

#[derive(Debug, Args)]
pub struct StatsArgs {
    /// A service's metrics URL; give it once per process. `HOST:PORT` is
    /// enough: a URL without a scheme gets http://, one without a path
    /// gets /metrics.
    #[arg(long = "url", default_value = "http://127.0.0.1:5000/metrics")]
    urls: Vec<String>,

    /// Refresh every SECS seconds, in place, until interrupted; the
    /// throughput is then over each refresh's window.
    #[arg(long, value_name = "SECS")]
    watch: Option<f64>,

    /// Without --watch: the window, in seconds, the throughput is
    /// measured over, between two readings.
    #[arg(long, value_name = "SECS", default_value_t = 2.0)]
    window: f64,

    /// Print JSON: one object, or one line per refresh with --watch.
    #[arg(long)]
    json: bool,
}

/// How long one service may take to answer a scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest and the longest window accepted, in seconds.
const WINDOW_LIMITS: (f64, f64) = (0.1, 86_400.0);

/// The label each sample gets naming the URL it was read from, so that
/// the replicas of a service add up rather than overwrite each other.
const SOURCE: &str = "\0source";

pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let window = match args.watch {
        Some(every) => checked_window("--watch", every)?,
        None => checked_window("--window", args.window)?,
    };
    let urls = args
        .urls
        .iter()
        .map(|url| metrics_url(url))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = reqwest::Client::builder()
        .timeout(SCRAPE_TIMEOUT)
        .build()
        .context("cannot build an HTTP client")?;

    // Once, every URL must answer; watching, a URL that does not (a
    // replica restarting) is shown as down and read again next time.
    let watching = args.watch.is_some();
    let mut before = scrape_all(&client, &urls).await;
    if !watching && let Some((url, why)) = before.down.first() {
        bail!("cannot read metrics from {url}: {why}");
    }
    let mut clear = false;
    loop {
        tokio::time::sleep(window).await;
        let now = scrape_all(&client, &urls).await;
        if !watching && let Some((url, why)) = now.down.first() {
            bail!("cannot read metrics from {url}: {why}");
        }
        let report = Report::between(&before, &now);
        let text = if args.json {
            format!("{}\n", report.to_json())
        } else {
            // Refreshing in place: clear the terminal and draw again.
            let clear_screen = clear && std::io::stdout().is_terminal();
            let prefix = if clear_screen { "\x1b[2J\x1b[H" } else { "" };
            format!("{prefix}{}", report.to_text(&urls))
        };
        if !print(&text)? || !watching {
            return Ok(());
        }
        (before, clear) = (now, true);
    }
}

/// Writes `text` to stdout; `false` when whoever read it is gone (a
/// closed pipe, as after `| head`), which ends the command quietly.
fn print(text: &str) -> anyhow::Result<bool> {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Ok(()) => Ok(true),
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => {
            Ok(false)
        }
        Err(error) => Err(error).context("cannot write to stdout"),
    }
}

/// `seconds` as a window, when it is one `herald stats` can keep.
fn checked_window(flag: &str, seconds: f64) -> anyhow::Result<Duration> {
    let (shortest, longest) = WINDOW_LIMITS;
    if !(shortest..=longest).contains(&seconds) {
        bail!(
            "{flag} must be between {shortest} and {longest} seconds, \
             not {seconds}"
        );
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// The metrics URL `given` stands for: `http://` is added when it has no
/// scheme, `/metrics` when it has no path, and a bare port is a port on
/// this machine: `5001`, `127.0.0.1:5001` and
/// `http://127.0.0.1:5001/metrics` are the same URL.
fn metrics_url(given: &str) -> anyhow::Result<String> {
    let trimmed = given.trim();
    let bare_port = trimmed.trim_start_matches(':');
    let url = if !bare_port.is_empty()
        && bare_port.bytes().all(|b| b.is_ascii_digit())
    {
        format!("http://127.0.0.1:{bare_port}")
    } else if trimmed.contains("://") {
        trimmed.to_owned()
    } else {
        format!("http://{trimmed}")
    };
    let shown = herald::redact_credentials(given);
    let invalid = |why: &str| anyhow::anyhow!("invalid --url {shown:?}: {why}");
    let mut parsed =
        reqwest::Url::parse(&url).map_err(|e| invalid(&e.to_string()))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(invalid("use http:// or https://"));
    }
    let (_, after_scheme) = url.split_once("://").unwrap_or_default();
    if after_scheme.starts_with('/') || parsed.host_str().is_none() {
        return Err(invalid("it names no host"));
    }
    if parsed.path() == "/" {
        parsed.set_path("/metrics");
    }
    Ok(parsed.to_string())
}

/// One reading of every URL.
struct Scrape {
    /// Every sample read, each labelled with its [`SOURCE`].
    samples: Vec<Sample>,
    /// The URLs that could not be read, with why.
    down: Vec<(String, String)>,
    at: Instant,
}

async fn scrape_all(client: &reqwest::Client, urls: &[String]) -> Scrape {
    let mut scrape = Scrape {
        samples: Vec::new(),
        down: Vec::new(),
        at: Instant::now(),
    };
    for (source, url) in urls.iter().enumerate() {
        let shown = herald::redact_credentials(url);
        match scrape_one(client, url).await {
            Ok(samples) => {
                scrape.samples.extend(samples.into_iter().map(|mut s| {
                    s.labels.insert(SOURCE.to_owned(), source.to_string());
                    s
                }));
            }
            Err(why) => scrape.down.push((shown, why)),
        }
    }
    scrape.at = Instant::now();
    scrape
}

/// The samples `url` serves, or why it could not be read.
async fn scrape_one(
    client: &reqwest::Client,
    url: &str,
) -> Result<Vec<Sample>, String> {
    let response = client
        .get(url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| herald::error_chain(&e))?;
    let text = response.text().await.map_err(|e| herald::error_chain(&e))?;
    exposition::parse(&text).map_err(|why| format!("not metrics: {why}"))
}

/// The latency and throughput of one service or event type.
#[derive(Debug, Clone, PartialEq)]
struct Line {
    name: String,
    count: u64,
    mean: Option<f64>,
    p50: Option<f64>,
    p90: Option<f64>,
    p99: Option<f64>,
    max: Option<f64>,
    /// Per second, over the window.
    throughput: f64,
}

impl Line {
    fn new(
        name: &str,
        now: &Group,
        before: Option<&Group>,
        max: Option<f64>,
        window: f64,
    ) -> Self {
        // The work done in the window, process by process. A count that
        // fell means the process restarted in the window: all it counted
        // since is new.
        let done: f64 = now
            .counts
            .iter()
            .map(|(source, &count)| {
                let earlier = before
                    .and_then(|b| b.counts.get(source))
                    .copied()
                    .unwrap_or(0.0);
                if count >= earlier {
                    count - earlier
                } else {
                    count
                }
            })
            .sum();
        let now = &now.histogram;
        Line {
            name: name.to_owned(),
            count: now.count as u64,
            mean: now.mean(),
            p50: now.quantile(0.50, max),
            p90: now.quantile(0.90, max),
            p99: now.quantile(0.99, max),
            max: max.filter(|_| now.count > 0.0),
            throughput: done / window,
        }
    }

    fn to_json(&self, key: &str) -> Value {
        json!({
            key: self.name,
            "count": self.count,
            "mean_seconds": self.mean,
            "p50_seconds": self.p50,
            "p90_seconds": self.p90,
            "p99_seconds": self.p99,
            "max_seconds": self.max,
            "throughput_per_second": self.throughput,
        })
    }
}

/// The system's model of itself over a set of lines: the mean of their
/// mean latencies, D, and the mean of their throughputs, T.
#[derive(Debug, Clone, Copy, PartialEq)]
struct System {
    /// How many lines (services or event types) there are.
    members: usize,
    latency: Option<f64>,
    throughput: f64,
}

impl System {
    fn over(lines: &[Line]) -> Self {
        let latencies: Vec<f64> = lines.iter().filter_map(|l| l.mean).collect();
        let latency = (!latencies.is_empty())
            .then(|| latencies.iter().sum::<f64>() / latencies.len() as f64);
        let throughput = if lines.is_empty() {
            0.0
        } else {
            lines.iter().map(|l| l.throughput).sum::<f64>() / lines.len() as f64
        };
        System {
            members: lines.len(),
            latency,
            throughput,
        }
    }
}

/// What `herald stats` prints for one window.
struct Report {
    window: f64,
    /// The URLs that could not be read this time, with why.
    down: Vec<(String, String)>,
    services: Vec<Line>,
    events: Vec<Line>,
}

impl Report {
    fn between(before: &Scrape, now: &Scrape) -> Self {
        let window = (now.at - before.at).as_secs_f64();
        let lines = |groups: BTreeMap<String, Group>,
                     earlier: BTreeMap<String, Group>,
                     maxes: BTreeMap<String, f64>| {
            groups
                .iter()
                .map(|(name, histogram)| {
                    let max = maxes.get(name).copied();
                    Line::new(name, histogram, earlier.get(name), max, window)
                })
                .collect::<Vec<_>>()
        };
        Report {
            window,
            down: now.down.clone(),
            services: lines(
                service_work(&now.samples),
                service_work(&before.samples),
                exposition::max_by(
                    &now.samples,
                    SERVICE_LATENCY_MAX,
                    "service",
                ),
            ),
            events: lines(
                event_latency(&now.samples),
                event_latency(&before.samples),
                exposition::max_by(&now.samples, EVENT_LATENCY_MAX, "type"),
            ),
        }
    }

    fn to_json(&self) -> Value {
        let system = |lines: &[Line], members: &str| {
            let system = System::over(lines);
            json!({
                members: system.members,
                "latency_seconds": system.latency,
                "throughput_per_second": system.throughput,
            })
        };
        json!({
            "window_seconds": self.window,
            "down": self.down.iter()
                .map(|(url, why)| json!({"url": url, "error": why}))
                .collect::<Vec<_>>(),
            "services": self.services.iter()
                .map(|l| l.to_json("service")).collect::<Vec<_>>(),
            "events": self.events.iter()
                .map(|l| l.to_json("type")).collect::<Vec<_>>(),
            "system": system(&self.services, "services"),
            "event_system": system(&self.events, "event_types"),
        })
    }

    fn to_text(&self, urls: &[String]) -> String {
        let mut text = String::new();
        let sources: Vec<String> =
            urls.iter().map(|u| herald::redact_credentials(u)).collect();
        let _ = writeln!(
            text,
            "herald stats: {} (throughput over the last {:.1} s)\n",
            sources.join(", "),
            self.window
        );
        for (url, why) in &self.down {
            let _ = writeln!(text, "down: {url}: {why}");
        }
        if !self.down.is_empty() {
            text.push('\n');
        }
        table(&mut text, "service", &self.services);
        text.push('\n');
        table(&mut text, "event type", &self.events);
        text.push('\n');
        let services = System::over(&self.services);
        let events = System::over(&self.events);
        system_line(&mut text, ["service", "services"], &services);
        system_line(&mut text, ["event type", "event types"], &events);
        text
    }
}

/// Each service's work: the HTTP requests it served and the handler runs
/// of the events it handled, in one histogram per service.
fn service_work(samples: &[Sample]) -> BTreeMap<String, Group> {
    let by_service =
        |family| exposition::histograms_by(samples, family, "service", SOURCE);
    let mut work = by_service(HTTP_DURATION);
    for (service, group) in by_service(HANDLER_DURATION) {
        work.entry(service).or_default().merge(&group);
    }
    work
}

/// Each event type's end-to-end latency, over every service handling it.
fn event_latency(samples: &[Sample]) -> BTreeMap<String, Group> {
    exposition::histograms_by(samples, EVENT_LATENCY, "type", SOURCE)
}

fn table(text: &mut String, heading: &str, lines: &[Line]) {
    let width = lines
        .iter()
        .map(|l| l.name.chars().count())
        .chain([heading.len()])
        .max()
        .unwrap_or_default();
    let _ = writeln!(
        text,
        "{heading:<width$}  {:>8}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>10}",
        "count", "mean", "p50", "p90", "p99", "max", "per second"
    );
    if lines.is_empty() {
        let _ = writeln!(text, "(none yet)");
    }
    for line in lines {
        let _ = writeln!(
            text,
            "{:<width$}  {:>8}  {:>9}  {:>9}  {:>9}  {:>9}  {:>9}  {:>10.1}",
            line.name,
            line.count,
            millis(line.mean),
            millis(line.p50),
            millis(line.p90),
            millis(line.p99),
            millis(line.max),
            line.throughput,
        );
    }
}

/// The D and T line over `system`'s members, named in the singular or
/// the plural of `what`.
fn system_line(text: &mut String, what: [&str; 2], system: &System) {
    let what = what[usize::from(system.members != 1)];
    let _ = writeln!(
        text,
        "system over {} {what}: D = {}  T = {:.1}/s",
        system.members,
        millis(system.latency).trim(),
        system.throughput
    );
}

/// A latency in milliseconds, or `-` when there is none.
fn millis(seconds: Option<f64>) -> String {
    match seconds {
        Some(seconds) => format!("{:.2} ms", seconds * 1000.0),
        None => "-".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_without_a_path_gets_the_metrics_path() {
        let url = |given| metrics_url(given).unwrap();
        assert_eq!(
            url("http://127.0.0.1:5000"),
            "http://127.0.0.1:5000/metrics"
        );
        assert_eq!(url("http://h:1/m"), "http://h:1/m");
        assert_eq!(url("h:1"), "http://h:1/metrics");
        assert_eq!(url("5001"), "http://127.0.0.1:5001/metrics");
        assert_eq!(url(":5001"), "http://127.0.0.1:5001/metrics");
    }

    #[test]
    fn a_url_without_a_host_is_refused() {
        for bad in ["", "http://", "ftp://h:1", "http:///metrics"] {
            assert!(metrics_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_system_means_leave_out_latencies_of_idle_members_only() {
        let line = |mean, throughput| Line {
            name: String::new(),
            count: 0,
            mean,
            p50: None,
            p90: None,
            p99: None,
            max: None,
            throughput,
        };
        let lines = [line(Some(0.010), 4.0), line(Some(0.030), 2.0)];
        let system = System::over(&lines);
        assert!((system.latency.unwrap() - 0.020).abs() < 1e-12);
        assert_eq!(system.throughput, 3.0);

        let idle = [line(Some(0.010), 4.0), line(None, 0.0)];
        let system = System::over(&idle);
        assert_eq!(system.latency, Some(0.010));
        assert_eq!(system.throughput, 2.0);
    }
}
