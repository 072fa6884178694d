//! `herald bench bus` runs to the end on the embedded bus: every event it
//! publishes must reach its handler, or it would wait for them in vain.

use std::process::Command;

#[test]
fn the_bus_benchmark_gets_every_event_through_and_reports_a_rate() {
    let output = Command::new(env!("CARGO_BIN_EXE_herald"))
        .args(["bench", "bus", "--events", "300", "--json"])
        .env("HERALD_LOG", "warn")
        .output()
        .expect("herald runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let report: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("JSON on stdout");
    assert_eq!(report["events"], 300);
    assert!(
        report["herald"]["end_to_end_per_second"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    // The SQLite ceiling is measured in the same run, with its ratio.
    assert_eq!(report["ceiling_is"], "raw SQLite");
    let ceiling = report["ceiling"]["end_to_end_per_second"].as_f64();
    assert!(ceiling.is_some_and(|c| c > 0.0), "{report}");
    assert!(
        report["ratio"].as_f64().is_some_and(|r| r > 0.0),
        "{report}"
    );
}

#[test]
fn bench_settings_that_cannot_run_are_refused_before_anything_starts() {
    for (flag, value) in [
        ("--events", "0"),
        ("--size", "0"),
        ("--size", "18446744073709551615"),
        ("--publishers", "0"),
        ("--concurrency", "0"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(["bench", "bus", flag, value])
            .output()
            .expect("herald runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(stderr.contains(flag), "{flag} {value}: {stderr}");
    }
}
