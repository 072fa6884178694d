//! Running the real `herald` binary in tests.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

pub const WAIT: Duration = Duration::from_secs(30);

/// A running `herald` process, killed when dropped.
pub struct Herald {
    child: Child,
    base: Option<String>,
    metrics: Option<String>,
    log: tempfile::NamedTempFile,
}

impl Herald {
    /// `herald up` on port 0 with `data_dir`.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Herald {
        Self::start_logging(data_dir, extra, "warn")
    }

    /// `herald up`, its log filter at `level`, its stderr kept.
    pub fn start_logging(
        data_dir: &Path,
        extra: &[&str],
        level: &str,
    ) -> Herald {
        let command = ["up", "--listen", "127.0.0.1:0"];
        Self::spawn(&command, data_dir, extra, level, "mailer")
    }

    /// `herald serve users` on port 0.
    pub fn serve_users(data_dir: &Path, extra: &[&str]) -> Herald {
        Self::serve_users_logging(data_dir, extra, "warn")
    }

    /// `herald serve users` on port 0, its log filter at `level`.
    pub fn serve_users_logging(
        data_dir: &Path,
        extra: &[&str],
        level: &str,
    ) -> Herald {
        let command = ["serve", "users", "--listen", "127.0.0.1:0"];
        Self::spawn(&command, data_dir, extra, level, "users")
    }

    /// `herald serve mailer`, its metrics on port 0.
    pub fn serve_mailer(data_dir: &Path, extra: &[&str]) -> Herald {
        Self::serve_mailer_logging(data_dir, extra, "warn")
    }

    /// `herald serve mailer`, its log filter at `level`.
    pub fn serve_mailer_logging(
        data_dir: &Path,
        extra: &[&str],
        level: &str,
    ) -> Herald {
        let command = ["serve", "mailer", "--listen", "127.0.0.1:0"];
        Self::spawn(&command, data_dir, extra, level, "mailer")
    }

    /// Starts the binary and waits for the start-up line beginning with
    /// `ready`, noting the users service's address on the way.
    fn spawn(
        command: &[&str],
        data_dir: &Path,
        extra: &[&str],
        level: &str,
        ready: &str,
    ) -> Herald {
        let log = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_herald"))
            .args(command)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra)
            .env("HERALD_LOG", level)
            .stdout(Stdio::piped())
            .stderr(log.reopen().unwrap())
            .spawn()
            .expect("herald starts");

        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let (mut base, mut metrics) = (None, None);
        loop {
            let Some(line) = lines.next() else {
                let logs = std::fs::read_to_string(log.path()).unwrap();
                panic!("herald exited before it was ready:\n{logs}");
            };
            let line = line.unwrap();
            if let Some(rest) = line.strip_prefix("users") {
                base = rest.split_whitespace().next().map(str::to_owned);
            }
            if let Some(rest) = line.strip_prefix("metrics") {
                metrics = rest.split_whitespace().next().map(str::to_owned);
            }
            if line.starts_with(ready) {
                break;
            }
        }
        std::thread::spawn(move || lines.for_each(drop));
        Herald {
            child,
            base,
            metrics,
            log,
        }
    }

    /// The users service's base URL.
    pub fn base(&self) -> &str {
        self.base.as_deref().expect("this process serves users")
    }

    /// The URL of the process's metrics.
    pub fn metrics_url(&self) -> &str {
        self.metrics
            .as_deref()
            .expect("this process serves metrics")
    }

    /// The process's metrics, as `/metrics` serves them now.
    pub async fn metrics(&self) -> String {
        client()
            .get(self.metrics_url())
            .send()
            .await
            .expect("the metrics are served")
            .text()
            .await
            .unwrap()
    }

    /// Everything herald logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap()
    }

    pub async fn register(&self, body: Value) -> (u16, Value) {
        let response = client()
            .post(format!("{}/user/register", self.base()))
            .json(&body)
            .send()
            .await
            .expect("the users service answers");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        wait_with_timeout(&mut self.child, WAIT)
    }
}

impl Drop for Herald {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_with_timeout(
    child: &mut Child,
    limit: Duration,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(std::time::Instant::now() < deadline, "herald did not exit");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The value of the sample `name` whose labels include all of `labels`,
/// summed over the samples that match; 0 when none does.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (sample, rest) =
                series.split_once('{').unwrap_or((series, "}"));
            let rest = format!(",{rest}");
            let matches = sample == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!(",{k}=\"{v}\"")));
            matches.then(|| value.parse::<f64>().unwrap())
        })
        .sum()
}
