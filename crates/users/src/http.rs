//! The users service's HTTP API.
//!
//! - `POST /user/register`: register a user (see [`register`]).
//! - `GET /healthz`: the process is alive.
//! - `GET /readyz`: the store and the bus are usable.
//!
//! Every error is JSON, `{"error": {"code", "message", "field"}}`, with its
//! status mapped in one place ([`ApiError`]'s `IntoResponse`).
//!
//! Every request runs in a span that continues the caller's trace (its
//! `traceparent` header) or starts a new one, and is counted and timed by
//! route template, method and status.

use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Extension, MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Serialize;
use serde_json::{Map, Value, json};
use tracing::Instrument;
use tracing::field::Empty;

use crate::domain::{
    EmailAddress, FieldError, Locale, Password, UserId, UserName, parse_locale,
    preferred_locale,
};
use crate::store::{NewUser, StoreError, Taken};
use crate::{TraceContext, Users};
use herald::BusError;

/// The largest registration body accepted.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

/// How long a client may take to send its body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a readiness check may take before it counts as a failure.
const READY_TIMEOUT: Duration = Duration::from_secs(2);

pub fn router(users: Users) -> Router {
    Router::new()
        .route("/user/register", post(register))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(observe))
        .with_state(users)
}

/// The users service's name in metrics and logs.
pub const SERVICE: &str = "users";

/// Runs a request in its span and records its metrics. The route label is
/// the route's template, never the raw path, so that it stays bounded.
async fn observe(mut request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", MatchedPath::as_str)
        .to_owned();
    let method = method_label(request.method());
    let span = tracing::info_span!(
        "request",
        method,
        route = route.as_str(),
        trace_id = Empty,
        span_id = Empty,
        parent_id = Empty,
        event_id = Empty,
    );
    let parent = incoming_trace(request.headers());
    let trace = herald::trace::continue_trace(&span, parent);
    request.extensions_mut().insert(trace);

    let started = Instant::now();
    let response = next.run(request).instrument(span).await;
    let status = response.status().as_u16();
    herald::metrics::http_request(
        SERVICE,
        method,
        route,
        status,
        started.elapsed(),
    );
    response
}

/// The method as a label: one of the standard methods, else `OTHER`.
fn method_label(method: &Method) -> &'static str {
    const STANDARD: [Method; 9] = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    STANDARD
        .iter()
        .find(|standard| *standard == method)
        .map_or("OTHER", |standard| standard.as_str())
}

/// Registers a user: validates the body, hashes the password, stores the
/// user and its `user.registered` event together, and answers 201.
async fn register(
    State(users): State<Users>,
    Extension(trace): Extension<TraceContext>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // Refuse what is not JSON or too big before reading any of it.
    check_json(&headers)?;
    let body = read_limited(body, &headers).await?;
    let fields = parse_object(&body)?;

    let accepted = headers
        .get(header::ACCEPT_LANGUAGE)
        .and_then(|v| v.to_str().ok())
        .and_then(preferred_locale);
    let registration = Registration::parse(&fields, accepted)?;

    // Answer a known duplicate before spending a hash on it.
    let Registration {
        user_id,
        user_name,
        email,
        locale,
        password,
    } = registration;
    if let Some(taken) = users.store.find_taken(&user_id, &email).await? {
        return Err(StoreError::Taken(taken).into());
    }

    let password_hash = users
        .hasher
        .hash(password)
        .await
        .map_err(|e| ApiError::Unexpected(e.to_string()))?;
    let user = NewUser {
        user_id,
        user_name,
        email,
        locale,
        password_hash,
    };
    let event_id = users.register(&user, trace).await?;

    // A user id may be an email address, so logs name the event instead.
    tracing::Span::current().record("event_id", event_id.to_string());
    tracing::info!("user registered");
    let message = match locale {
        Locale::English => "User registered",
        Locale::SimplifiedChinese => "用户注册成功",
    };
    let body = json!({ "message": message, "user_id": user.user_id.as_str() });
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

/// A registration request, every field checked.
struct Registration {
    user_id: UserId,
    user_name: UserName,
    password: Password,
    email: EmailAddress,
    locale: Locale,
}

impl Registration {
    /// Checks the fields in a fixed order and reports the first rule
    /// broken. The address is `email` when given, else `user_id` when that
    /// is an address. The locale is the `locale` field, else the one
    /// `Accept-Language` prefers, else English.
    fn parse(
        fields: &Map<String, Value>,
        accepted: Option<Locale>,
    ) -> Result<Self, FieldError> {
        let user_id = UserId::parse(required(fields, "user_id")?)?;
        let user_name = UserName::parse(required(fields, "user_name")?)?;
        let password = Password::parse(required(fields, "user_password")?)?;

        let email = match optional(fields, "email")? {
            Some(text) => EmailAddress::parse(text, "email")?,
            None => EmailAddress::parse(user_id.as_str(), "user_id").map_err(
                |_| FieldError {
                    field: "email",
                    code: "no_address",
                    message: "email is required when user_id is not an \
                              email address"
                        .into(),
                },
            )?,
        };
        let locale = match optional(fields, "locale")? {
            Some(text) => parse_locale(text)?,
            None => accepted.unwrap_or_default(),
        };
        Ok(Registration {
            user_id,
            user_name,
            password,
            email,
            locale,
        })
    }
}

fn required<'a>(
    fields: &'a Map<String, Value>,
    field: &'static str,
) -> Result<&'a str, FieldError> {
    optional(fields, field)?.ok_or_else(|| FieldError {
        field,
        code: "missing",
        message: format!("{field} is required"),
    })
}

/// A string field, absent when missing or null.
fn optional<'a>(
    fields: &'a Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, FieldError> {
    match fields.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(FieldError {
            field,
            code: "wrong_type",
            message: format!("{field} must be a string"),
        }),
    }
}

/// Accepts `application/json` (or `application/*+json`) in UTF-8, not
/// compressed: anything else would be misread, so it is refused up front.
fn check_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let refuse = |why: &str| Err(ApiError::UnsupportedMediaType(why.into()));
    let mut content_types = headers.get_all(header::CONTENT_TYPE).iter();
    let content_type = content_types
        .next()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_types.next().is_some() {
        return refuse("send one Content-Type, application/json");
    }
    let mut parts = content_type.split(';');
    let essence = parts.next().unwrap_or("").trim().to_ascii_lowercase();
    let json = essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"));
    if !json {
        return refuse("send the body as application/json");
    }

    let charset = parts
        .filter_map(|p| p.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case("charset"))
        .map(|(_, value)| value.trim().trim_matches('"').to_ascii_lowercase());
    if charset.is_some_and(|c| c != "utf-8" && c != "utf8") {
        return refuse("only UTF-8 JSON is accepted");
    }

    // Every coding named in every Content-Encoding or Transfer-Encoding
    // header must be one that leaves the bytes as they are.
    let codings = |name| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.to_str().unwrap_or("?").split(','))
            .map(|c| c.trim().to_ascii_lowercase())
            .collect::<Vec<_>>()
    };
    let compressed = codings(header::CONTENT_ENCODING)
        .iter()
        .any(|c| c != "identity")
        || codings(header::TRANSFER_ENCODING)
            .iter()
            .any(|c| c != "chunked" && c != "identity");
    if compressed {
        return refuse("compressed bodies are not accepted; send plain JSON");
    }
    Ok(())
}

/// Reads the body, refusing it as soon as it is known to be too large.
async fn read_limited(
    body: Body,
    headers: &HeaderMap,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
        return Err(ApiError::TooLarge);
    }
    let read = tokio::time::timeout(
        BODY_TIMEOUT,
        axum::body::to_bytes(body, MAX_BODY_BYTES),
    );
    match read.await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::TooLarge),
        Err(_) => Err(ApiError::BodyTimeout),
    }
}

fn parse_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    if std::str::from_utf8(body).is_err() {
        return Err(ApiError::UnsupportedMediaType(
            "the body is not UTF-8; only UTF-8 JSON is accepted".into(),
        ));
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(fields)) => Ok(fields),
        Ok(_) => {
            Err(ApiError::Malformed("the body must be a JSON object".into()))
        }
        Err(e) => Err(ApiError::Malformed(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// The caller's trace context: its one `traceparent` header, when well
/// formed. Two of them are as good as none.
fn incoming_trace(headers: &HeaderMap) -> Option<TraceContext> {
    let mut values = headers.get_all("traceparent").iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    TraceContext::parse(value)
}

async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

async fn readyz(State(users): State<Users>) -> Response {
    let (store, bus) = tokio::join!(
        within_ready_timeout(users.store.is_usable()),
        within_ready_timeout(users.bus_ready()),
    );
    let status = if store && bus {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut checks = json!({ "store": store, "bus": bus });
    if let Some(broker) = users.relay_target_ready().await {
        checks["broker"] = json!(broker);
    }
    let body = json!({
        "status": if status == StatusCode::OK { "ready" } else { "unavailable" },
        "checks": checks,
    });
    (status, Json(body)).into_response()
}

/// A check that cannot answer quickly has failed: a write lock held
/// elsewhere should make the service unready, not the probe slow.
async fn within_ready_timeout(check: impl Future<Output = bool>) -> bool {
    tokio::time::timeout(READY_TIMEOUT, check)
        .await
        .unwrap_or(false)
}

async fn not_found() -> ApiError {
    ApiError::NotFound
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Every way a request can fail, mapped to a status in one place.
#[derive(Debug)]
pub enum ApiError {
    Malformed(String),
    TooLarge,
    /// The body did not arrive in time.
    BodyTimeout,
    UnsupportedMediaType(String),
    Invalid(FieldError),
    Taken(Taken),
    NotFound,
    MethodNotAllowed,
    /// The store or the bus cannot take the registration now; retrying
    /// later may work.
    Unavailable(String),
    /// A failure that is not the client's; details go to the log only.
    Unexpected(String),
}

impl From<FieldError> for ApiError {
    fn from(error: FieldError) -> Self {
        ApiError::Invalid(error)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Taken(taken) => ApiError::Taken(taken),
            StoreError::NoSubscriber => ApiError::Unavailable(
                "no consumer is bound to user.registered".into(),
            ),
            StoreError::Database(e) if herald::db::is_unavailable(&e) => {
                ApiError::Unavailable(herald::error_chain(&e))
            }
            StoreError::Bus(BusError::Database(e))
                if herald::db::is_unavailable(&e) =>
            {
                ApiError::Unavailable(herald::error_chain(&e))
            }
            other => ApiError::Unexpected(herald::error_chain(&other)),
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, field) = match &self {
            ApiError::Malformed(why) => (
                StatusCode::BAD_REQUEST,
                "malformed_json",
                why.as_str(),
                None,
            ),
            ApiError::TooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "body_too_large",
                "the body is larger than 16 KiB",
                None,
            ),
            ApiError::BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the body did not arrive within 10 seconds",
                None,
            ),
            ApiError::UnsupportedMediaType(why) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                why.as_str(),
                None,
            ),
            ApiError::Invalid(e) => (
                StatusCode::UNPROCESSABLE_ENTITY,
                e.code,
                e.message.as_str(),
                Some(e.field),
            ),
            ApiError::Taken(Taken::UserId) => (
                StatusCode::CONFLICT,
                "already_registered",
                "this user_id is already registered",
                Some("user_id"),
            ),
            ApiError::Taken(Taken::Email) => (
                StatusCode::CONFLICT,
                "already_registered",
                "this email address is already registered",
                Some("email"),
            ),
            ApiError::NotFound => {
                (StatusCode::NOT_FOUND, "not_found", "no such route", None)
            }
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this route does not take that method",
                None,
            ),
            ApiError::Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the service cannot take registrations right now; \
                 try again shortly",
                None,
            ),
            ApiError::Unexpected(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "something went wrong on our side",
                None,
            ),
        };

        match &self {
            ApiError::Unavailable(why) | ApiError::Unexpected(why) => {
                tracing::error!(error = why.as_str(), "registration failed");
            }
            _ => tracing::debug!(
                target: "users::rejected",
                status = status.as_u16(),
                code,
                field,
                "request rejected"
            ),
        }
        let body = json!({ "error": ErrorBody { code, message, field } });
        let mut response = (status, Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                header::HeaderValue::from_static("1"),
            );
        }
        response
    }
}
