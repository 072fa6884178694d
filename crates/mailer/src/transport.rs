//! Where welcome emails go: a Maildir on disk, or an SMTP server.
//!
//! Both tell a failure that may pass (a refused connection, a timeout, a
//! 4xx reply) from one that will not (a 5xx reply), so the worker retries
//! the first and dead-letters the second. SMTP adds a third: a connection
//! that fails after the whole message was sent, before the server said
//! whether it took it. The email may have been delivered; it is retried,
//! with the same Message-ID, and the log says so.

use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use lettre::Message;
use lettre::transport::smtp::authentication::{Credentials, Mechanism};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::commands::{Data, Mail, Rcpt};
use lettre::transport::smtp::extension::{
    ClientId, Extension, MailBodyParameter, MailParameter,
};

use crate::maildir::Maildir;

/// How long any one SMTP step (connect, a command, its reply) may take.
const SMTP_STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The most one whole SMTP delivery may take, every step included.
const SMTP_SEND_TIMEOUT: Duration = Duration::from_secs(30);

/// A way to deliver a finished message.
#[derive(Debug, Clone)]
pub enum Transport {
    Maildir(Maildir),
    Smtp(SmtpRelay),
}

/// Why a message was not delivered, or may not have been.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
    /// The message went out whole, then the connection failed before the
    /// server's reply: it may or may not have been delivered.
    #[error("{0}")]
    Uncertain(String),
}

impl Transport {
    /// Delivers `message`, whose Maildir file name is `name`.
    pub async fn send(
        &self,
        name: &str,
        message: &Message,
    ) -> Result<(), SendError> {
        match self {
            Transport::Maildir(maildir) => {
                let maildir = maildir.clone();
                let name = name.to_owned();
                let bytes = message.formatted();
                tokio::task::spawn_blocking(move || {
                    maildir.deliver(&name, &bytes)
                })
                .await
                .map_err(|e| SendError::Transient(e.to_string()))?
                .map_err(|e| {
                    SendError::Transient(format!("maildir write failed: {e}"))
                })
            }
            Transport::Smtp(relay) => relay.send(message).await,
        }
    }

    /// Whether `name` is known to be delivered already. Only a Maildir can
    /// tell; an SMTP server cannot be asked.
    pub fn already_delivered(&self, name: &str) -> bool {
        match self {
            Transport::Maildir(maildir) => maildir.contains(name),
            Transport::Smtp(_) => false,
        }
    }

    /// Where mail goes, for the start-up line. Never shows credentials.
    pub fn describe(&self) -> String {
        match self {
            Transport::Maildir(maildir) => {
                format!("maildir {}", maildir.root().display())
            }
            Transport::Smtp(relay) => relay.display.clone(),
        }
    }
}

/// An SMTP server to hand mail to, one connection per message.
#[derive(Clone)]
pub struct SmtpRelay {
    host: String,
    port: u16,
    tls: SmtpTls,
    credentials: Option<Credentials>,
    hello: ClientId,
    /// The URL without its credentials, for logs.
    display: String,
}

/// How the connection is encrypted.
#[derive(Clone)]
enum SmtpTls {
    /// STARTTLS when the server offers it (`smtp://`).
    Opportunistic(TlsParameters),
    /// TLS from the first byte (`smtps://`).
    Wrapper(TlsParameters),
}

impl std::fmt::Debug for SmtpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpRelay")
            .field("url", &self.display)
            .finish()
    }
}

/// How far a delivery got, so that a failure can say whether the server
/// may have the message: before the message, or while it goes and the
/// reply is awaited.
const CONNECTING: u8 = 0;
const MESSAGE_GOING: u8 = 1;

impl SmtpRelay {
    /// Reads `smtp://[user:pass@]host[:port]` (STARTTLS when the server
    /// offers it; port 587 unless given) or `smtps://...` (TLS from the
    /// first byte; port 465 unless given).
    pub fn from_url(url: &str) -> Result<Self, String> {
        let display = herald::redact_credentials(url);
        let (scheme, rest) = url.split_once("://").ok_or_else(|| {
            format!("{display} is not an smtp:// or smtps:// URL")
        })?;
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let (userinfo, host_port) = match authority.rsplit_once('@') {
            Some((userinfo, host_port)) => (Some(userinfo), host_port),
            None => (None, authority),
        };
        let (host, port) = split_host_port(host_port).ok_or_else(|| {
            format!("{display} needs a host and, optionally, a port (1-65535)")
        })?;
        if port == Some(0) {
            return Err(format!("{display}: the port must be 1-65535"));
        }

        let parameters = TlsParameters::new(host.clone())
            .map_err(|e| format!("TLS set-up for {host} failed: {e}"))?;
        let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
            "smtp" => (SmtpTls::Opportunistic(parameters), 587),
            "smtps" => (SmtpTls::Wrapper(parameters), 465),
            _ => {
                return Err(format!(
                    "{display}: the scheme must be smtp or smtps"
                ));
            }
        };
        let credentials = userinfo.map(|userinfo| {
            let (user, password) =
                userinfo.split_once(':').unwrap_or((userinfo, ""));
            Credentials::new(percent_decoded(user), percent_decoded(password))
        });
        Ok(SmtpRelay {
            host,
            port: port.unwrap_or(default_port),
            tls,
            credentials,
            hello: ClientId::default(),
            display,
        })
    }

    async fn send(&self, message: &Message) -> Result<(), SendError> {
        let stage = AtomicU8::new(CONNECTING);
        let sent = tokio::time::timeout(
            SMTP_SEND_TIMEOUT,
            self.deliver(message, &stage),
        )
        .await;
        let message_going = stage.load(Ordering::Acquire) == MESSAGE_GOING;
        match sent {
            Ok(Ok(())) => Ok(()),
            // A reply's text often quotes the recipient, in any form;
            // logs and dead letters get its codes only.
            Ok(Err(e)) if e.is_permanent() => {
                Err(SendError::Permanent(format!(
                    "the SMTP server refused the message: {}",
                    describe(&e)
                )))
            }
            // No reply to a whole message: the server may have it.
            Ok(Err(e)) if message_going && e.status().is_none() => {
                Err(SendError::Uncertain(format!(
                    "the connection failed after the message was sent, \
                     before the server replied: {}",
                    describe(&e)
                )))
            }
            Ok(Err(e)) => Err(SendError::Transient(format!(
                "SMTP delivery failed: {}",
                describe(&e)
            ))),
            Err(_) if message_going => Err(SendError::Uncertain(format!(
                "the server did not reply to the message within \
                 {SMTP_SEND_TIMEOUT:?}"
            ))),
            Err(_) => Err(SendError::Transient(format!(
                "SMTP delivery took longer than {SMTP_SEND_TIMEOUT:?}"
            ))),
        }
    }

    /// One SMTP session: connect (with TLS as configured), log in, hand
    /// over the message, noting in `stage` when it has gone whole.
    async fn deliver(
        &self,
        message: &Message,
        stage: &AtomicU8,
    ) -> Result<(), lettre::transport::smtp::Error> {
        let wrapper = match &self.tls {
            SmtpTls::Wrapper(parameters) => Some(parameters.clone()),
            SmtpTls::Opportunistic(_) => None,
        };
        let mut connection = AsyncSmtpConnection::connect_tokio1(
            (self.host.as_str(), self.port),
            Some(SMTP_STEP_TIMEOUT),
            &self.hello,
            wrapper,
            None,
        )
        .await?;
        if let SmtpTls::Opportunistic(parameters) = &self.tls
            && connection.can_starttls()
        {
            connection.starttls(parameters.clone(), &self.hello).await?;
        }
        if let Some(credentials) = &self.credentials {
            let mechanisms = [Mechanism::Plain, Mechanism::Login];
            connection.auth(&mechanisms, credentials).await?;
        }

        let envelope = message.envelope();
        let bytes = message.formatted();
        let mut options = Vec::new();
        if !bytes.is_ascii()
            && connection
                .server_info()
                .supports_feature(Extension::EightBitMime)
        {
            options.push(MailParameter::Body(MailBodyParameter::EightBitMime));
        }
        connection
            .command(Mail::new(envelope.from().cloned(), options))
            .await?;
        for recipient in envelope.to() {
            connection
                .command(Rcpt::new(recipient.clone(), Vec::new()))
                .await?;
        }
        connection.command(Data).await?;
        // From here on a failure may come after the server has the whole
        // message (a cut-off message would be refused, so erring this way
        // costs only a warning).
        stage.store(MESSAGE_GOING, Ordering::Release);
        connection.message(&bytes).await?;
        // The server has the message; a failed goodbye changes nothing.
        let _ = connection.quit().await;
        Ok(())
    }
}

/// `text` with its %XX escapes decoded, as URL user names and passwords
/// are written.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

fn split_host_port(text: &str) -> Option<(String, Option<u16>)> {
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(port.parse().ok()?),
            None if after.is_empty() => None,
            None => return None,
        };
        return Some((host.to_owned(), port));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) => (host, Some(port.parse().ok()?)),
        None => (text, None),
    };
    (!host.is_empty()).then(|| (host.to_owned(), port))
}

/// An SMTP failure without anything the server said in prose: a reply
/// becomes its code and enhanced status code (`reply 550 5.1.1`); other
/// failures (refused connections, TLS, timeouts) keep their description,
/// which comes from this side, not the server.
fn describe(error: &lettre::transport::smtp::Error) -> String {
    let Some(code) = error.status() else {
        return herald::error_chain(error);
    };
    let kind = if error.is_permanent() {
        "permanent"
    } else {
        "transient"
    };
    let text = error.to_string();
    let enhanced = text
        .split_whitespace()
        .map(|word| word.trim_end_matches(':'))
        .find(|word| is_enhanced_status(word));
    match enhanced {
        Some(status) => format!("{kind} reply {code} {status}"),
        None => format!("{kind} reply {code}"),
    }
}

/// `5.1.1`-style enhanced status codes (RFC 3463).
fn is_enhanced_status(word: &str) -> bool {
    let parts: Vec<&str> = word.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
        && matches!(parts[0], "2" | "4" | "5")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn credentials_never_show_in_the_description() {
        let url = "smtp://mailer:hunter22@mail.example.com:2525";
        assert_eq!(
            herald::redact_credentials(url),
            "smtp://mailer:***@mail.example.com:2525"
        );
        let relay = SmtpRelay::from_url(url).unwrap();
        assert!(!format!("{relay:?}").contains("hunter22"));
        assert!(!Transport::Smtp(relay).describe().contains("hunter22"));
    }

    #[test]
    fn user_names_and_passwords_in_urls_are_percent_decoded() {
        assert_eq!(percent_decoded("p%40ss%3Aw%2Fd"), "p@ss:w/d");
        assert_eq!(percent_decoded("100%"), "100%");
        assert_eq!(percent_decoded("%zz"), "%zz");
        assert_eq!(percent_decoded("%E5%BC%A0"), "张");
    }

    #[test]
    fn enhanced_status_codes_are_recognised() {
        assert!(is_enhanced_status("5.1.1"));
        assert!(is_enhanced_status("4.7.0"));
        assert!(!is_enhanced_status("zelda.secret.1"));
        assert!(!is_enhanced_status("1.2.3"));
        assert!(!is_enhanced_status("5.1"));
    }

    #[tokio::test]
    async fn smtp_urls_need_a_known_scheme_and_a_host() {
        assert!(SmtpRelay::from_url("smtp://127.0.0.1:2525").is_ok());
        assert!(SmtpRelay::from_url("smtps://mail.example.com").is_ok());
        assert!(SmtpRelay::from_url("http://127.0.0.1:2525").is_err());
        assert!(SmtpRelay::from_url("smtp://:2525").is_err());
        assert!(SmtpRelay::from_url("smtp://host:notaport").is_err());
        assert!(SmtpRelay::from_url("smtp://host:99999").is_err());
        assert!(SmtpRelay::from_url("smtp://host:0").is_err());
        assert!(SmtpRelay::from_url("127.0.0.1:2525").is_err());
    }
}
