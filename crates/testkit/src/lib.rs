//! Test harness shared by herald's crates: real components on loopback.
//!
//! - [`SmtpServer`]: Python's aiosmtpd, a real SMTP server, on 127.0.0.1,
//!   storing what it receives in a Maildir.
//! - [`ParsedEmail`]: an email read back by Python's standard `email`
//!   package, an independent MIME parser, with headers decoded.
//!
//! aiosmtpd comes from PyPI into a virtual environment under `target/`,
//! made on first use (`.ci/run` makes it ahead of time). Set
//! `HERALD_TEST_PYTHON` to use another interpreter that has it.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod celery;
pub mod postgres;

use anyhow::{Context, bail};

/// The pinned aiosmtpd release the tests run against.
const AIOSMTPD: &str = "aiosmtpd==1.4.6";

/// A Python interpreter that can import aiosmtpd, installing it if needed.
pub fn python_with_aiosmtpd() -> anyhow::Result<PathBuf> {
    if let Some(python) = std::env::var_os("HERALD_TEST_PYTHON") {
        return Ok(PathBuf::from(python));
    }
    let venv = workspace_root().join("target").join("testkit-venv");
    let python = venv.join("bin").join("python");
    std::fs::create_dir_all(workspace_root().join("target"))?;

    // Test binaries run in parallel: one of them installs, the others wait.
    let lock = File::create(workspace_root().join("target/testkit-venv.lock"))?;
    lock.lock()?;
    let ready = venv.join(".ready");
    if !ready.exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("creating the test virtualenv")?;
        run(Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", AIOSMTPD]))
        .context("installing aiosmtpd from PyPI")?;
        File::create(&ready)?;
    }
    lock.unlock()?;
    Ok(python)
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command.output()?;
    if !output.status.success() {
        bail!(
            "{:?} failed: {}",
            command,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("can bind an ephemeral port on loopback")
}

/// Waits until something accepts TCP connections on `address`.
pub fn wait_for_port(
    address: SocketAddr,
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while TcpStream::connect_timeout(&address, Duration::from_millis(200))
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on {address} after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// aiosmtpd on 127.0.0.1, stopped when dropped.
#[derive(Debug)]
pub struct SmtpServer {
    child: Child,
    port: u16,
    maildir: tempfile::TempDir,
}

impl SmtpServer {
    pub fn start() -> anyhow::Result<Self> {
        Self::start_on(free_port())
    }

    /// Starts the server on `port`, e.g. to bring back one that was down.
    pub fn start_on(port: u16) -> anyhow::Result<Self> {
        let python = python_with_aiosmtpd()?;
        let maildir = tempfile::tempdir()?;
        let child = Command::new(python)
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            // A path that does not exist yet: Python's Maildir creates
            // its tmp/, new/ and cur/ only when it creates the folder.
            .arg(maildir.path().join("box"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting aiosmtpd")?;
        let server = SmtpServer {
            child,
            port,
            maildir,
        };
        wait_for_port(server.address(), Duration::from_secs(20))?;
        Ok(server)
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `smtp://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message received so far, parsed.
    pub fn received(&self) -> anyhow::Result<Vec<ParsedEmail>> {
        read_maildir(&self.maildir.path().join("box/new"))
    }

    /// Waits until at least `count` messages arrived, and returns them all.
    pub fn wait_for(
        &self,
        count: usize,
        limit: Duration,
    ) -> anyhow::Result<Vec<ParsedEmail>> {
        wait_for_mail(&self.maildir.path().join("box/new"), count, limit)
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the Maildir folder `new` holds at least `count` messages.
pub fn wait_for_mail(
    new: &Path,
    count: usize,
    limit: Duration,
) -> anyhow::Result<Vec<ParsedEmail>> {
    let deadline = Instant::now() + limit;
    loop {
        let found = count_files(new);
        if found >= count {
            return read_maildir(new);
        }
        if Instant::now() > deadline {
            bail!(
                "{found} of {count} emails in {} after {limit:?}",
                new.display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How many files a folder holds (none if it does not exist).
pub fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir).map_or(0, |entries| entries.count())
}

/// Parses every file in a Maildir folder, in name order.
pub fn read_maildir(dir: &Path) -> anyhow::Result<Vec<ParsedEmail>> {
    let mut paths: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()?,
        Err(_) => Vec::new(),
    };
    paths.sort();
    paths.iter().map(|p| ParsedEmail::from_file(p)).collect()
}

/// An email as Python's `email` package reads it: headers decoded from
/// RFC 2047, bodies decoded from their transfer encoding.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct ParsedEmail {
    /// Every header as (name, decoded value), in order.
    pub headers: Vec<(String, String)>,
    pub text: Option<String>,
    pub html: Option<String>,
    pub defects: Vec<String>,
}

const PARSE_EMAIL: &str = r#"
import email, email.policy, json, sys
message = email.message_from_binary_file(
    open(sys.argv[1], 'rb'), policy=email.policy.default)
def body(kind):
    part = message.get_body(preferencelist=(kind,))
    return part.get_content() if part is not None else None
defects = [repr(d) for d in message.defects]
for part in message.walk():
    defects += [repr(d) for d in part.defects]
json.dump({
    'headers': [[k, str(v)] for k, v in message.items()],
    'text': body('plain'),
    'html': body('html'),
    'defects': defects,
}, sys.stdout)
"#;

impl ParsedEmail {
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let output = Command::new("python3")
            .args(["-c", PARSE_EMAIL])
            .arg(path)
            .output()
            .context("running python3 to parse an email")?;
        if !output.status.success() {
            bail!(
                "parsing {} failed: {}",
                path.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        serde_json::from_slice(&output.stdout)
            .context("reading the parsed email")
    }

    /// The decoded value of the first header named `name`, any case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// How many headers are named `name`, any case.
    pub fn count_headers(&self, name: &str) -> usize {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    }
}
