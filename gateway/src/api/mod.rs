//! The HTTP API of CONTRACT §3, `/metrics`, `/healthz` and the console, with axum.
//!
//! Every `/api` call needs `Authorization: Bearer <token>` ([`auth`]); what each role may do
//! is in [`allowed`], one table for every route, which the authorization matrix test walks.
//! An owner is scoped to its owner id everywhere: a device, alert or coverage row of another
//! owner answers 403 exactly as one that does not exist, so nothing leaks. Refused changes
//! are written to the audit log. Bodies are parsed by hand so every error is JSON
//! (`{"error": .., "detail": ..}`) with a 4xx status, never a panic.

mod console;
mod permit;
mod sse;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use calwatch_protocol::{AlertKind, AlertState, Id};
use serde::Deserialize;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::domain::role::{Principal, Role};
use crate::ingest::{Command, Input, Refusal};
use crate::metrics::Metrics;
use crate::persist::state::{AlertFilter, AlertReader};
use crate::persist::tokens::Authenticator;
use crate::pipeline::views::{CoverageBy, DeviceQuery, DeviceView};
use crate::LoggedAlert;
use permit::{allowed, Action};

/// Largest JSON body accepted.
pub(crate) const JSON_LIMIT: usize = 64 << 10;
/// Largest CSV import accepted through the API for the bureau's roles (the CLI has no limit)
/// ...
pub(crate) const CSV_LIMIT: usize = 32 << 20;
/// ... and for an owner token.
pub(crate) const OWNER_CSV_LIMIT: usize = 1 << 20;
/// Default and largest page of a list.
pub(crate) const PAGE_DEFAULT: usize = 100;
pub(crate) const PAGE_MAX: usize = 1000;

/// An error answer: `{"error": .., "detail": ..}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub detail: String,
}

impl ApiError {
    fn new(status: StatusCode, error: &'static str, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error,
            detail: detail.into(),
        }
    }
    fn bad_request(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad request", detail)
    }
    fn forbidden(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, "forbidden", detail)
    }
    fn unavailable() -> ApiError {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the gateway is stopping",
        )
    }
    /// A 500: the detail (a database error, a path on the gateway's disk) goes to the log
    /// only; the answer carries an incident number to find it there.
    fn internal(detail: impl Into<String>) -> ApiError {
        static INCIDENTS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let n = INCIDENTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let detail = detail.into();
        tracing::error!(incident = n, %detail, "request failed with an internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error",
            format!("incident {n}: the details are in the gateway's log"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(serde_json::json!({"error": self.error, "detail": self.detail})),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// What the handlers share.
pub(crate) struct ApiState {
    pub auth: Authenticator,
    pub alerts: std::sync::Mutex<AlertReader>,
    pub registry_path: std::path::PathBuf,
    pub commands: mpsc::Sender<Command>,
    pub stream: broadcast::Sender<LoggedAlert>,
    pub metrics: Arc<Metrics>,
    pub metrics_public: bool,
    pub shutdown: watch::Receiver<bool>,
    /// `[ingest] stall_after_s`: `/healthz` answers 503 past it.
    pub stall_after: std::time::Duration,
    /// Open alert streams per token name (see [`sse::STREAMS_PER_TOKEN`]).
    pub streams: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    /// Refusals audited per actor (see [`REFUSALS_PER_MINUTE`]).
    pub refusals: std::sync::Mutex<RefusalLimiter>,
    /// `[checks] timezone`: the days of date-only dates in an imported verifications.csv.
    pub zone: crate::domain::civil::Zone,
}

type Shared = State<Arc<ApiState>>;

/// The router: API, metrics, health, console.
pub(crate) fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/me", get(me))
        .route("/api/devices", get(list_devices).post(register_device))
        .route("/api/devices/:id", get(get_device))
        .route("/api/devices/:id/readings", get(device_readings))
        .route("/api/devices/:id/verifications", post(record_certificate))
        .route("/api/alerts", get(list_alerts))
        .route("/api/alerts/stream", get(sse::stream))
        .route("/api/alerts/:id/ack", post(ack_alert))
        .route("/api/coverage", get(coverage))
        .route(
            "/api/import/devices",
            post(import_devices).layer(DefaultBodyLimit::max(CSV_LIMIT)),
        )
        .route(
            "/api/import/verifications",
            post(import_verifications).layer(DefaultBodyLimit::max(CSV_LIMIT)),
        )
        .merge(console::routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(JSON_LIMIT))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not found", "no such route")
}

/// Liveness of ingest, not only of the process (DESIGN "The gateway never stalls"): 200
/// while ingest makes progress, 503 with the reason when it is stalled (see
/// [`crate::health`]). Anyone may ask; it tells nothing about devices.
async fn healthz(State(st): Shared) -> Response {
    let h = &st.metrics.health;
    let (pending, _) = h.pending();
    let connected = h.is_connected();
    match h.verdict(crate::domain::now_ms(), st.stall_after) {
        Ok(()) => Json(serde_json::json!({
            "status": "ok", "broker_connected": connected, "pending": pending
        }))
        .into_response(),
        Err(stall) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({
                "status": "stalled", "reason": stall.0,
                "broker_connected": connected, "pending": pending
            })),
        )
            .into_response(),
    }
}

fn unauthorized(detail: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", detail)
}

/// The bearer token of the request, as presented.
fn bearer(headers: &HeaderMap) -> ApiResult<&str> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("Authorization: Bearer <token> required"))?;
    let value = value
        .to_str()
        .map_err(|_| unauthorized("malformed Authorization header"))?;
    value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .ok_or_else(|| unauthorized("Authorization: Bearer <token> required"))
}

/// The caller, if its bearer token is good.
fn principal(st: &ApiState, headers: &HeaderMap) -> ApiResult<Principal> {
    st.auth
        .check(bearer(headers)?)
        .ok_or_else(|| unauthorized("unknown, revoked or malformed token"))
}

/// The caller, allowed to do `action`.
fn authorize(st: &ApiState, headers: &HeaderMap, action: Action) -> ApiResult<Principal> {
    let p = principal(st, headers)?;
    if allowed(p.role, action) {
        Ok(p)
    } else {
        Err(ApiError::forbidden(format!(
            "a {} token may not do this",
            p.role.as_str()
        )))
    }
}

/// Sends `make(reply)` to the ingest task and waits for the answer.
async fn ask<T>(st: &ApiState, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> ApiResult<T> {
    let (tx, rx) = oneshot::channel();
    st.commands
        .send(make(tx))
        .await
        .map_err(|_| ApiError::unavailable())?;
    rx.await.map_err(|_| ApiError::unavailable())
}

/// Records a refused change in the audit log, then answers 403.
async fn deny(
    st: &ApiState,
    p: &Principal,
    action: &str,
    subject: &str,
    attempted: &str,
    why: String,
) -> ApiError {
    let admitted = st
        .refusals
        .lock()
        .map(|mut l| l.admit(&p.actor(), crate::domain::now_ms()))
        .unwrap_or(Admit::Audit { suppressed: 0 });
    match admitted {
        Admit::Audit { suppressed } => {
            let mut why_logged = why.clone();
            if suppressed > 0 {
                why_logged.push_str(&format!(
                    " (and {suppressed} earlier refusals of this actor, not audited one by one)"
                ));
            }
            let _ = ask(st, |reply| Command::Denied {
                actor: p.actor(),
                action: action.into(),
                subject: clip(subject, AUDIT_FIELD_MAX),
                attempted: clip(attempted, AUDIT_FIELD_MAX),
                why: clip(&why_logged, AUDIT_FIELD_MAX),
                reply,
            })
            .await;
        }
        Admit::Suppress => {}
    }
    tracing::warn!(actor = %p.actor(), action, subject = %clip(subject, 200), why = %clip(&why, 500), "change refused");
    ApiError::forbidden(why)
}

/// Longest field of a refusal's audit entry: the attempted body is evidence, not a copy.
pub(crate) const AUDIT_FIELD_MAX: usize = 1024;
/// Refusals of one actor audited one by one per minute; beyond, they are counted and the
/// count goes into the actor's next audited refusal.
pub(crate) const REFUSALS_PER_MINUTE: u32 = 20;

/// `text` cut to at most `max` bytes (on a character boundary), saying how long it was.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

/// Whether a refusal is audited.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admit {
    /// Audit it; `suppressed` refusals of the actor before it were not.
    Audit {
        suppressed: u64,
    },
    Suppress,
}

/// Per actor: refusals in the current minute, and those not audited since the last audited.
#[derive(Debug, Default)]
pub(crate) struct RefusalLimiter {
    actors: std::collections::HashMap<String, (i64, u32, u64)>,
}

impl RefusalLimiter {
    pub(crate) fn admit(&mut self, actor: &str, now_ms: i64) -> Admit {
        // Forget idle actors now and then, so the map stays small.
        if self.actors.len() > 10_000 {
            self.actors
                .retain(|_, (start, _, _)| now_ms - *start < 60_000);
        }
        let (start, n, suppressed) = self
            .actors
            .entry(actor.to_owned())
            .or_insert((now_ms, 0, 0));
        if now_ms - *start >= 60_000 {
            *start = now_ms;
            *n = 0;
        }
        if *n < REFUSALS_PER_MINUTE {
            *n += 1;
            Admit::Audit {
                suppressed: std::mem::take(suppressed),
            }
        } else {
            *suppressed += 1;
            Admit::Suppress
        }
    }
}

/// The owner a list or stream is confined to: an owner's own (asking for another's is 403),
/// or the one a bureau role asked for, or none.
fn owner_filter(p: &Principal, asked: Option<String>) -> ApiResult<Option<Id>> {
    match (p.scope(), asked) {
        (Some(own), Some(asked)) if own.as_str() != asked => {
            Err(ApiError::forbidden("owner: not yours"))
        }
        (Some(own), _) => Ok(Some(own.clone())),
        (None, Some(asked)) => Ok(Some(parse_id(&asked, "owner")?)),
        (None, None) => Ok(None),
    }
}

fn parse_id(s: &str, what: &str) -> ApiResult<Id> {
    Id::new(s.to_string()).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
}

fn json_object(body: &[u8]) -> ApiResult<serde_json::Map<String, serde_json::Value>> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body: invalid JSON: {e}")))?;
    match v {
        serde_json::Value::Object(m) => Ok(m),
        other => Err(ApiError::bad_request(format!(
            "body: expected a JSON object, got {}",
            match other {
                serde_json::Value::Array(_) => "an array",
                serde_json::Value::String(_) => "a string",
                serde_json::Value::Number(_) => "a number",
                serde_json::Value::Bool(_) => "a bool",
                _ => "null",
            }
        ))),
    }
}

/// A CSV import's content type, if given, must be CSV (or plain text).
fn csv_type(headers: &HeaderMap) -> ApiResult<()> {
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    {
        let ct = ct.to_ascii_lowercase();
        if !(ct.starts_with("text/csv")
            || ct.starts_with("text/plain")
            || ct.starts_with("application/octet-stream"))
        {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported media type",
                format!("expected text/csv, got {ct}"),
            ));
        }
    }
    Ok(())
}

fn refusal(r: Refusal) -> ApiError {
    match r {
        Refusal::Invalid(e) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", e.to_string())
        }
        Refusal::Forbidden(why) => ApiError::forbidden(why),
        Refusal::Failed(why) => ApiError::internal(why),
    }
}

fn page(limit: Option<usize>, offset: Option<usize>) -> ApiResult<(usize, usize)> {
    let limit = limit.unwrap_or(PAGE_DEFAULT);
    if limit == 0 || limit > PAGE_MAX {
        return Err(ApiError::bad_request(format!("limit: 1 to {PAGE_MAX}")));
    }
    let offset = offset.unwrap_or(0);
    if offset > OFFSET_MAX {
        return Err(ApiError::bad_request(format!("offset: 0 to {OFFSET_MAX}")));
    }
    Ok((limit, offset))
}

/// The largest `offset` of a page: beyond any registry or alert log (and far from where
/// an SQL `OFFSET` or an addition would overflow).
pub(crate) const OFFSET_MAX: usize = 1_000_000_000;

fn query<T: serde::de::DeserializeOwned>(
    q: Result<Query<T>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<T> {
    q.map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("query: {}", e.body_text())))
}

async fn metrics(
    State(st): Shared,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let local = peer.ip().is_loopback();
    if !(st.metrics_public || (local && !headers.contains_key(header::AUTHORIZATION))) {
        authorize(&st, &headers, Action::Metrics)?;
    }
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        st.metrics.render(),
    )
        .into_response())
}

async fn me(State(st): Shared, headers: HeaderMap) -> ApiResult<Json<serde_json::Value>> {
    let p = authorize(&st, &headers, Action::Me)?;
    Ok(Json(serde_json::json!({
        "name": p.name, "role": p.role.as_str(), "owner": p.owner.as_ref().map(Id::as_str),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevicesQuery {
    owner: Option<String>,
    site: Option<String>,
    kind: Option<String>,
    vstate: Option<String>,
    agent: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn list_devices(
    State(st): Shared,
    headers: HeaderMap,
    q: Result<Query<DevicesQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let p = authorize(&st, &headers, Action::ReadDevices)?;
    let q = query(q)?;
    let (limit, offset) = page(q.limit, q.offset)?;
    let owner = owner_filter(&p, q.owner)?;
    let query = DeviceQuery {
        owner,
        site: q.site,
        kind: q.kind,
        vstate: q.vstate,
        agent: q.agent,
        limit,
        offset,
    };
    let page = ask(&st, |reply| Command::Devices { query, reply }).await?;
    Ok(Json(page).into_response())
}

/// Answer for a device the caller may not see or that does not exist: the same 403 for an
/// owner either way (no probing of other owners' ids), 404 for the bureau's roles.
fn no_device(p: &Principal, id: &str) -> ApiError {
    match p.role {
        Role::Owner => ApiError::forbidden(format!("device {id}: not among yours")),
        _ => ApiError::new(StatusCode::NOT_FOUND, "not found", format!("device {id}")),
    }
}

/// The device `id` if the caller may see it; otherwise [`no_device`].
async fn visible_device(st: &ApiState, p: &Principal, id: &str) -> ApiResult<DeviceView> {
    let id = parse_id(id, "device id")?;
    let view = ask(st, |reply| Command::Device {
        id: id.to_string(),
        reply,
    })
    .await?;
    match view {
        Some(v) if p.sees(&v.owner) => Ok(v),
        _ => Err(no_device(p, id.as_str())),
    }
}

async fn get_device(
    State(st): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let p = authorize(&st, &headers, Action::ReadDevices)?;
    Ok(Json(visible_device(&st, &p, &id).await?).into_response())
}

async fn device_readings(
    State(st): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let p = authorize(&st, &headers, Action::ReadDevices)?;
    // Ownership first: watching costs memory, an owner may not start it for another's device.
    let view = visible_device(&st, &p, &id).await?;
    let recent = ask(&st, |reply| Command::Readings {
        id: view.id.clone(),
        reply,
    })
    .await?;
    recent
        .map(|r| Json(r).into_response())
        .ok_or_else(|| no_device(&p, &view.id))
}

async fn register_device(
    State(st): Shared,
    headers: HeaderMap,
    body: Bytes,
) -> ApiResult<Response> {
    let p = principal(&st, &headers)?;
    if !allowed(p.role, Action::RegisterDevice) {
        let why = format!("a {} token may not register devices", p.role.as_str());
        return Err(deny(
            &st,
            &p,
            "device.register",
            "-",
            &String::from_utf8_lossy(&body),
            why,
        )
        .await);
    }
    let object = json_object(&body)?;
    let subject = object
        .get("id")
        .and_then(|v| v.as_str())
        .unwrap_or("-")
        .to_string();
    let actor = p.actor();
    let scope = p.scope().cloned();
    let result = ask(&st, |reply| Command::Register {
        input: Input::Json {
            device: None,
            object,
        },
        scope,
        actor,
        reply,
    })
    .await?;
    match result {
        Ok(ids) => {
            let id = ids
                .into_iter()
                .next()
                .map(|i| i.to_string())
                .unwrap_or_default();
            let view = ask(&st, |reply| Command::Device { id, reply }).await?;
            Ok((StatusCode::CREATED, Json(view)).into_response())
        }
        Err(Refusal::Forbidden(why)) => Err(deny(
            &st,
            &p,
            "device.register",
            &subject,
            &String::from_utf8_lossy(&body),
            why,
        )
        .await),
        Err(r) => Err(refusal(r)),
    }
}

async fn record_certificate(
    State(st): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Response> {
    let p = principal(&st, &headers)?;
    if !allowed(p.role, Action::RecordCertificate) {
        let why = format!(
            "a {} token may not record certificates; only verifiers do",
            p.role.as_str()
        );
        return Err(deny(
            &st,
            &p,
            "certificate.record",
            &id,
            &String::from_utf8_lossy(&body),
            why,
        )
        .await);
    }
    let id = parse_id(&id, "device id")?;
    let object = json_object(&body)?;
    let (verifier, actor) = (p.name.clone(), p.actor());
    let result = ask(&st, |reply| Command::Record {
        input: Input::Json {
            device: Some(id.to_string()),
            object,
        },
        verifier,
        actor,
        reply,
    })
    .await?;
    match result {
        Ok(_) => {
            let view = ask(&st, |reply| Command::Device {
                id: id.to_string(),
                reply,
            })
            .await?;
            Ok((StatusCode::CREATED, Json(view)).into_response())
        }
        Err(r) => Err(refusal(r)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportQuery {
    /// File name used in errors (default `devices.csv` / `verifications.csv`).
    name: Option<String>,
}

fn import_name(q: Option<String>, default: &str) -> ApiResult<String> {
    match q {
        None => Ok(default.into()),
        Some(n)
            if !n.is_empty()
                && n.len() <= 128
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) =>
        {
            Ok(n)
        }
        Some(_) => Err(ApiError::bad_request("name: [A-Za-z0-9._-]{1,128}")),
    }
}

async fn import_devices(
    State(st): Shared,
    headers: HeaderMap,
    q: Result<Query<ImportQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Body,
) -> ApiResult<Response> {
    import(&st, &headers, q, body, ImportKind::Devices).await
}

async fn import_verifications(
    State(st): Shared,
    headers: HeaderMap,
    q: Result<Query<ImportQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Body,
) -> ApiResult<Response> {
    import(&st, &headers, q, body, ImportKind::Verifications).await
}

/// The largest CSV a role may import through the API: an owner registers its own stations
/// and market stalls (1 MiB is some 5,000 devices), the bureau a city at once.
pub(crate) fn csv_limit(role: Role) -> usize {
    match role {
        Role::Owner => OWNER_CSV_LIMIT,
        _ => CSV_LIMIT,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ImportKind {
    Devices,
    Verifications,
}

/// A CSV import through the API: all or nothing, `file:line: reason` on a bad row; a
/// refused one (role, or an owner's file naming another owner) is audited.
async fn import(
    st: &ApiState,
    headers: &HeaderMap,
    q: Result<Query<ImportQuery>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Body,
    kind: ImportKind,
) -> ApiResult<Response> {
    let (action, audit_action, default_name) = match kind {
        ImportKind::Devices => (Action::ImportDevices, "device.import", "devices.csv"),
        ImportKind::Verifications => (
            Action::ImportVerifications,
            "certificate.import",
            "verifications.csv",
        ),
    };
    // Authorised first: the token and the role are checked before a byte of the body is read.
    let p = principal(st, headers)?;
    let attempted = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .map_or_else(
            || "a body of undeclared size".to_owned(),
            |n| format!("{n} bytes"),
        );
    if !allowed(p.role, action) {
        let why = match kind {
            ImportKind::Devices => format!("a {} token may not import devices", p.role.as_str()),
            ImportKind::Verifications => format!(
                "a {} token may not record certificates; only verifiers do",
                p.role.as_str()
            ),
        };
        return Err(deny(st, &p, audit_action, default_name, &attempted, why).await);
    }
    let file = import_name(query(q)?.name, default_name)?;
    csv_type(headers)?;
    let limit = csv_limit(p.role);
    let body = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload too large",
            format!(
                "{file}: at most {limit} bytes through the API for a {} token (larger files: calwatch-gateway import)",
                p.role.as_str()
            ),
        )
    })?;
    let text = String::from_utf8(body.to_vec())
        .map_err(|e| ApiError::bad_request(format!("body: not UTF-8: {e}")))?;
    // Parsed and checked row by row here, off the ingest task (linear); the ingest task
    // checks the owner's rights first, then what needs the registry, and writes.
    let name = file.clone();
    let zone = st.zone.clone();
    let input = tokio::task::spawn_blocking(move || {
        let path = std::path::Path::new(&name);
        match kind {
            ImportKind::Devices => {
                crate::domain::input::parse_device_rows(path, &text).map(|rows| Input::DeviceRows {
                    file: name.clone(),
                    rows,
                })
            }
            ImportKind::Verifications => {
                crate::domain::input::parse_verification_rows(path, &text, &zone).map(|rows| {
                    Input::CertificateRows {
                        file: name.clone(),
                        rows,
                    }
                })
            }
        }
    })
    .await
    .map_err(|e| ApiError::internal(format!("import task: {e}")))?
    .map_err(|e| refusal(Refusal::Invalid(e)))?;
    let actor = p.actor();
    let result = match kind {
        ImportKind::Devices => {
            let scope = p.scope().cloned();
            ask(st, |reply| Command::Register {
                input,
                scope,
                actor,
                reply,
            })
            .await?
        }
        ImportKind::Verifications => {
            let verifier = p.name.clone();
            ask(st, |reply| Command::Record {
                input,
                verifier,
                actor,
                reply,
            })
            .await?
        }
    };
    match result {
        Ok(ids) => {
            Ok(Json(serde_json::json!({"imported": ids.len(), "file": file})).into_response())
        }
        Err(Refusal::Forbidden(why)) => {
            Err(deny(st, &p, audit_action, &file, &attempted, why).await)
        }
        Err(r) => Err(refusal(r)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AlertsQuery {
    state: Option<String>,
    kind: Option<String>,
    owner: Option<String>,
    device: Option<String>,
    limit: Option<usize>,
    offset: Option<usize>,
}

async fn list_alerts(
    State(st): Shared,
    headers: HeaderMap,
    q: Result<Query<AlertsQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let p = authorize(&st, &headers, Action::ReadAlerts)?;
    let q = query(q)?;
    let (limit, offset) = page(q.limit, q.offset)?;
    if let Some(s) = &q.state {
        if !["active", "acknowledged", "resolved"].contains(&s.as_str()) {
            return Err(ApiError::bad_request(
                "state: active, acknowledged or resolved",
            ));
        }
    }
    if let Some(k) = &q.kind {
        if !AlertKind::ALL.iter().any(|x| x.as_str() == k) {
            return Err(ApiError::bad_request(format!(
                "kind: unknown alert kind {k:?}"
            )));
        }
    }
    let owner = owner_filter(&p, q.owner)?.map(|o| o.to_string());
    if let Some(d) = &q.device {
        parse_id(d, "device")?;
    }
    let filter = AlertFilter {
        state: q.state,
        kind: q.kind,
        owner,
        device: q.device,
    };
    let st2 = st.clone();
    let (items, total) = tokio::task::spawn_blocking(move || {
        st2.alerts
            .lock()
            .map_err(|_| ApiError::internal("alert reader poisoned"))?
            .alerts(&filter, limit, offset)
            .map_err(|e| ApiError::internal(e.to_string()))
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))??;
    let items: Vec<serde_json::Value> = items
        .iter()
        .filter_map(|e| serde_json::from_slice(&e.encode()).ok())
        .collect();
    Ok(
        Json(serde_json::json!({"items": items, "total": total, "limit": limit, "offset": offset}))
            .into_response(),
    )
}

async fn ack_alert(
    State(st): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let p = principal(&st, &headers)?;
    if !allowed(p.role, Action::AckAlert) {
        let why = format!("a {} token may not acknowledge alerts", p.role.as_str());
        return Err(deny(&st, &p, "alert.ack", &id, "null", why).await);
    }
    if id.len() > 64 || !id.starts_with("a-") {
        return Err(ApiError::bad_request("alert id: a-NNNNNN"));
    }
    let actor = p.name.clone();
    let result = ask(&st, |reply| Command::Ack {
        id: id.clone(),
        actor,
        reply,
    })
    .await?;
    match result {
        Ok(e) => Ok(Json(
            serde_json::from_slice::<serde_json::Value>(&e.encode()).unwrap_or_default(),
        )
        .into_response()),
        Err(e) => {
            // Resolved already, or no such alert.
            let known = st
                .alerts
                .lock()
                .ok()
                .and_then(|r| r.alert(&id).ok().flatten());
            match known {
                Some(a) if a.state == AlertState::Resolved => Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "conflict",
                    format!("alert {id} is resolved"),
                )),
                _ => Err(ApiError::new(
                    StatusCode::NOT_FOUND,
                    "not found",
                    e.to_string(),
                )),
            }
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CoverageQuery {
    by: Option<String>,
}

async fn coverage(
    State(st): Shared,
    headers: HeaderMap,
    q: Result<Query<CoverageQuery>, axum::extract::rejection::QueryRejection>,
) -> ApiResult<Response> {
    let p = authorize(&st, &headers, Action::ReadCoverage)?;
    let q = query(q)?;
    let by_s = q.by.unwrap_or_else(|| "owner".into());
    let by =
        CoverageBy::parse(&by_s).ok_or_else(|| ApiError::bad_request("by: owner, site or kind"))?;
    let owner = p.scope().cloned();
    let rows = ask(&st, |reply| Command::Coverage { by, owner, reply }).await?;
    Ok(Json(serde_json::json!({"by": by_s, "items": rows})).into_response())
}

/// Why the HTTP server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("http: cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("http: {0}")]
    Tls(String),
    #[error("http: {0}")]
    Setup(String),
}

/// A running HTTP server.
pub(crate) struct Server {
    pub addr: SocketAddr,
    pub https: bool,
    pub task: tokio::task::JoinHandle<()>,
}

/// Starts the API on `cfg.listen` (HTTPS when a certificate is configured).
pub(crate) async fn serve(
    cfg: &crate::config::HttpConfig,
    state: Arc<ApiState>,
) -> Result<Server, ServeError> {
    let listener = tokio::net::TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| ServeError::Listen {
            addr: cfg.listen.clone(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|e| ServeError::Setup(e.to_string()))?;
    let shutdown = state.shutdown.clone();
    let app = router(state);
    let tls = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => Some(tokio_rustls::TlsAcceptor::from(tls_config(cert, key)?)),
        _ => None,
    };
    let https = tls.is_some();
    let task = tokio::spawn(serve_connections(listener, tls, app, shutdown));
    Ok(Server { addr, https, task })
}

fn tls_config(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<Arc<rustls::ServerConfig>, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<_, _>>())
        .map_err(|e| ServeError::Tls(format!("cert_file {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!(
            "cert_file {}: no certificate",
            cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| ServeError::Tls(format!("key_file {}: {e}", key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| ServeError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| ServeError::Tls(format!("certificate and key: {e}")))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves one connection until it ends; at the shutdown, lets the request in flight finish.
async fn serve_io<I, S, B>(
    builder: &hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    io: I,
    service: S,
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
        > + Send,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let stopped = async {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::select! {
        r = conn.as_mut() => r,
        () = stopped => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    }
}

/// A client gets this long to send a request's headers (TLS handshake included), on a new
/// connection and between the requests of a kept-alive one: a slowloris holds nothing longer.
pub(crate) const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// ... and this long from the headers to the response's headers (reading the body, the work).
/// A stream's body (SSE) is not bounded by it.
pub(crate) const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// Connections served at once; the next waits in the listen backlog.
pub(crate) const MAX_CONNECTIONS: usize = 4096;

/// The accept loop of the API, HTTP or (with an acceptor) HTTPS: hyper with a header-read
/// timeout and a request timeout on both.
async fn serve_connections(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    mut shutdown: watch::Receiver<bool>,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    use tower_service::Service;
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
        };
        let tls = tls.clone();
        let app = app.clone();
        let mut stop = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(
                move |mut req: hyper::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(ConnectInfo(peer));
                    let mut app = app.clone();
                    async move {
                        let call = app.call(req.map(axum::body::Body::new));
                        match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
                            Ok(r) => r,
                            Err(_) => Ok(ApiError::new(
                                StatusCode::REQUEST_TIMEOUT,
                                "request timeout",
                                format!(
                                    "the request took longer than {} s",
                                    REQUEST_TIMEOUT.as_secs()
                                ),
                            )
                            .into_response()),
                        }
                    }
                },
            );
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT);
            let served = match tls {
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "tls handshake failed");
                                return;
                            }
                            Err(_) => return,
                        };
                    serve_io(&builder, TokioIo::new(stream), service, &mut stop).await
                }
                None => serve_io(&builder, TokioIo::new(tcp), service, &mut stop).await,
            };
            if let Err(e) = served {
                tracing::debug!(%peer, error = %e, "http connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue #19: every refused POST stored its whole body (up to 64 KiB) in the audit log,
    /// as often as a client cared to send it.
    #[test]
    fn refusals_are_clipped_and_rate_limited_per_actor() {
        let body = "é".repeat(40_000);
        let c = clip(&body, AUDIT_FIELD_MAX);
        assert!(c.len() < AUDIT_FIELD_MAX + 32, "{}", c.len());
        assert!(c.ends_with("… (80000 bytes)"), "{}", &c[c.len() - 40..]);
        assert_eq!(clip("short", AUDIT_FIELD_MAX), "short");
        let mut l = RefusalLimiter::default();
        for _ in 0..REFUSALS_PER_MINUTE {
            assert_eq!(l.admit("owner:a", 0), Admit::Audit { suppressed: 0 });
        }
        assert_eq!(l.admit("owner:a", 1_000), Admit::Suppress);
        assert_eq!(l.admit("owner:a", 2_000), Admit::Suppress);
        // Another actor is not held back by the first.
        assert_eq!(l.admit("owner:b", 2_000), Admit::Audit { suppressed: 0 });
        // The next minute: audited again, with the count of what was not.
        assert_eq!(l.admit("owner:a", 60_000), Admit::Audit { suppressed: 2 });
        assert_eq!(l.admit("owner:a", 60_001), Admit::Audit { suppressed: 0 });
    }

    #[test]
    fn an_offset_beyond_any_page_is_a_bad_request() {
        assert_eq!(page(None, None).unwrap(), (PAGE_DEFAULT, 0));
        assert_eq!(page(Some(5), Some(OFFSET_MAX)).unwrap(), (5, OFFSET_MAX));
        for offset in [OFFSET_MAX + 1, usize::MAX] {
            let e = page(None, Some(offset)).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{offset}");
            assert!(e.detail.starts_with("offset: "), "{}", e.detail);
        }
    }

    #[tokio::test]
    async fn a_500_answer_does_not_carry_the_detail() {
        let detail = "registry /var/lib/calwatch/registry.db: disk I/O error";
        let r = refusal(Refusal::Failed(detail.into())).into_response();
        assert_eq!(r.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(
            !body.contains("/var/lib") && !body.contains("registry.db"),
            "{body}"
        );
        assert!(body.contains("incident "), "{body}");
    }
}
