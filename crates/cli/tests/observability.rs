//! What the system says about itself: its metrics, `herald stats` over
//! them, and the trace ids in its logs.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use support::{Herald, WAIT, metric};

const TYPE: &str = "user.registered.v1";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str =
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn user(i: usize) -> Value {
    json!({
        "user_id": format!("metered-{i}@example.com"),
        "user_name": format!("Metered {i}"),
        "user_password": "correct horse battery",
    })
}

async fn wait_for_mail(dir: PathBuf, count: usize) {
    tokio::task::spawn_blocking(move || {
        testkit::wait_for_mail(&dir, count, WAIT)
    })
    .await
    .unwrap()
    .unwrap();
}

/// Runs `herald stats --json` against `urls` and returns its report.
fn stats(urls: &[&str], window: &str) -> Value {
    let mut command = Command::new(env!("CARGO_BIN_EXE_herald"));
    command.args(["stats", "--json", "--window", window]);
    for url in urls {
        command.args(["--url", url]);
    }
    let output = command.output().unwrap();
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).unwrap()
}

fn line<'a>(report: &'a Value, list: &str, key: &str, name: &str) -> &'a Value {
    report[list]
        .as_array()
        .unwrap()
        .iter()
        .find(|line| line[key] == name)
        .unwrap_or_else(|| panic!("no {name} in {report}"))
}

#[tokio::test]
async fn n_registrations_are_counted_exactly_n_times_where_they_should_be() {
    let data = tempfile::tempdir().unwrap();
    let herald = Herald::start(data.path(), &[]);
    const N: usize = 7;
    for i in 0..N {
        let (status, body) = herald.register(user(i)).await;
        assert_eq!(status, 201, "{body}");
    }
    // One refused registration, counted as a request and nothing else.
    let (status, _) = herald.register(json!({"user_id": "x"})).await;
    assert_eq!(status, 422);
    wait_for_mail(data.path().join("mail/new"), N).await;

    // The mail file is written before the delivery is acknowledged: wait
    // for the acknowledgement to be counted too.
    let handled = [("service", "mailer"), ("type", TYPE)];
    let success = [handled[0], handled[1], ("outcome", "success")];
    let mut text = herald.metrics().await;
    for _ in 0..100 {
        if metric(&text, "herald_events_handled_total", &success) >= N as f64 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        text = herald.metrics().await;
    }

    let n = N as f64;
    let register = [("route", "/user/register"), ("method", "POST")];
    let created = [register[0], register[1], ("status", "201")];
    let refused = [register[0], register[1], ("status", "422")];
    let expectations = [
        ("herald_http_requests_total", &created[..], n),
        (
            "herald_http_request_duration_seconds_count",
            &created[..],
            n,
        ),
        ("herald_http_requests_total", &refused[..], 1.0),
        ("herald_events_published_total", &[("type", TYPE)][..], n),
        ("herald_events_handled_total", &success[..], n),
        ("herald_events_handled_total", &handled[..], n),
        ("herald_handler_duration_seconds_count", &handled[..], n),
        ("herald_event_latency_seconds_count", &handled[..], n),
        ("herald_retries_total", &[][..], 0.0),
        ("herald_dead_letters_total", &[][..], 0.0),
    ];
    for (name, labels, expected) in expectations {
        let value = metric(&text, name, labels);
        assert_eq!(value, expected, "{name} {labels:?} in:\n{text}");
    }

    // `herald stats` reads the same numbers.
    let report = stats(&[herald.metrics_url()], "0.2");
    let mailer = line(&report, "services", "service", "mailer");
    assert_eq!(mailer["count"], N);
    let users = line(&report, "services", "service", "users");
    assert_eq!(users["count"], N + 1);
    let event = line(&report, "events", "type", TYPE);
    assert_eq!(event["count"], N);
    assert_eq!(report["system"]["services"], 2);
}

/// The JSON log lines of `logs` that carry `message`.
fn lines_saying<'a>(logs: &'a [Value], message: &str) -> Vec<&'a Value> {
    logs.iter()
        .filter(|line| line["fields"]["message"] == message)
        .collect()
}

fn json_lines(logs: &str) -> Vec<Value> {
    logs.lines()
        .map(|line| serde_json::from_str(line).expect("every line is JSON"))
        .collect()
}

#[tokio::test]
async fn a_traceparent_is_continued_by_the_mailer_and_no_secret_is_logged() {
    let data = tempfile::tempdir().unwrap();
    let mut herald =
        Herald::start_logging(data.path(), &["--log-format", "json"], "debug");
    let response = support::client()
        .post(format!("{}/user/register", herald.base()))
        .header("traceparent", TRACEPARENT)
        .json(&json!({
            "user_id": "traced@example.com",
            "user_name": "Traced",
            "user_password": "correct horse battery",
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    wait_for_mail(data.path().join("mail/new"), 1).await;
    assert!(herald.terminate().success());
    let text = herald.logs();
    let logs = json_lines(&text);

    // The request's span is a child of the caller's span, in its trace.
    let registered = lines_saying(&logs, "user registered");
    assert_eq!(registered.len(), 1, "{text}");
    let request = &registered[0]["span"];
    assert_eq!(request["trace_id"], TRACE_ID);
    assert_eq!(request["parent_id"], "00f067aa0ba902b7");
    assert!(request["event_id"].is_string());

    // The mailer's span is a child of the request's, in the same trace,
    // and names the same event.
    let sent = lines_saying(&logs, "welcome email sent");
    assert_eq!(sent.len(), 1, "{text}");
    let handling = &sent[0]["span"];
    assert_eq!(handling["name"], "handle");
    assert_eq!(handling["trace_id"], TRACE_ID);
    assert_eq!(handling["parent_id"], request["span_id"]);
    assert_eq!(handling["event_id"], request["event_id"]);

    for secret in ["correct horse", "$argon2", "traced@", "example.com"] {
        assert!(!text.contains(secret), "{secret:?} leaked into:\n{text}");
    }
}

/// Serves the texts in `pages`, one per request, the last one again and
/// again; returns its URL.
async fn serve_metrics(pages: Vec<String>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    tokio::spawn(async move {
        let mut served = 0;
        loop {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut request = [0u8; 4096];
            let _ = stream.read(&mut request).await;
            let body = &pages[served.min(pages.len() - 1)];
            served += 1;
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\
                 content-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
        }
    });
    url
}

/// A histogram in the text format, from (bound, count in that bucket).
fn histogram(
    name: &str,
    labels: &str,
    buckets: &[(&str, u64)],
    sum: f64,
) -> String {
    let mut text = String::new();
    let mut cumulative = 0;
    for (bound, count) in buckets {
        cumulative += count;
        text.push_str(&format!(
            "{name}_bucket{{{labels},le=\"{bound}\"}} {cumulative}\n"
        ));
    }
    text.push_str(&format!("{name}_sum{{{labels}}} {sum}\n"));
    text.push_str(&format!("{name}_count{{{labels}}} {cumulative}\n"));
    text
}

fn close(actual: &Value, expected: f64) {
    let actual = actual.as_f64().unwrap_or_else(|| panic!("{actual}"));
    assert!(
        (actual - expected).abs() < 1e-9,
        "{actual} is not {expected}"
    );
}

// Two threads: the metrics are served while `herald stats` is waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_on_known_metrics_gives_the_right_means_and_percentiles() {
    // The users service: 10 requests, 2 up to 10 ms, 4 in (10, 25] ms,
    // 3 in (25, 50] ms, 1 in (50, 100] ms, 300 ms in all, the longest
    // 80 ms. Split over two routes, which stats adds up.
    let users = |scale: u64| {
        histogram(
            "herald_http_request_duration_seconds",
            "service=\"users\",route=\"/user/register\",status=\"201\"",
            &[
                ("0.01", 2 * scale),
                ("0.025", 3 * scale),
                ("0.05", 3 * scale),
                ("0.1", scale),
                ("+Inf", 0),
            ],
            0.25 * scale as f64,
        ) + &histogram(
            "herald_http_request_duration_seconds",
            "service=\"users\",route=\"/healthz\",status=\"200\"",
            &[
                ("0.01", 0),
                ("0.025", scale),
                ("0.05", 0),
                ("0.1", 0),
                ("+Inf", 0),
            ],
            0.05 * scale as f64,
        )
    };
    // The mailer: 4 handler runs, all in (0.5, 1] s, 3 s in all; the
    // event: 4 handled, 1 in (1, 2.5] s and 3 in (2.5, 5] s, 14 s in all.
    let mailer = histogram(
        "herald_handler_duration_seconds",
        "service=\"mailer\",type=\"user.registered.v1\"",
        &[("0.5", 0), ("1", 4), ("+Inf", 0)],
        3.0,
    ) + &histogram(
        "herald_event_latency_seconds",
        "service=\"mailer\",type=\"user.registered.v1\"",
        &[("1", 0), ("2.5", 1), ("5", 3), ("+Inf", 0)],
        14.0,
    );
    let maxes = "herald_service_latency_max_seconds{service=\"users\"} 0.08\n\
                 herald_service_latency_max_seconds{service=\"mailer\"} 0.9\n\
                 herald_event_latency_max_seconds{service=\"mailer\",\
                 type=\"user.registered.v1\"} 4.5\n";
    // Between the two readings, 10 more requests and nothing else.
    let before = users(1) + &mailer + maxes;
    let after = users(2) + &mailer + maxes;
    let url = serve_metrics(vec![before, after]).await;

    let report = stats(&[&url], "0.5");

    // users (after): 20 requests, 0.6 s in all: mean 30 ms. p50 is the
    // 10th of 20, in (10, 25] ms, which holds the 5th to the 12th (six
    // from /user/register, two from /healthz): 10 + 15 × (10 − 4) / 8.
    let users = line(&report, "services", "service", "users");
    assert_eq!(users["count"], 20);
    close(&users["mean_seconds"], 0.6 / 20.0);
    close(&users["p50_seconds"], 0.010 + 0.015 * (10.0 - 4.0) / 8.0);
    // p90: the 18th, in (25, 50] ms, which holds the 13th to the 18th.
    close(&users["p90_seconds"], 0.025 + 0.025 * (18.0 - 12.0) / 6.0);
    // p99: the 19.8th, in (50, 100] ms, interpolated to 95 ms, but
    // nothing took more than the 80 ms seen.
    close(&users["p99_seconds"], 0.080);
    close(&users["max_seconds"], 0.080);

    // mailer: 4 runs, 3 s: mean 0.75 s; p50 is the 2nd of 4 in (0.5, 1].
    let mailer = line(&report, "services", "service", "mailer");
    assert_eq!(mailer["count"], 4);
    close(&mailer["mean_seconds"], 0.75);
    close(&mailer["p50_seconds"], 0.5 + 0.5 * 2.0 / 4.0);
    // p90: the 3.6th, 0.95 s by the buckets, but the longest run took
    // 0.9 s.
    close(&mailer["p90_seconds"], 0.9);

    // The event: mean 3.5 s; p50 is the 2nd of 4, in (2.5, 5], which
    // holds the 2nd to the 4th: 2.5 + 2.5 × (2 − 1) / 3.
    let event = line(&report, "events", "type", TYPE);
    close(&event["mean_seconds"], 3.5);
    close(&event["p50_seconds"], 2.5 + 2.5 * (2.0 - 1.0) / 3.0);
    close(&event["max_seconds"], 4.5);

    // D over the two services is the mean of their means; T the mean of
    // their throughputs: users did 10 in the window, the mailer none.
    close(
        &report["system"]["latency_seconds"],
        (0.6 / 20.0 + 0.75) / 2.0,
    );
    let window = report["window_seconds"].as_f64().unwrap();
    close(&users["throughput_per_second"], 10.0 / window);
    close(&mailer["throughput_per_second"], 0.0);
    close(
        &report["system"]["throughput_per_second"],
        10.0 / window / 2.0,
    );
    assert!((0.5..1.5).contains(&window), "{window}");
    close(&report["event_system"]["latency_seconds"], 3.5);
}

#[test]
fn span_export_asked_of_a_herald_built_without_it_is_a_clear_error() {
    if cfg!(feature = "otlp") {
        return;
    }
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["--otlp-endpoint", "http://127.0.0.1:4318", "stats"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--features otlp"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_adds_up_the_replicas_of_a_service_read_from_several_urls() {
    // Two users replicas, the same label sets: one did 3 requests and then
    // 4 more, the other 5 and then 2 more.
    let page = |count: u64, sum: f64| {
        histogram(
            "herald_http_request_duration_seconds",
            "service=\"users\",route=\"/user/register\",status=\"201\"",
            &[("0.01", count), ("+Inf", 0)],
            sum,
        )
    };
    let first = serve_metrics(vec![page(3, 0.015), page(7, 0.035)]).await;
    let second = serve_metrics(vec![page(5, 0.025), page(7, 0.035)]).await;

    let report = stats(&[&first, &second], "0.5");

    let users = line(&report, "services", "service", "users");
    assert_eq!(users["count"], 14);
    close(&users["mean_seconds"], 0.070 / 14.0);
    let window = report["window_seconds"].as_f64().unwrap();
    close(&users["throughput_per_second"], (4.0 + 2.0) / window);
}
