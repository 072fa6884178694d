//! Password hashing, kept off the async worker threads.
//!
//! Argon2id with 19 MiB of memory, 2 iterations and 1 lane takes tens of
//! milliseconds of one core per hash. Run on the async threads it would
//! stall every other request, health checks included; so each hash runs on
//! a blocking thread, and a semaphore lets only as many run at once as
//! there are cores. Requests beyond that wait their turn without holding a
//! thread.

use std::sync::Arc;

use argon2::{Algorithm, Argon2, Params, PasswordHasher, Version};
use tokio::sync::Semaphore;

use crate::domain::Password;

/// An Argon2id PHC string. Stored, never logged, published or returned.
#[derive(Clone)]
pub struct PasswordHash(String);

impl PasswordHash {
    pub fn as_phc(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for PasswordHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PasswordHash(<redacted>)")
    }
}

/// Hashes passwords with bounded parallelism.
#[derive(Debug, Clone)]
pub struct Hasher {
    params: Params,
    permits: Arc<Semaphore>,
}

impl Hasher {
    /// Argon2id, m = 19 MiB, t = 2, p = 1: OWASP's recommendation.
    pub fn new(parallelism: usize) -> Self {
        let params = Params::new(19 * 1024, 2, 1, None)
            .expect("the recommended parameters are valid");
        Hasher {
            params,
            permits: Arc::new(Semaphore::new(parallelism.max(1))),
        }
    }

    /// One hash per available core at most.
    pub fn per_core() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Hasher::new(cores)
    }

    pub async fn hash(
        &self,
        password: Password,
    ) -> Result<PasswordHash, HashError> {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let hasher = self.clone();
        tokio::task::spawn_blocking(move || hasher.hash_blocking(&password))
            .await
            .map_err(|e| HashError(e.to_string()))?
    }

    /// Hashes on the calling thread, outside the parallelism bound: for
    /// blocking contexts and for measuring the hashing ceiling.
    pub fn hash_blocking(
        &self,
        password: &Password,
    ) -> Result<PasswordHash, HashError> {
        let argon = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            self.params.clone(),
        );
        argon
            .hash_password(password.expose().as_bytes())
            .map(|hash| PasswordHash(hash.to_string()))
            .map_err(|e| HashError(e.to_string()))
    }
}

/// Hashing failed (it should not: parameters are fixed and valid).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_salted_argon2id_with_the_required_parameters() {
        let hasher = Hasher::new(1);
        let password = Password::parse("correct horse battery").unwrap();
        let first = hasher.hash(password.clone()).await.unwrap();
        let second = hasher.hash(password).await.unwrap();
        assert!(
            first
                .as_phc()
                .starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{}",
            first.as_phc()
        );
        assert_ne!(first.as_phc(), second.as_phc());
        assert!(!first.as_phc().contains("horse"));
    }
}
