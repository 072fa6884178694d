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

use exposition::{Histogram, Sample};

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

pub async fn run(args: StatsArgs) -> anyhow::Result<()> {
    let window = args.watch.unwrap_or(args.window);
    if !(window.is_finite() && window > 0.0 && window <= 86_400.0) {
        bail!("the window must be between 0 and 86400 seconds, not {window}");
    }
    let window = Duration::from_secs_f64(window);
    let urls: Vec<String> = args.urls.iter().map(|u| metrics_url(u)).collect();
    let client = reqwest::Client::builder()
        .timeout(SCRAPE_TIMEOUT)
        .build()
        .context("cannot build an HTTP client")?;

    let mut before = scrape_all(&client, &urls).await?;
    let mut clear = false;
    loop {
        tokio::time::sleep(window).await;
        let now = scrape_all(&client, &urls).await?;
        let report = Report::between(&before, &now);
        if args.json {
            println!("{}", report.to_json());
        } else {
            // Refreshing in place: clear the terminal and draw again.
            if clear && std::io::stdout().is_terminal() {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", report.to_text(&urls));
        }
        if args.watch.is_none() {
            return Ok(());
        }
        (before, clear) = (now, true);
    }
}

/// `url` with `http://` added when it has no scheme, and `/metrics` when
/// it has no path: `127.0.0.1:5001` is a fine `--url`.
fn metrics_url(url: &str) -> String {
    let url = if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    };
    let (_, after_scheme) = url.split_once("://").unwrap_or_default();
    if after_scheme.contains('/') {
        url
    } else {
        format!("{url}/metrics")
    }
}

/// One reading of every URL.
struct Scrape {
    samples: Vec<Sample>,
    at: Instant,
}

async fn scrape_all(
    client: &reqwest::Client,
    urls: &[String],
) -> anyhow::Result<Scrape> {
    let mut samples = Vec::new();
    for url in urls {
        let shown = herald::redact_credentials(url);
        let response = client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .with_context(|| format!("cannot read metrics from {shown}"))?;
        let text = response
            .text()
            .await
            .with_context(|| format!("cannot read metrics from {shown}"))?;
        let parsed = exposition::parse(&text).map_err(|why| {
            anyhow::anyhow!("{shown} did not answer with metrics: {why}")
        })?;
        samples.extend(parsed);
    }
    Ok(Scrape {
        samples,
        at: Instant::now(),
    })
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
        now: &Histogram,
        before: Option<&Histogram>,
        max: Option<f64>,
        window: f64,
    ) -> Self {
        // A count that fell means the process restarted in the window:
        // all it counted since is new.
        let earlier = before.map_or(0.0, |h| h.count);
        let done = if now.count >= earlier {
            now.count - earlier
        } else {
            now.count
        };
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
    services: Vec<Line>,
    events: Vec<Line>,
}

impl Report {
    fn between(before: &Scrape, now: &Scrape) -> Self {
        let window = (now.at - before.at).as_secs_f64();
        let lines = |groups: BTreeMap<String, Histogram>,
                     earlier: BTreeMap<String, Histogram>,
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
                exposition::histograms_by(&now.samples, EVENT_LATENCY, "type"),
                exposition::histograms_by(
                    &before.samples,
                    EVENT_LATENCY,
                    "type",
                ),
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
fn service_work(samples: &[Sample]) -> BTreeMap<String, Histogram> {
    let mut work = exposition::histograms_by(samples, HTTP_DURATION, "service");
    let handled =
        exposition::histograms_by(samples, HANDLER_DURATION, "service");
    for (service, histogram) in handled {
        work.entry(service).or_default().merge(&histogram);
    }
    work
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
        assert_eq!(
            metrics_url("http://127.0.0.1:5000"),
            "http://127.0.0.1:5000/metrics"
        );
        assert_eq!(metrics_url("http://h:1/m"), "http://h:1/m");
        assert_eq!(metrics_url("h:1"), "http://h:1/metrics");
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
