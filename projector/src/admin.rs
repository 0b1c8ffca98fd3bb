//! The admin HTTP API: the operator actions of `ledger-admin`, under `/admin` on the
//! projector's status port, for callers presenting an API key with the `admin` scope (or
//! the break-glass `ADMIN_TOKEN`, when configured) as `Authorization: Bearer <key>`.
//! Dead-letter actions are audited under the key's name (and `X-Actor`, if sent).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Extension;
use axum::Router;
use ledger_platform::auth::{self, ApiKey, Auth, Guard, Scope};
use ledger_platform::http::{Json, Path, Problem};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sqlx::PgPool;

use crate::ops::{dead_letters, overview, rebuild, replay, OpError};

/// A rebuild started over the API, as its progress is reported.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Job {
    /// Still running.
    pub running: bool,
    /// A dry run.
    pub dry_run: bool,
    /// Latest progress.
    pub progress: rebuild::Progress,
    /// The report once finished.
    pub report: Option<rebuild::Report>,
    /// A rebuild of several projections in one pass (`all`, or names separated by commas):
    /// each one's report once finished (each also has its own job, under its name).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub reports: Vec<rebuild::Report>,
    /// The error, if it failed.
    pub error: Option<String>,
}

/// State of the admin routes.
#[derive(Clone)]
pub struct AdminState {
    pool: PgPool,
    /// The data keys rebuilds, replays and retries decrypt with.
    keys: ledger_pii::KeyStore,
    jobs: Arc<Mutex<HashMap<String, Job>>>,
    batch_size: i64,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState").finish_non_exhaustive()
    }
}

/// The admin routes, behind API keys with the `admin` scope (or the break-glass
/// `ADMIN_TOKEN`); `auth` says how keys are checked and rate limited.
pub fn router(pool: PgPool, keys: ledger_pii::KeyStore, auth: Auth, batch_size: i64) -> Router {
    let state = AdminState {
        pool,
        keys,
        jobs: Arc::default(),
        batch_size,
    };
    let guard = Guard {
        auth: std::sync::Arc::new(auth),
        scope: Scope::Admin,
    };
    Router::new()
        .route("/admin/projections", get(projections))
        .route(
            "/admin/projections/{name}/rebuild",
            post(start_rebuild).get(rebuild_job),
        )
        .route("/admin/projections/{name}/replay", post(replay_range))
        .route("/admin/dead-letters", get(list_letters))
        .route("/admin/dead-letters/{id}", get(show_letter))
        .route("/admin/dead-letters/{id}/retry", post(retry_letter))
        .route("/admin/dead-letters/{id}/skip", post(skip_letter))
        .route_layer(middleware::from_fn_with_state(guard, auth::require))
        .with_state(state)
}

/// Who acts: the API key's name, and the `X-Actor` the caller names (a person), if any.
fn actor(key: Option<&ApiKey>, headers: &axum::http::HeaderMap) -> String {
    let key = key.map_or("admin-api", |k| k.name.as_str());
    headers
        .get("x-actor")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 100)
        .map_or_else(|| key.to_owned(), |v| format!("{key}:{v}"))
}

fn problem(err: OpError) -> Problem {
    match err {
        OpError::UnknownProjection(_) | OpError::NoSuchDeadLetter(_) => Problem::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found",
            err.to_string(),
        ),
        OpError::AlreadyRunning(_) => Problem::new(
            StatusCode::CONFLICT,
            "already_running",
            "Already running",
            err.to_string(),
        ),
        OpError::Invalid(_) => Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            "Invalid request",
            err.to_string(),
        ),
        OpError::Unavailable(_) => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "service_unavailable",
            "Service unavailable",
            err.to_string(),
        ),
        OpError::Kafka(_) | OpError::Database(_) | OpError::Keyring(_) | OpError::Keys(_) => {
            tracing::error!(error = %err, "admin operation failed");
            Problem::internal()
        }
    }
}

async fn projections(State(state): State<AdminState>) -> Result<axum::Json<Value>, Problem> {
    let states = overview::overview(&state.pool)
        .await
        .map_err(|e| problem(e.into()))?;
    Ok(axum::Json(json!({ "projections": states })))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RebuildQuery {
    #[serde(default)]
    dry_run: bool,
}

async fn start_rebuild(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Query(query): Query<RebuildQuery>,
) -> Result<Response, Problem> {
    let selected = rebuild::selection(&name).map_err(problem)?;
    if selected.len() > 1 {
        return start_rebuild_in_one_pass(state, name, selected, query.dry_run);
    }
    {
        let mut jobs = state.jobs.lock().map_err(|_| Problem::internal())?;
        if jobs.get(&name).is_some_and(|j| j.running) {
            return Err(problem(OpError::AlreadyRunning(name)));
        }
        jobs.insert(
            name.clone(),
            Job {
                running: true,
                dry_run: query.dry_run,
                ..Job::default()
            },
        );
    }
    let jobs = state.jobs.clone();
    let pool = state.pool.clone();
    let keys = state.keys.clone();
    let batch_size = state.batch_size;
    let projection = name.clone();
    tokio::spawn(async move {
        let progress_jobs = jobs.clone();
        let progress_name = projection.clone();
        let result = rebuild::rebuild(
            &pool,
            &keys,
            &projection,
            batch_size,
            query.dry_run,
            move |progress| {
                if let Ok(mut jobs) = progress_jobs.lock() {
                    if let Some(job) = jobs.get_mut(&progress_name) {
                        job.progress = progress;
                    }
                }
            },
        )
        .await;
        if let Ok(mut jobs) = jobs.lock() {
            if let Some(job) = jobs.get_mut(&projection) {
                job.running = false;
                match result {
                    Ok(report) => {
                        job.progress = report.progress;
                        job.report = Some(report);
                    }
                    Err(err) => job.error = Some(err.to_string()),
                }
            }
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"projection": name, "started": true, "dry_run": query.dry_run})),
    )
        .into_response())
}

/// `POST /admin/projections/all/rebuild` (or several names separated by commas): one pass
/// over the log for all of them (ADR 0018). Each projection's job shows its own progress
/// and report; the job under `name` shows the slowest one's progress and all the reports.
fn start_rebuild_in_one_pass(
    state: AdminState,
    name: String,
    selected: Vec<&'static str>,
    dry_run: bool,
) -> Result<Response, Problem> {
    if dry_run {
        return Err(problem(OpError::Invalid(
            "a dry run compares one projection at a time: name one".into(),
        )));
    }
    {
        let mut jobs = state.jobs.lock().map_err(|_| Problem::internal())?;
        if let Some(running) = std::iter::once(name.as_str())
            .chain(selected.iter().copied())
            .find(|n| jobs.get(*n).is_some_and(|j| j.running))
        {
            return Err(problem(OpError::AlreadyRunning(running.to_owned())));
        }
        for job in std::iter::once(name.as_str()).chain(selected.iter().copied()) {
            jobs.insert(
                job.to_owned(),
                Job {
                    running: true,
                    ..Job::default()
                },
            );
        }
    }
    let jobs = state.jobs.clone();
    let pool = state.pool.clone();
    let keys = state.keys.clone();
    let batch_size = state.batch_size;
    let all = name.clone();
    let projections = selected.clone();
    let projections_started = selected.clone();
    tokio::spawn(async move {
        let progress_jobs = jobs.clone();
        let progress_all = all.clone();
        let watched = projections.clone();
        let result = rebuild::rebuild_many(
            &pool,
            &keys,
            &projections,
            batch_size,
            move |projection, progress| {
                if let Ok(mut jobs) = progress_jobs.lock() {
                    if let Some(job) = jobs.get_mut(projection) {
                        job.progress = progress;
                    }
                    let slowest = watched
                        .iter()
                        .filter_map(|p| jobs.get(*p).map(|j| j.progress))
                        .min_by_key(|p| p.events);
                    if let (Some(slowest), Some(job)) = (slowest, jobs.get_mut(&progress_all)) {
                        job.progress = slowest;
                    }
                }
            },
        )
        .await;
        if let Ok(mut jobs) = jobs.lock() {
            match result {
                Ok(reports) => {
                    for report in &reports {
                        if let Some(job) = jobs.get_mut(&report.projection) {
                            job.running = false;
                            job.progress = report.progress;
                            job.report = Some(report.clone());
                        }
                    }
                    if let Some(job) = jobs.get_mut(&all) {
                        job.running = false;
                        job.reports = reports;
                    }
                }
                Err(err) => {
                    for job in std::iter::once(all.as_str()).chain(selected.iter().copied()) {
                        if let Some(job) = jobs.get_mut(job) {
                            job.running = false;
                            job.error = Some(err.to_string());
                        }
                    }
                }
            }
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(json!({"projection": name, "projections": projections_started, "started": true, "dry_run": false})),
    )
        .into_response())
}

async fn rebuild_job(
    State(state): State<AdminState>,
    Path(name): Path<String>,
) -> Result<axum::Json<Job>, Problem> {
    rebuild::selection(&name).map_err(problem)?;
    let job = state
        .jobs
        .lock()
        .map_err(|_| Problem::internal())?
        .get(&name)
        .cloned()
        .ok_or_else(|| {
            Problem::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "Not found",
                format!("no rebuild of {name} was started here"),
            )
        })?;
    Ok(axum::Json(job))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    from: i64,
    to: Option<i64>,
}

async fn replay_range(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    Json(body): Json<ReplayBody>,
) -> Result<axum::Json<replay::ReplayReport>, Problem> {
    let report = replay::replay(
        &state.pool,
        &state.keys,
        &name,
        body.from,
        body.to.unwrap_or(i64::MAX),
    )
    .await
    .map_err(problem)?;
    Ok(axum::Json(report))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    status: Option<String>,
    limit: Option<i64>,
}

async fn list_letters(
    State(state): State<AdminState>,
    Query(query): Query<ListQuery>,
) -> Result<axum::Json<Value>, Problem> {
    let status = query.status.unwrap_or_else(|| "pending".into());
    let status = (status != "all").then_some(status.as_str());
    let letters = dead_letters::list(
        &state.pool,
        status,
        query.limit.unwrap_or(100).clamp(1, 1000),
    )
    .await
    .map_err(problem)?;
    Ok(axum::Json(json!({ "dead_letters": letters })))
}

async fn show_letter(
    State(state): State<AdminState>,
    Path(id): Path<i64>,
) -> Result<axum::Json<dead_letters::Shown>, Problem> {
    Ok(axum::Json(
        dead_letters::show(&state.pool, id).await.map_err(problem)?,
    ))
}

async fn retry_letter(
    State(state): State<AdminState>,
    Path(id): Path<i64>,
    key: Option<Extension<ApiKey>>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<dead_letters::Shown>, Problem> {
    let actor = actor(key.as_ref().map(|k| &k.0), &headers);
    Ok(axum::Json(
        dead_letters::retry(&state.pool, &state.keys, id, &actor)
            .await
            .map_err(problem)?,
    ))
}

async fn skip_letter(
    State(state): State<AdminState>,
    Path(id): Path<i64>,
    key: Option<Extension<ApiKey>>,
    headers: axum::http::HeaderMap,
) -> Result<axum::Json<dead_letters::Shown>, Problem> {
    let actor = actor(key.as_ref().map(|k| &k.0), &headers);
    Ok(axum::Json(
        dead_letters::skip(&state.pool, id, &actor)
            .await
            .map_err(problem)?,
    ))
}
