//! Where welcome emails go: a Maildir on disk, or an SMTP server.
//!
//! Both tell a failure that may pass (a refused connection, a timeout, a
//! 4xx reply) from one that will not (a 5xx reply), so the worker retries
//! the first and dead-letters the second.

use std::time::Duration;

use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

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

/// Why a message was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("{0}")]
    Transient(String),
    #[error("{0}")]
    Permanent(String),
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

/// An SMTP server to hand mail to.
#[derive(Clone)]
pub struct SmtpRelay {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    /// The URL without its credentials, for logs.
    display: String,
}

impl std::fmt::Debug for SmtpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpRelay")
            .field("url", &self.display)
            .finish()
    }
}

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
        let host_port = authority.rsplit('@').next().unwrap_or("");
        let (host, port) = split_host_port(host_port).ok_or_else(|| {
            format!("{display} needs a host and, optionally, a port (1-65535)")
        })?;
        if port == Some(0) {
            return Err(format!("{display}: the port must be 1-65535"));
        }

        let parameters = TlsParameters::new(host.clone())
            .map_err(|e| format!("TLS set-up for {host} failed: {e}"))?;
        let (tls, default_port) = match scheme {
            "smtp" => (Tls::Opportunistic(parameters), 587),
            "smtps" => (Tls::Wrapper(parameters), 465),
            _ => {
                return Err(format!(
                    "{display}: the scheme must be smtp or smtps"
                ));
            }
        };

        // Let lettre read the credentials, then set what we decided.
        let builder = AsyncSmtpTransport::<Tokio1Executor>::from_url(&format!(
            "smtp://{rest}"
        ))
        .map_err(|e| format!("{display}: {e}"))?;
        let transport = builder
            .port(port.unwrap_or(default_port))
            .tls(tls)
            .timeout(Some(SMTP_STEP_TIMEOUT))
            .build();
        Ok(SmtpRelay { transport, display })
    }

    async fn send(&self, message: &Message) -> Result<(), SendError> {
        let sent = tokio::time::timeout(
            SMTP_SEND_TIMEOUT,
            self.transport.send(message.clone()),
        )
        .await;
        match sent {
            Ok(Ok(_)) => Ok(()),
            // A reply's text often quotes the recipient, in any form;
            // logs and dead letters get its codes only.
            Ok(Err(e)) if e.is_permanent() => {
                Err(SendError::Permanent(format!(
                    "the SMTP server refused the message: {}",
                    describe(&e)
                )))
            }
            Ok(Err(e)) => Err(SendError::Transient(format!(
                "SMTP delivery failed: {}",
                describe(&e)
            ))),
            Err(_) => Err(SendError::Transient(format!(
                "SMTP delivery took longer than {SMTP_SEND_TIMEOUT:?}"
            ))),
        }
    }
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
