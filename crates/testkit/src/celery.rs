//! The Python side of the Celery interop tests: the original service's
//! worker and a producer, both real Celery from PyPI.
//!
//! - [`CeleryWorker`]: runs `python/tasks.py`, the Celery worker module of
//!   the Python service herald replaces, unchanged, against a broker.
//! - [`send_and_wait`]: publishes a task as the Python service does and
//!   waits for its result through the `rpc://` result backend, the way a
//!   Flask view calling `AsyncResult.get()` would.
//! - [`send_pickled`]: publishes a task serialized with pickle, a message
//!   a JSON-only consumer has to refuse.
//! - [`TestVhost`]: a RabbitMQ virtual host of a test's own, so a Celery
//!   worker in one test never takes the messages of another.
//!
//! Celery is pinned in [`CELERY_PINS`] and installed on first use into the
//! same virtualenv as aiosmtpd, under its own `.celery-ready` marker, so a
//! virtualenv made before for aiosmtpd alone gets Celery added. Set
//! `HERALD_TEST_PYTHON` to use an interpreter that has both.
//!
//! Every wait on a Python process is bounded: a hung broker connection
//! fails the test with the process's output instead of hanging it.

use std::fs::File;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// The Celery release the tests run against, and the packages that decide
/// what goes on the wire (kombu serializes, py-amqp frames), pinned too.
pub const CELERY_PINS: &[&str] = &[
    "celery==5.7.0",
    "kombu==5.7.0",
    "amqp==5.4.2",
    "billiard==4.3.2",
    "vine==5.1.0",
];

/// The Python name of the task `tasks.py` defines.
pub const WELCOME_TASK: &str = "tasks.send_welcome_email";

/// How long installing Celery from PyPI may take.
const INSTALL_LIMIT: Duration = Duration::from_secs(300);

/// How long a worker may take to print that it is ready.
const READY_LIMIT: Duration = Duration::from_secs(60);

/// What a producer run may take beyond the result timeout: starting
/// Python, connecting, and Celery's own publish retries.
const PRODUCER_MARGIN: Duration = Duration::from_secs(30);

/// A Python interpreter that can import Celery (and aiosmtpd), installing
/// Celery if needed.
pub fn python_with_celery() -> anyhow::Result<PathBuf> {
    if let Some(python) = std::env::var_os("HERALD_TEST_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    // The aiosmtpd helper makes the virtualenv; Celery goes into it.
    let python = crate::python_with_aiosmtpd()?;
    let venv = crate::workspace_root().join("target").join("testkit-venv");

    // The same lock as aiosmtpd's: one test binary installs, others wait.
    let lock =
        File::create(crate::workspace_root().join("target/testkit-venv.lock"))?;
    lock.lock()?;
    let ready = venv.join(".celery-ready");
    if !ready.exists() {
        let mut pip = Command::new(&python);
        pip.args(["-m", "pip", "install", "--quiet"])
            .arg("--disable-pip-version-check")
            .args(CELERY_PINS);
        run_bounded(&mut pip, INSTALL_LIMIT)
            .and_then(Finished::success)
            .context("installing Celery from PyPI")?;
        File::create(&ready)?;
    }
    lock.unlock()?;
    Ok(python)
}

/// The folder of `tasks.py` and `producer.py`.
pub fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("python")
}

/// The Python service's Celery worker (`celery -A tasks worker`), one
/// process with the solo pool, killed when dropped.
#[derive(Debug)]
pub struct CeleryWorker {
    /// The `celery worker` process; killed by `Drop`.
    child: Child,
    /// Holds `worker.log`, its stdout and stderr together.
    log_dir: tempfile::TempDir,
}

impl CeleryWorker {
    /// Starts the worker on `broker_url`, sending mail to `smtp`, and
    /// waits until it consumes from the `celery` queue.
    pub fn start(broker_url: &str, smtp: SocketAddr) -> anyhow::Result<Self> {
        let python = python_with_celery()?;
        let log_dir = tempfile::tempdir()?;
        let log = File::create(log_dir.path().join("worker.log"))?;

        // The solo pool keeps the task in this one process, so killing it
        // leaves no pool children behind. Mingle and gossip only talk to
        // other workers; without them the worker is ready sooner.
        let child = Command::new(python)
            .args(["-m", "celery", "-A", "tasks", "worker"])
            .args(["--loglevel=INFO", "--pool=solo", "--concurrency=1"])
            .args(["--without-mingle", "--without-gossip"])
            .current_dir(python_dir())
            .env("CELERY_BROKER_URL", broker_url)
            .env("SMTP_HOST", smtp.ip().to_string())
            .env("SMTP_PORT", smtp.port().to_string())
            .env("PYTHONUNBUFFERED", "1")
            // Keeps __pycache__ out of the source tree.
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting the Celery worker")?;
        let mut worker = CeleryWorker { child, log_dir };

        worker
            .wait_for_log("ready.", READY_LIMIT)
            .context("waiting for the Celery worker to be ready")?;
        Ok(worker)
    }

    /// Everything the worker printed so far.
    pub fn logs(&self) -> String {
        let path = self.log_dir.path().join("worker.log");
        std::fs::read(path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the worker's output contains `needle`. Fails early,
    /// with the output, if the worker exits.
    pub fn wait_for_log(
        &mut self,
        needle: &str,
        limit: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if self.logs().contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                bail!("the Celery worker exited ({status}):\n{}", self.logs());
            }
            if Instant::now() > deadline {
                bail!(
                    "no {needle:?} from the Celery worker after {limit:?}:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for CeleryWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `task` with `args` (a JSON array) and `kwargs` (a JSON object)
/// and waits up to `timeout` for its result. Returns the producer's
/// report: `{"status": "SUCCESS", "result": ...}`,
/// `{"status": "FAILURE", "exc_type", "exc_module", "exc_message"}` or
/// `{"status": "TIMEOUT"}`, each with the `task_id`.
pub fn send_and_wait(
    broker_url: &str,
    task: &str,
    args: serde_json::Value,
    kwargs: serde_json::Value,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let mut producer = producer("send", broker_url, task, &args, &kwargs)?;
    producer
        .arg("--timeout")
        .arg(timeout.as_secs_f64().to_string());
    run_producer(&mut producer, timeout + PRODUCER_MARGIN)
}

/// Publishes `task` serialized with pickle, without waiting, and returns
/// its task id.
pub fn send_pickled(
    broker_url: &str,
    task: &str,
    args: serde_json::Value,
    kwargs: serde_json::Value,
) -> anyhow::Result<String> {
    let mut producer =
        producer("send-pickled", broker_url, task, &args, &kwargs)?;
    let report = run_producer(&mut producer, PRODUCER_MARGIN)?;
    report["task_id"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("no task id in {report}"))
}

fn producer(
    mode: &str,
    broker_url: &str,
    task: &str,
    args: &serde_json::Value,
    kwargs: &serde_json::Value,
) -> anyhow::Result<Command> {
    let mut command = Command::new(python_with_celery()?);
    command
        .arg(python_dir().join("producer.py"))
        .arg(mode)
        .args(["--broker", broker_url, "--task", task])
        .arg("--args")
        .arg(args.to_string())
        .arg("--kwargs")
        .arg(kwargs.to_string())
        .env("PYTHONDONTWRITEBYTECODE", "1");
    Ok(command)
}

/// Runs producer.py and reads the JSON line it prints last.
fn run_producer(
    command: &mut Command,
    limit: Duration,
) -> anyhow::Result<serde_json::Value> {
    let finished = run_bounded(command, limit)?.success()?;
    let line = finished
        .stdout
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .with_context(|| {
            format!("producer.py printed nothing: {}", finished.stderr)
        })?;
    serde_json::from_str(line)
        .with_context(|| format!("reading producer.py's report {line:?}"))
}

/// A virtual host of its own on the RabbitMQ server named by
/// `HERALD_TEST_AMQP_URL`, deleted on drop. Made with `rabbitmqctl`, so
/// the server must run on this machine.
#[derive(Debug)]
pub struct TestVhost {
    name: String,
    url: String,
}

/// The variable that names the RabbitMQ server
/// (`amqp://guest:guest@127.0.0.1:5672/%2f`).
pub const AMQP_URL_VARIABLE: &str = "HERALD_TEST_AMQP_URL";

/// How long one `rabbitmqctl` command may take.
const RABBITMQCTL_LIMIT: Duration = Duration::from_secs(30);

impl TestVhost {
    /// Creates the vhost and gives the URL's user every permission on it.
    pub fn create() -> anyhow::Result<Self> {
        let server = std::env::var(AMQP_URL_VARIABLE).with_context(|| {
            format!("needs RabbitMQ: set {AMQP_URL_VARIABLE}")
        })?;
        let name = format!("herald-celery-{:016x}", random_u64());
        let (url, user) = vhost_url(&server, &name)?;

        rabbitmqctl(&["add_vhost", &name])?;
        let vhost = TestVhost { name, url };
        rabbitmqctl(&[
            "set_permissions",
            "-p",
            &vhost.name,
            &user,
            ".*",
            ".*",
            ".*",
        ])?;
        Ok(vhost)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's URL with this vhost as its path.
    pub fn url(&self) -> &str {
        &self.url
    }
}

impl Drop for TestVhost {
    fn drop(&mut self) {
        if let Err(error) = rabbitmqctl(&["delete_vhost", &self.name]) {
            eprintln!("could not delete vhost {}: {error:#}", self.name);
        }
    }
}

/// `server` with its path replaced by `vhost`, and the user it names.
fn vhost_url(server: &str, vhost: &str) -> anyhow::Result<(String, String)> {
    let (scheme, rest) = server
        .split_once("://")
        .with_context(|| format!("{server:?} is not a URL"))?;
    let authority = rest.split(['/', '?']).next().unwrap_or_default();
    let user = match authority.rsplit_once('@') {
        Some((userinfo, _)) => userinfo.split(':').next().unwrap_or_default(),
        None => "guest",
    };
    let url = format!("{scheme}://{authority}/{vhost}");
    Ok((url, user.to_owned()))
}

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let mut command = Command::new("rabbitmqctl");
    command.args(args);
    run_bounded(&mut command, RABBITMQCTL_LIMIT)?.success()?;
    Ok(())
}

fn random_u64() -> u64 {
    use std::hash::BuildHasher;
    std::hash::RandomState::new().hash_one(Instant::now())
}

/// What a process left behind when it exited in time.
#[derive(Debug)]
struct Finished {
    description: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn success(self) -> anyhow::Result<Self> {
        if !self.status.success() {
            bail!(
                "{} failed ({}): {}{}",
                self.description,
                self.status,
                self.stdout,
                self.stderr
            );
        }
        Ok(self)
    }
}

/// Runs `command` to its end, killing it if it takes longer than `limit`.
/// Its output goes to files, so a chatty process cannot fill a pipe and
/// stall while we wait.
fn run_bounded(
    command: &mut Command,
    limit: Duration,
) -> anyhow::Result<Finished> {
    let description = format!("{command:?}");
    let mut stdout = tempfile::tempfile()?;
    let mut stderr = tempfile::tempfile()?;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(stdout.try_clone()?)
        .stderr(stderr.try_clone()?)
        .spawn()
        .with_context(|| format!("starting {description}"))?;

    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{description} still ran after {limit:?}: {}{}",
                read_from_start(&mut stdout),
                read_from_start(&mut stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };

    Ok(Finished {
        description,
        status,
        stdout: read_from_start(&mut stdout),
        stderr: read_from_start(&mut stderr),
    })
}

fn read_from_start(file: &mut File) -> String {
    use std::io::{Seek, SeekFrom};
    let mut bytes = Vec::new();
    let _ = file.seek(SeekFrom::Start(0));
    let _ = file.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::SmtpServer;

    #[test]
    fn a_vhost_url_keeps_the_server_and_user_and_swaps_the_path() {
        let (url, user) =
            vhost_url("amqp://bob:pw@127.0.0.1:5672/%2f?heartbeat=5", "v")
                .unwrap();
        assert_eq!(url, "amqp://bob:pw@127.0.0.1:5672/v");
        assert_eq!(user, "bob");
    }

    #[test]
    #[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
    fn python_worker_sends_the_welcome_email_and_replies_by_rpc() {
        let vhost = TestVhost::create().unwrap();
        let smtp = SmtpServer::start().unwrap();
        let worker = CeleryWorker::start(vhost.url(), smtp.address()).unwrap();

        let report = send_and_wait(
            vhost.url(),
            WELCOME_TASK,
            json!(["lilei@example.com", "李雷"]),
            json!({}),
            Duration::from_secs(20),
        )
        .unwrap();

        assert_eq!(report["status"], "SUCCESS", "{report}\n{}", worker.logs());
        assert_eq!(
            report["result"],
            json!({"sent_to": "lilei@example.com", "user_name": "李雷"})
        );
        let mail = smtp.wait_for(1, Duration::from_secs(10)).unwrap();
        assert_eq!(mail[0].header("Subject"), Some("Welcome, 李雷!"));
        assert_eq!(mail[0].header("To"), Some("lilei@example.com"));
    }

    #[test]
    #[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
    fn python_worker_reports_a_missing_address_as_value_error() {
        let vhost = TestVhost::create().unwrap();
        let smtp = SmtpServer::start().unwrap();
        let worker = CeleryWorker::start(vhost.url(), smtp.address()).unwrap();

        let report = send_and_wait(
            vhost.url(),
            WELCOME_TASK,
            json!([42, "李雷"]),
            json!({"locale": "zh-CN"}),
            Duration::from_secs(20),
        )
        .unwrap();

        assert_eq!(report["status"], "FAILURE", "{report}\n{}", worker.logs());
        assert_eq!(report["exc_type"], "ValueError");
        assert_eq!(report["exc_message"], "no email address for user 42");
        assert!(smtp.received().unwrap().is_empty());
    }

    #[test]
    #[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
    fn python_worker_answers_an_unknown_task_with_not_registered() {
        let vhost = TestVhost::create().unwrap();
        let smtp = SmtpServer::start().unwrap();
        let worker = CeleryWorker::start(vhost.url(), smtp.address()).unwrap();

        let report = send_and_wait(
            vhost.url(),
            "tasks.no_such_task",
            json!([1]),
            json!({}),
            Duration::from_secs(5),
        )
        .unwrap();

        assert_eq!(report["status"], "FAILURE", "{report}\n{}", worker.logs());
        assert_eq!(report["exc_type"], "NotRegistered");
        assert_eq!(report["exc_message"], "'tasks.no_such_task'");
    }

    #[test]
    #[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
    fn a_task_nobody_consumes_times_out() {
        let vhost = TestVhost::create().unwrap();

        let report = send_and_wait(
            vhost.url(),
            WELCOME_TASK,
            json!(["lilei@example.com", "李雷"]),
            json!({}),
            Duration::from_secs(1),
        )
        .unwrap();

        assert_eq!(report["status"], "TIMEOUT", "{report}");
        assert!(report["task_id"].is_string());
    }

    #[test]
    #[ignore = "needs RabbitMQ: set HERALD_TEST_AMQP_URL"]
    fn python_worker_discards_a_pickled_task() {
        let vhost = TestVhost::create().unwrap();
        let smtp = SmtpServer::start().unwrap();
        let mut worker =
            CeleryWorker::start(vhost.url(), smtp.address()).unwrap();

        let id = send_pickled(
            vhost.url(),
            WELCOME_TASK,
            json!(["lilei@example.com", "李雷"]),
            json!({}),
        )
        .unwrap();

        assert_eq!(id.len(), 36, "{id}");
        worker
            .wait_for_log(
                "Refusing to deserialize untrusted content of type pickle",
                Duration::from_secs(10),
            )
            .unwrap();
        assert!(smtp.received().unwrap().is_empty());
    }
}
