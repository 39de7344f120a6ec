//! The ops listener (`server.admin_listen`, SPEC §5).
//!
//! Open: `GET /health` (liveness, upstream health, effective split), `GET /ready` (503 while
//! starting or draining), `GET /metrics` (Prometheus text).
//! Bearer token (compared in constant time): `GET|PUT|DELETE /admin/split`,
//! `POST /admin/rollback`, `POST /admin/ramp`, `GET /admin/status`, `GET /admin/explain`,
//! `GET /admin/shadow`, `GET /admin/audit`, `GET /admin/cluster`.
//! Bodies are JSON; bad input is a 400 `{"error": ...}`, an unknown route name a 404.
//! Every change goes through `control` (with a shared store, through the cluster's
//! compare-and-swap); nothing here writes routing state itself.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

pub use super::error::ApiError;
use crate::app::App;
use crate::config::Percent;
use crate::control::{Control, Op, RampAction};
use crate::metrics::RollbackTrigger;
use crate::routing::{bucket_for, random_bucket, Reason};
use crate::upstream::VastaiUpstream;
use crate::vocab::Backend;

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// The ops router. `admin_addr` is the ops listener's own address, for the checks of
/// [`super::origin`].
pub fn router(app: Arc<App>, admin_addr: std::net::SocketAddr) -> Router {
    let listener = Arc::new(super::origin::Listener {
        addr: admin_addr,
        token: app.admin_token.is_some(),
    });
    let admin = Router::new()
        .route(
            "/admin/split",
            get(get_split).put(put_split).delete(delete_split),
        )
        .route("/admin/rollback", post(rollback))
        .route("/admin/ramp", post(ramp))
        .route("/admin/status", get(status))
        .route("/admin/explain", get(explain))
        .route("/admin/shadow", get(shadow))
        .route("/admin/audit", get(audit))
        .route("/admin/cluster", get(cluster))
        .route("/admin/{*rest}", axum::routing::any(not_found))
        .route_layer(middleware::from_fn_with_state(
            Arc::clone(&app),
            authenticate,
        ))
        .route_layer(middleware::from_fn_with_state(
            listener,
            super::origin::check,
        ));
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .merge(admin)
        .fallback(not_found)
        .with_state(app)
}

async fn authenticate(State(app): State<Arc<App>>, req: Request, next: Next) -> Response {
    let Some(token) = &app.admin_token else {
        // No token: only reachable because the listener is loopback (checked at start).
        return next.run(req).await;
    };
    // The scheme is case-insensitive (RFC 9110 §11.1).
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map_or("", |(_, t)| t.trim());
    if bool::from(given.as_bytes().ct_eq(token.as_bytes())) {
        next.run(req).await
    } else {
        let mut resp = ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token".into(),
        )
        .into_response();
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer"),
        );
        resp
    }
}

async fn not_found() -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "not found".into())
}

async fn health(State(app): State<Arc<App>>) -> Response {
    let snapshot = app.control.snapshot();
    let upstreams = &snapshot.upstreams;
    let vastai_target = match &upstreams.vastai {
        VastaiUpstream::Http(up) => up.base().map(|b| b.to_string()),
        VastaiUpstream::Serverless(s) => Some(format!("serverless endpoint {}", s.endpoint)),
    };
    let split = app.control.split_document();
    Json(json!({
        "status": "ok",
        "upstreams": {
            "legacy": {
                "healthy": app.health.is_healthy(Backend::Legacy),
                "target": upstreams.legacy.base().map(|b| b.to_string()),
            },
            "vastai": {
                "healthy": app.health.is_healthy(Backend::Vastai),
                "target": vastai_target,
                "serverless": match &upstreams.vastai {
                    VastaiUpstream::Serverless(s) => Some(s.state()),
                    VastaiUpstream::Http(_) => None,
                },
            },
        },
        "split": split,
        "state": {
            "persisted": split.persisted,
            "error": app.control.persist_error(),
        },
        "store": app.cluster_document().store,
    }))
    .into_response()
}

async fn ready(State(app): State<Arc<App>>) -> Response {
    if app.is_ready() {
        (StatusCode::OK, Json(json!({"ready": true}))).into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false})),
        )
            .into_response()
    }
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

async fn get_split(State(app): State<Arc<App>>) -> Response {
    Json(app.control.split_document()).into_response()
}

/// Parses a JSON body into `T`, answering 400 on anything malformed. An empty body is `{}`.
fn parse_body<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    serde_json::from_slice(body).map_err(|e| bad_request(format!("invalid JSON body: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SplitBody {
    percent: Option<serde_json::Value>,
    route: Option<String>,
    reason: Option<String>,
}

fn parse_percent(v: Option<serde_json::Value>) -> Result<Percent, ApiError> {
    let v = v.ok_or_else(|| bad_request("percent is required"))?;
    let n = v
        .as_f64()
        .ok_or_else(|| bad_request(format!("percent must be a number, got {v}")))?;
    Percent::try_from(n).map_err(|e| bad_request(e.to_string()))
}

fn check_reason(reason: &Option<String>) -> Result<(), ApiError> {
    match reason {
        Some(r) if r.chars().count() > 1000 => {
            Err(bad_request("reason is longer than 1000 characters"))
        }
        _ => Ok(()),
    }
}

/// Runs a change of control's state off the runtime's threads: it ends in a file write and an
/// `fsync`, which must not stall the requests those threads serve.
async fn blocking<T: Send + 'static>(
    app: &Arc<App>,
    change: impl FnOnce(&Control) -> T + Send + 'static,
) -> Result<T, ApiError> {
    let app = Arc::clone(app);
    tokio::task::spawn_blocking(move || change(&app.control))
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the change failed".into(),
            )
        })
}

/// An operator's change: through the shared store's compare-and-swap when there is one (503
/// when it does not answer), else applied here and written to the state file.
async fn change(
    app: &Arc<App>,
    op: Op,
) -> Result<Option<crate::control::store::RampProgress>, ApiError> {
    match &app.cluster {
        Some(cluster) => Ok(cluster.write(&op).await?),
        None => Ok(blocking(app, move |c| c.execute(&op)).await??.1),
    }
}

async fn put_split(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let b: SplitBody = parse_body(&body)?;
    let percent = parse_percent(b.percent)?;
    check_reason(&b.reason)?;
    let op = Op::Set {
        route: b.route,
        percent,
        reason: b.reason,
    };
    change(&app, op).await?;
    Ok(Json(app.control.split_document()).into_response())
}

async fn delete_split(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    if let Some(k) = q
        .keys()
        .find(|k| k.as_str() != "route" && k.as_str() != "reason")
    {
        return Err(bad_request(format!("unknown query parameter {k:?}")));
    }
    let op = Op::Clear {
        route: q.get("route").cloned(),
        reason: q.get("reason").cloned(),
    };
    change(&app, op).await?;
    Ok(Json(app.control.split_document()).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackBody {
    reason: Option<String>,
}

async fn rollback(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let b: RollbackBody = parse_body(&body)?;
    check_reason(&b.reason)?;
    let doc = blocking(&app, move |c| c.rollback(RollbackTrigger::Admin, b.reason)).await?;
    let Some(cluster) = &app.cluster else {
        return Ok(Json(doc).into_response());
    };
    // Applied here at once; every other replica follows once the store has it (SPEC §9).
    // A store known to be away is not waited for: the answer says so at once.
    let wait = if cluster.connected() {
        cluster.write_bound()
    } else {
        std::time::Duration::from_millis(200)
    };
    let propagated = match app.control.pending() {
        Some((seq, _)) => cluster.flushed(seq, wait).await,
        None => true,
    };
    let mut body = serde_json::to_value(app.control.split_document())
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    body["propagated"] = json!(propagated);
    Ok(Json(body).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RampBody {
    action: Option<String>,
}

async fn ramp(State(app): State<Arc<App>>, body: Bytes) -> Result<Response, ApiError> {
    let b: RampBody = parse_body(&body)?;
    let action = match b.action.as_deref() {
        Some("start") => None,
        Some("pause") => Some(RampAction::Pause),
        Some("resume") => Some(RampAction::Resume),
        Some("abort") => Some(RampAction::Abort),
        Some(other) => {
            return Err(bad_request(format!(
                "action must be start, pause, resume or abort, got {other:?}"
            )))
        }
        None => return Err(bad_request("action is required")),
    };
    let op = match action {
        None => Op::RampStart,
        Some(a) => Op::Ramp(a),
    };
    let progress = change(&app, op).await?;
    let config = app.control.config();
    let doc = crate::control::ramp::RampDocument::new(
        progress.as_ref(),
        &config.ramp.steps,
        config.ramp.hold_secs,
    );
    Ok(Json(json!({"ramp": doc, "split": app.control.split_document()})).into_response())
}

async fn status(State(app): State<Arc<App>>) -> Response {
    Json(crate::ops::status::report(&app)).into_response()
}

async fn explain(
    State(app): State<Arc<App>>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let snapshot = app.control.snapshot();
    let table = &snapshot.table;
    let path = q.get("path").map_or("/", String::as_str);
    if !path.starts_with('/') {
        return Err(bad_request("path must start with /"));
    }
    let method = q.get("method").map_or("GET", String::as_str);
    let method =
        http::Method::from_bytes(method.as_bytes()).map_err(|_| bad_request("invalid method"))?;
    let route = table.match_route(&method, path);
    let (bucket, keyed) = match q.get("key") {
        Some(k) => (bucket_for(&table.salt, k), true),
        None => (random_bucket(), false),
    };
    let d = table.decide(route, None, bucket);
    let percent = d.percent.as_f64();
    let reason = match (d.reason, keyed) {
        (Reason::OverrideHeader, _) => "override header".to_string(),
        (Reason::Split, true) => format!(
            "bucket {bucket} {} {} (percent x 100) of route {}",
            if d.backend == Backend::Vastai {
                "<"
            } else {
                ">="
            },
            d.percent.hundredths(),
            table.route_name(route)
        ),
        (Reason::Split, false) => {
            format!("no key: a random bucket per request; {percent}% of such requests go to vastai")
        }
    };
    // The adapter applies to the route's requests to vastai, mirrors included (SPEC §10).
    let adapter = table.route_adapter(route).map(|(a, _)| a.name.as_str());
    Ok(Json(json!({
        "route": table.route_name(route),
        "percent": percent,
        "bucket": bucket,
        "backend": d.backend.as_str(),
        "reason": reason,
        "rolled_back": table.rolled_back,
        "adapter": adapter,
    }))
    .into_response())
}

async fn shadow(State(app): State<Arc<App>>) -> Response {
    let enabled = app.control.snapshot().config.shadow.enabled;
    Json(app.shadow.document(enabled)).into_response()
}

async fn cluster(State(app): State<Arc<App>>) -> Response {
    Json(app.cluster_document()).into_response()
}

async fn audit(State(app): State<Arc<App>>) -> Response {
    Json(app.control.audit_log()).into_response()
}
