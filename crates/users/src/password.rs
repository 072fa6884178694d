//! Password hashing, kept off the async worker threads.
//!
//! Argon2id with 19 MiB of memory, 2 iterations and 1 lane takes tens of
//! milliseconds of one core per hash. Run on the async threads it would
//! stall every other request, health checks included. So hashes run on a
//! small pool of dedicated threads, one per core: requests beyond that
//! wait their turn in a queue without holding any thread.
//!
//! Each hashing thread allocates its 19 MiB of Argon2 memory once and
//! reuses it for every hash. Allocating it per hash would cost page faults
//! on every hash, and the allocator would keep a freed 19 MiB in each of
//! its per-thread arenas, so a process that hashed on many threads would
//! hold hundreds of megabytes.

use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use argon2::password_hash::phc::{Output, ParamsString, Salt};
use argon2::{
    ARGON2ID_IDENT, Algorithm, Argon2, Block, Params, Version, password_hash,
};
use tokio::sync::oneshot;

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

/// A password waiting for a hashing thread, with where to send the hash.
struct Job {
    password: Password,
    reply: oneshot::Sender<Result<PasswordHash, HashError>>,
}

/// Hashes passwords on a fixed pool of threads. Cheap to clone; the
/// threads stop when the last clone is dropped.
#[derive(Debug, Clone)]
pub struct Hasher {
    jobs: mpsc::Sender<Job>,
    threads: usize,
}

impl Hasher {
    /// Starts `threads` hashing threads using Argon2id, m = 19 MiB,
    /// t = 2, p = 1: OWASP's recommendation.
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        let (jobs, queue) = mpsc::channel::<Job>();
        let queue = Arc::new(Mutex::new(queue));
        for n in 0..threads {
            let queue = queue.clone();
            std::thread::Builder::new()
                .name(format!("argon2-{n}"))
                .spawn(move || hash_forever(&queue))
                .expect("can start a hashing thread");
        }
        Hasher { jobs, threads }
    }

    /// One hashing thread per available core.
    pub fn per_core() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Hasher::new(cores)
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub async fn hash(
        &self,
        password: Password,
    ) -> Result<PasswordHash, HashError> {
        let (reply, hashed) = oneshot::channel();
        self.jobs
            .send(Job { password, reply })
            .map_err(|_| HashError("the hashing threads are gone".into()))?;
        hashed
            .await
            .map_err(|_| HashError("a hashing thread died".into()))?
    }
}

/// A hashing thread: takes jobs until every sender is gone.
fn hash_forever(queue: &Mutex<mpsc::Receiver<Job>>) {
    let params = params();
    let mut memory = vec![Block::default(); params.block_count()];
    loop {
        let job = match queue.lock() {
            Ok(queue) => queue.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let hashed = hash_with(&params, &job.password, &mut memory);
        // The requester may have given up (its request was dropped).
        let _ = job.reply.send(hashed);
    }
}

fn params() -> Params {
    Params::new(19 * 1024, 2, 1, None)
        .expect("the recommended parameters are valid")
}

/// Hashes `password` with a fresh random salt in `memory`, which must hold
/// `params.block_count()` blocks.
fn hash_with(
    params: &Params,
    password: &Password,
    memory: &mut [Block],
) -> Result<PasswordHash, HashError> {
    let failed = |e: &dyn std::fmt::Display| HashError(e.to_string());
    let argon =
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    let salt = password_hash::generate_salt();
    let mut output = [0u8; Params::DEFAULT_OUTPUT_LEN];
    argon
        .hash_password_into_with_memory(
            password.expose().as_bytes(),
            &salt,
            &mut output,
            memory,
        )
        .map_err(|e| failed(&e))?;

    let phc = password_hash::phc::PasswordHash {
        algorithm: ARGON2ID_IDENT,
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(|e| failed(&e))?,
        salt: Some(Salt::new(&salt).map_err(|e| failed(&e))?),
        hash: Some(Output::new(&output).map_err(|e| failed(&e))?),
    };
    Ok(PasswordHash(phc.to_string()))
}

/// Hashing failed (it should not: parameters are fixed and valid).
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordVerifier;

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

    #[tokio::test]
    async fn a_hash_verifies_against_its_password_and_no_other() {
        let hasher = Hasher::new(2);
        let password = Password::parse("correct horse battery").unwrap();
        let hash = hasher.hash(password).await.unwrap();
        let argon = Argon2::default();
        assert!(
            argon
                .verify_password(b"correct horse battery", hash.as_phc())
                .is_ok()
        );
        assert!(
            argon
                .verify_password(b"correct horse battery!", hash.as_phc())
                .is_err()
        );
    }
}
