//! Registration with the users and the outbox in a real PostgreSQL. Set
//! HERALD_TEST_POSTGRES_URL and run with `cargo test -- --include-ignored`.
//!
//! The rules of a registration are the same on every store and are
//! tested in full on SQLite (`register.rs`); these tests cover what the
//! PostgreSQL store does its own way: the transaction with the outbox,
//! uniqueness under races, and answers while the database is away.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use herald::outbox::Outbox;
use herald::postgres;
use serde_json::{Value, json};
use testkit::postgres::TestDatabase;
use tower::ServiceExt;
use users::Users;
use users::store::UserStore;

struct App {
    pg: TestDatabase,
    users: Users,
}

async fn spawn_app() -> App {
    let pg = TestDatabase::create();
    let db = postgres::Database::open(pg.url()).await.unwrap();
    let outbox = Outbox::open(db).await.unwrap();
    let users = Users::new(UserStore::postgres(outbox).await.unwrap());
    App { pg, users }
}

fn alice(i: usize) -> Value {
    json!({
        "user_id": "alice",
        "user_name": "Alice",
        "email": format!("alice{i}@example.com"),
        "user_password": "correct horse battery",
    })
}

async fn post(users: &Users, body: Value) -> (StatusCode, Value) {
    let request = Request::post("/user/register")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = users.router().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

impl App {
    fn count(&self, table: &str) -> String {
        self.pg
            .query(&format!("SELECT count(*) FROM {table}"))
            .unwrap()
    }
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn a_registration_stores_the_user_and_stages_its_event_together() {
    let app = spawn_app().await;
    let (status, body) = post(&app.users, alice(0)).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");

    assert_eq!(app.count("users"), "1");
    let staged = app
        .pg
        .query("SELECT event_type || ' ' || subject FROM herald_outbox")
        .unwrap();
    assert_eq!(staged, "user.registered.v1 alice");
    // The hash is stored, never the password.
    let hash = app.pg.query("SELECT password_hash FROM users").unwrap();
    assert!(hash.starts_with("$argon2id$"), "{hash}");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn a_user_id_differing_only_in_case_is_refused_and_stages_nothing() {
    let app = spawn_app().await;
    assert_eq!(post(&app.users, alice(0)).await.0, StatusCode::CREATED);
    let shouted = json!({
        "user_id": "ALICE",
        "user_name": "Alice",
        "email": "other@example.com",
        "user_password": "correct horse battery",
    });
    let (status, body) = post(&app.users, shouted).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"]["field"], "user_id");
    assert_eq!(app.count("users"), "1");
    assert_eq!(app.count("herald_outbox"), "1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn twenty_concurrent_registrations_of_one_user_id_create_one_user() {
    let app = spawn_app().await;
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..20 {
        let users = app.users.clone();
        attempts.spawn(async move { post(&users, alice(i)).await.0 });
    }
    let statuses = attempts.join_all().await;

    let count = |status| statuses.iter().filter(|s| **s == status).count();
    assert_eq!(count(StatusCode::CREATED), 1, "{statuses:?}");
    assert_eq!(count(StatusCode::CONFLICT), 19, "{statuses:?}");
    assert_eq!(app.count("users"), "1");
    assert_eq!(app.count("herald_outbox"), "1");
}

#[tokio::test]
#[ignore = "needs PostgreSQL: set HERALD_TEST_POSTGRES_URL"]
async fn a_database_that_is_gone_gives_a_503_that_names_no_internals() {
    let app = spawn_app().await;
    // Dropping the database under the service: every query now fails
    // the way a server that went away does.
    drop(app.pg);

    let (status, body) = post(&app.users, alice(0)).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"]["code"], "unavailable");
    let text = body.to_string();
    assert!(!text.contains("herald_test"), "{text}");
    assert!(!text.contains("postgres"), "{text}");
}
