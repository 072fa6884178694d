//! `POST /user/register` and the health routes, through the real router,
//! against a real SQLite file.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use contracts::UserRegistered;
use herald::broker::embedded::EmbeddedOptions;
use herald::sqlite::Database;
use herald::{Broker, Delivery, EmbeddedBroker, Event};
use serde_json::{Value, json};
use tower::ServiceExt;
use users::Users;
use users::store::UserStore;

const QUEUE: &str = "welcomes";

struct App {
    _dir: tempfile::TempDir,
    broker: EmbeddedBroker,
    users: Users,
}

async fn spawn_app() -> App {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(&dir.path().join("herald.db")).await.unwrap();
    let broker = EmbeddedBroker::open(db, EmbeddedOptions::default())
        .await
        .unwrap();
    broker.bind(QUEUE, &[UserRegistered::TYPE]).await.unwrap();
    let store = UserStore::sqlite(broker.clone()).await.unwrap();
    let users = Users::new(store);
    App {
        _dir: dir,
        broker,
        users,
    }
}

struct Reply {
    status: StatusCode,
    body: Value,
}

impl Reply {
    fn error_code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    fn error_field(&self) -> &str {
        self.body["error"]["field"].as_str().unwrap_or("")
    }
}

impl App {
    async fn send(&self, request: Request<Body>) -> Reply {
        let response = self.users.router().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, body }
    }

    async fn register(&self, body: Value) -> Reply {
        self.register_raw("application/json", body.to_string())
            .await
    }

    async fn register_raw(&self, content_type: &str, body: String) -> Reply {
        let request = Request::post("/user/register")
            .header("content-type", content_type)
            .body(Body::from(body))
            .unwrap();
        self.send(request).await
    }

    async fn users(&self) -> i64 {
        sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(self.broker.database().reader())
            .await
            .unwrap()
    }

    async fn events(&self) -> u64 {
        self.broker.depth(QUEUE).await.unwrap()
    }

    /// The events on the queue, in order.
    async fn published(&self) -> Vec<Delivery> {
        self.broker.receive(QUEUE, 100).await.unwrap()
    }

    /// Sends `body`, expects it refused with `status` and `code` on
    /// `field`, and checks that nothing was stored or published.
    async fn assert_refused(
        &self,
        body: Value,
        status: StatusCode,
        code: &str,
        field: &str,
    ) {
        let (users, events) = (self.users().await, self.events().await);
        let reply = self.register(body.clone()).await;
        assert_eq!(reply.status, status, "{body} -> {}", reply.body);
        assert_eq!(reply.error_code(), code, "{body} -> {}", reply.body);
        assert_eq!(reply.error_field(), field, "{body} -> {}", reply.body);
        assert!(reply.body["error"]["message"].as_str().is_some());
        assert_eq!(self.users().await, users, "a refusal stored a user");
        assert_eq!(self.events().await, events, "a refusal published");
    }
}

fn alice() -> Value {
    json!({
        "user_id": "alice@example.com",
        "user_name": "Alice",
        "user_password": "correct horse battery",
    })
}

fn with(mut body: Value, field: &str, value: Value) -> Value {
    body[field] = value;
    body
}

fn without(mut body: Value, field: &str) -> Value {
    body.as_object_mut().unwrap().remove(field);
    body
}

#[tokio::test]
async fn a_valid_registration_is_created_with_its_event() {
    let app = spawn_app().await;
    let reply = app.register(alice()).await;

    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(
        reply.body,
        json!({"message": "User registered", "user_id": "alice@example.com"})
    );
    assert_eq!(app.users().await, 1);
    let events = app.published().await;
    assert_eq!(events.len(), 1);
    let envelope = &events[0].envelope;
    assert_eq!(envelope.event_type, "user.registered.v1");
    assert_eq!(envelope.source, "/herald/users");
    assert_eq!(envelope.subject.as_deref(), Some("alice@example.com"));
    assert!(envelope.traceparent.is_some());
    let event: UserRegistered = envelope.decode().unwrap();
    assert_eq!(event.email, "alice@example.com");
    assert_eq!(event.user_name, "Alice");
}

#[tokio::test]
async fn the_password_and_its_hash_never_leave_the_service() {
    let app = spawn_app().await;
    let reply = app.register(alice()).await;
    assert!(!reply.body.to_string().contains("horse"));

    let events = app.published().await;
    let payload = String::from_utf8(events[0].envelope.data.clone()).unwrap();
    assert!(!payload.contains("horse"), "{payload}");
    assert!(!payload.contains("argon2"), "{payload}");

    let stored: String = sqlx::query_scalar("SELECT password_hash FROM users")
        .fetch_one(app.broker.database().reader())
        .await
        .unwrap();
    assert!(stored.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"));
}

#[tokio::test]
async fn the_address_is_email_when_given_else_the_user_id() {
    let app = spawn_app().await;
    let body = json!({
        "user_id": "bob", "user_name": "Bob",
        "user_password": "correct horse battery", "email": "bob@example.com",
    });
    assert_eq!(app.register(body).await.status, StatusCode::CREATED);
    let body = with(alice(), "email", json!("alice.work@example.com"));
    assert_eq!(app.register(body).await.status, StatusCode::CREATED);

    let emails: Vec<String> = app
        .published()
        .await
        .iter()
        .map(|d| d.envelope.decode::<UserRegistered>().unwrap().email)
        .collect();
    assert_eq!(emails, ["bob@example.com", "alice.work@example.com"]);
}

#[tokio::test]
async fn a_registration_without_any_address_is_refused() {
    let app = spawn_app().await;
    let body = with(alice(), "user_id", json!("alice"));
    app.assert_refused(
        body.clone(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "no_address",
        "email",
    )
    .await;
    let body = with(body, "email", Value::Null);
    app.assert_refused(
        body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "no_address",
        "email",
    )
    .await;
}

#[tokio::test]
async fn user_ids_outside_the_rules_are_refused() {
    let app = spawn_app().await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    for (user_id, code) in [
        (json!(""), "too_short"),
        (json!("a".repeat(65)), "too_long"),
        (json!("alice smith"), "invalid_characters"),
        (json!("alice#1"), "invalid_characters"),
        (json!("zoë"), "invalid_characters"),
        (json!(42), "wrong_type"),
    ] {
        let body = with(alice(), "user_id", user_id);
        let body = with(body, "email", json!("alice@example.com"));
        app.assert_refused(body, unprocessable, code, "user_id")
            .await;
    }
    app.assert_refused(
        without(alice(), "user_id"),
        unprocessable,
        "missing",
        "user_id",
    )
    .await;
    let longest = with(alice(), "user_id", json!("a".repeat(64)));
    let longest = with(longest, "email", json!("a@example.com"));
    assert_eq!(app.register(longest).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn user_names_outside_the_rules_are_refused() {
    let app = spawn_app().await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    for (name, code) in [
        (json!(""), "too_short"),
        (json!("   "), "too_short"),
        (json!("名".repeat(101)), "too_long"),
        (json!("Alice\r\nBcc: eve@example.com"), "invalid_characters"),
        (json!("Alice\nSmith"), "invalid_characters"),
        (json!("Al\u{0007}ice"), "invalid_characters"),
        (json!(["Alice"]), "wrong_type"),
    ] {
        let body = with(alice(), "user_name", name);
        app.assert_refused(body, unprocessable, code, "user_name")
            .await;
    }
    app.assert_refused(
        without(alice(), "user_name"),
        unprocessable,
        "missing",
        "user_name",
    )
    .await;
}

#[tokio::test]
async fn user_names_are_trimmed_and_may_be_100_characters_of_any_script() {
    let app = spawn_app().await;
    let name = "名".repeat(100);
    let body = with(alice(), "user_name", json!(format!("  {name}\t")));
    assert_eq!(app.register(body).await.status, StatusCode::CREATED);
    let event: UserRegistered =
        app.published().await[0].envelope.decode().unwrap();
    assert_eq!(event.user_name, name);
}

#[tokio::test]
async fn passwords_outside_8_to_1024_characters_are_refused() {
    let app = spawn_app().await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    for (password, code) in [
        (json!("1234567"), "too_short"),
        (json!("x".repeat(1025)), "too_long"),
        (json!(12345678), "wrong_type"),
    ] {
        let body = with(alice(), "user_password", password);
        app.assert_refused(body, unprocessable, code, "user_password")
            .await;
    }
    app.assert_refused(
        without(alice(), "user_password"),
        unprocessable,
        "missing",
        "user_password",
    )
    .await;
    let shortest = with(alice(), "user_password", json!("12345678"));
    assert_eq!(app.register(shortest).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn invalid_email_addresses_are_refused() {
    let app = spawn_app().await;
    let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
    let too_long = format!("{}@{}.com", "a".repeat(64), "b".repeat(186));
    for (email, code) in [
        (json!("not-an-address"), "invalid_email"),
        (json!("alice@"), "invalid_email"),
        (json!("alice@localhost"), "invalid_email"),
        (json!("a b@example.com"), "invalid_email"),
        (json!(too_long), "too_long"),
        (json!(7), "wrong_type"),
    ] {
        let body = with(alice(), "email", email);
        app.assert_refused(body, unprocessable, code, "email").await;
    }
}

#[tokio::test]
async fn locales_other_than_en_and_zh_cn_are_refused() {
    let app = spawn_app().await;
    let body = with(alice(), "locale", json!("fr"));
    app.assert_refused(
        body,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unsupported_locale",
        "locale",
    )
    .await;
    let body = with(alice(), "locale", json!("en"));
    assert_eq!(app.register(body).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn unknown_fields_are_ignored() {
    let app = spawn_app().await;
    let body = with(alice(), "favourite_colour", json!("teal"));
    assert_eq!(app.register(body).await.status, StatusCode::CREATED);
}

#[tokio::test]
async fn the_reply_is_in_chinese_for_the_zh_cn_locale() {
    let app = spawn_app().await;
    let reply = app.register(with(alice(), "locale", json!("zh-CN"))).await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(reply.body["message"], "用户注册成功");
    let event: UserRegistered =
        app.published().await[0].envelope.decode().unwrap();
    assert_eq!(event.locale, contracts::Locale::SimplifiedChinese);
}

#[tokio::test]
async fn the_reply_follows_accept_language_when_no_locale_is_given() {
    let app = spawn_app().await;
    let request = |body: Value, languages: &str| {
        Request::post("/user/register")
            .header("content-type", "application/json")
            .header("accept-language", languages)
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let reply = app.send(request(alice(), "zh-CN,zh;q=0.9,en;q=0.8")).await;
    assert_eq!(reply.body["message"], "用户注册成功");

    let bob = json!({"user_id": "bob@example.com", "user_name": "Bob",
                     "user_password": "correct horse battery"});
    let reply = app.send(request(bob, "en-GB,zh;q=0.5")).await;
    assert_eq!(reply.body["message"], "User registered");

    let carol = json!({"user_id": "carol@example.com", "user_name": "Carol",
                       "user_password": "correct horse battery",
                       "locale": "en"});
    let reply = app.send(request(carol, "zh-CN")).await;
    assert_eq!(reply.body["message"], "User registered");
}

#[tokio::test]
async fn a_taken_user_id_or_address_is_refused_with_409() {
    let app = spawn_app().await;
    assert_eq!(app.register(alice()).await.status, StatusCode::CREATED);

    app.assert_refused(
        alice(),
        StatusCode::CONFLICT,
        "already_registered",
        "user_id",
    )
    .await;
    let shouting = with(alice(), "user_id", json!("ALICE@EXAMPLE.COM"));
    let shouting = with(shouting, "email", json!("other@example.com"));
    app.assert_refused(
        shouting,
        StatusCode::CONFLICT,
        "already_registered",
        "user_id",
    )
    .await;
    let same_address = json!({
        "user_id": "alice2", "user_name": "Alice",
        "user_password": "correct horse battery",
        "email": "Alice@Example.com",
    });
    app.assert_refused(
        same_address,
        StatusCode::CONFLICT,
        "already_registered",
        "email",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_concurrent_registrations_of_one_user_id_create_one_user() {
    let app = spawn_app().await;
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..20 {
        // Different addresses, so that only the user id collides.
        let body =
            with(alice(), "email", json!(format!("alice{i}@example.com")));
        let router = app.users.router();
        attempts.spawn(async move {
            let request = Request::post("/user/register")
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            router.oneshot(request).await.unwrap().status()
        });
    }
    let statuses = attempts.join_all().await;

    let count = |status| statuses.iter().filter(|s| **s == status).count();
    assert_eq!(count(StatusCode::CREATED), 1, "{statuses:?}");
    assert_eq!(count(StatusCode::CONFLICT), 19, "{statuses:?}");
    assert_eq!(app.users().await, 1);
    assert_eq!(app.events().await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_taken_address_style_user_id_is_reported_as_the_user_id_however_it_races()
 {
    let app = spawn_app().await;
    let mut attempts = tokio::task::JoinSet::new();
    for i in 0..20 {
        // The same address-style id in different letter cases: both the
        // id and the address it stands for collide.
        let id: String = "samecase@example.com"
            .chars()
            .enumerate()
            .map(|(n, c)| {
                if (n + i) % 2 == 0 {
                    c.to_ascii_uppercase()
                } else {
                    c
                }
            })
            .collect();
        let router = app.users.router();
        let body = with(alice(), "user_id", json!(id));
        attempts.spawn(async move {
            let request = Request::post("/user/register")
                .header("content-type", "application/json")
                .body(Body::from(body.to_string()))
                .unwrap();
            let response = router.oneshot(request).await.unwrap();
            let status = response.status();
            let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            let body: Value = serde_json::from_slice(&bytes).unwrap();
            (status, body["error"]["field"].as_str().map(str::to_owned))
        });
    }
    let outcomes = attempts.join_all().await;
    let created = outcomes.iter().filter(|(s, _)| *s == StatusCode::CREATED);
    assert_eq!(created.count(), 1, "{outcomes:?}");
    for (status, field) in
        outcomes.iter().filter(|(s, _)| *s != StatusCode::CREATED)
    {
        assert_eq!(*status, StatusCode::CONFLICT);
        assert_eq!(field.as_deref(), Some("user_id"), "{outcomes:?}");
    }
}

#[tokio::test]
async fn a_body_over_16_kib_is_refused_with_413() {
    let app = spawn_app().await;
    // Found while reading, with no Content-Length to go by.
    let padded = with(alice(), "padding", json!("x".repeat(16 * 1024)));
    app.assert_refused(
        padded.clone(),
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        "",
    )
    .await;

    // Refused up front when the Content-Length says so.
    let body = padded.to_string();
    let request = Request::post("/user/register")
        .header("content-type", "application/json")
        .header("content-length", body.len())
        .body(Body::from(body))
        .unwrap();
    let reply = app.send(request).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.users().await, 0);
}

#[tokio::test]
async fn a_body_that_is_not_json_is_refused_with_415() {
    let app = spawn_app().await;
    for content_type in ["text/plain", "application/x-www-form-urlencoded", ""]
    {
        let reply = app.register_raw(content_type, alice().to_string()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
        assert_eq!(reply.error_code(), "unsupported_media_type");
    }
    for content_type in [
        "application/json; charset=latin1",
        "application/json; charset=utf-16",
    ] {
        let reply = app.register_raw(content_type, alice().to_string()).await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{content_type:?}"
        );
    }
    for encoding in ["gzip", "br"] {
        let request = Request::post("/user/register")
            .header("content-type", "application/json")
            .header("content-encoding", encoding)
            .body(Body::from(alice().to_string()))
            .unwrap();
        let reply = app.send(request).await;
        assert_eq!(
            reply.status,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "{encoding}"
        );
    }
    assert_eq!(app.users().await, 0);

    let reply = app
        .register_raw("application/json; charset=UTF-8", alice().to_string())
        .await;
    assert_eq!(reply.status, StatusCode::CREATED);
    assert_eq!(app.users().await, 1);
}

#[tokio::test]
async fn malformed_json_is_refused_with_400() {
    let app = spawn_app().await;
    for body in ["{", "{\"user_id\": }", "", "nul", "[1,2]", "\"text\"", "42"] {
        let reply = app.register_raw("application/json", body.into()).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "{body:?}");
        assert_eq!(reply.error_code(), "malformed_json");
    }
    assert_eq!(app.users().await, 0);
    assert_eq!(app.events().await, 0);
}

#[tokio::test]
async fn no_bad_input_gets_a_500() {
    let app = spawn_app().await;
    let bodies = [
        "\u{feff}{}",
        "{\"user_id\": \"\\ud800\"}",
        "{\"user_id\": null, \"user_name\": null}",
        "{\"user_id\": {}, \"user_password\": []}",
        "{\"user_id\": \"a@b.co\", \"user_name\": \"\\u0000\", \"user_password\": \"12345678\"}",
        "{\"user_id\": \"a@b.co\", \"user_name\": \"x\", \"user_password\": \"12345678\", \"locale\": 5}",
        "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
    ];
    for body in bodies {
        let reply = app.register_raw("application/json", body.into()).await;
        assert!(
            reply.status.is_client_error(),
            "{body:?} -> {}",
            reply.status
        );
    }
    assert_eq!(app.users().await, 0);
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let app = spawn_app().await;
    let get = |path: &str| Request::get(path).body(Body::empty()).unwrap();
    let reply = app.send(get("/healthz")).await;
    assert_eq!(
        (reply.status, reply.body["status"].as_str()),
        (StatusCode::OK, Some("ok"))
    );
    let reply = app.send(get("/readyz")).await;
    assert_eq!(reply.status, StatusCode::OK);

    app.broker.database().close().await;
    let reply = app.send(get("/readyz")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(reply.body["checks"]["store"], false);
    assert_eq!(app.send(get("/healthz")).await.status, StatusCode::OK);
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let app = spawn_app().await;
    let reply = app
        .send(Request::get("/nope").body(Body::empty()).unwrap())
        .await;
    assert_eq!(
        (reply.status, reply.error_code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let reply = app
        .send(Request::get("/user/register").body(Body::empty()).unwrap())
        .await;
    assert_eq!(reply.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(reply.error_code(), "method_not_allowed");
}
