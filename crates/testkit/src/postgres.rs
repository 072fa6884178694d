//! A database of its own for each test, on the PostgreSQL server named by
//! `HERALD_TEST_POSTGRES_URL`, dropped when the test ends.
//!
//! Tests that share a server still start from empty tables and can run
//! side by side. The database is created and dropped with `psql`, which
//! comes with the server.

use std::process::Command;

use anyhow::{Context, bail};

/// The variable that names the server, as a URL to a database that
/// exists (`postgres://postgres@127.0.0.1:5432/test`).
pub const URL_VARIABLE: &str = "HERALD_TEST_POSTGRES_URL";

/// A fresh database, dropped on drop.
#[derive(Debug)]
pub struct TestDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl TestDatabase {
    /// Creates an empty database. Panics, saying what to set, when the
    /// server is not configured or cannot be reached.
    pub fn create() -> TestDatabase {
        let admin_url = std::env::var(URL_VARIABLE)
            .unwrap_or_else(|_| panic!("needs PostgreSQL: set {URL_VARIABLE}"));
        let name = format!("herald_test_{:016x}", random_u64());
        psql(&admin_url, &format!("CREATE DATABASE {name}"))
            .expect("can create a test database");
        let url = with_database(&admin_url, &name);
        TestDatabase {
            admin_url,
            name,
            url,
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs one SQL statement in this database and returns its output
    /// (unaligned, tuples only).
    pub fn query(&self, sql: &str) -> anyhow::Result<String> {
        psql(&self.url, sql)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let drop_it =
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(error) = psql(&self.admin_url, &drop_it) {
            eprintln!("could not drop test database {}: {error:#}", self.name);
        }
    }
}

fn psql(url: &str, sql: &str) -> anyhow::Result<String> {
    let output = Command::new("psql")
        .args([
            url,
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-c",
            sql,
        ])
        .output()
        .context("running psql")?;
    if !output.status.success() {
        bail!(
            "psql failed on {sql:?}: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (url, String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_start..].find('/') {
        Some(slash) => &base[..authority_start + slash],
        None => base,
    };
    format!("{server}/{name}{query}")
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gets_the_new_database_name_and_keeps_its_options() {
        assert_eq!(
            with_database("postgres://u@h:5432/test?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }
}
