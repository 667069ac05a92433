//! `--metrics-addr`: Prometheus metrics, `/healthz` and `/readyz`, on
//! hyper's HTTP/1 server (the hyper 1 the AWS SDK already builds on).
//!
//! - Routes match the path alone; a query string is ignored
//!   (`/metrics?x=1` is `/metrics`). Unknown paths are 404.
//! - `GET` and `HEAD` (the same status and headers, no body); any other
//!   method is 405 with `Allow: GET, HEAD`.
//! - `/metrics` is the Prometheus text format (0.0.4), or OpenMetrics when
//!   the scraper's `Accept` asks for `application/openmetrics-text`
//!   (Prometheus does). Both are encoded by `prometheus-client` from a
//!   [`Registry`]: see [`process`], and the run's `pipeline::Stats`, for
//!   what is in it.
//! - `/readyz` checks the database (a ping) and the key-encryption key (for
//!   AWS KMS a `DescribeKey`), at most once per [`READY_TTL`] whatever the
//!   probe rate: the result is cached, and probes that arrive while a check
//!   runs wait for that check instead of starting their own. An
//!   unauthenticated scrape loop can therefore never spend the account's
//!   KMS request quota.
//! - One request per connection (`Connection: close`), at most
//!   [`MAX_CONNECTIONS`] connections at once (more wait in the listen
//!   queue), request headers within [`HEADER_TIMEOUT`], a connection closed
//!   after [`CONNECTION_TIMEOUT`] whatever it is doing.
//! - Cancelling the run's token stops accepting; requests being answered
//!   get up to [`SHUTDOWN_GRACE`] to finish.
//!
//! This module names neither the pipeline nor the store (both depend on it):
//! what to encode comes as a [`Registry`], and the database as a [`Probe`].

pub mod build;
pub mod process;
pub mod registry;

pub use registry::Registry;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ACCEPT, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::crypto::KeyWrapper;

/// How long a `/readyz` result is reused.
pub const READY_TTL: Duration = Duration::from_secs(5);
/// The longest one readiness check (database or KMS) may take.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of a connection.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(15);
/// Time requests being answered get to finish at shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
const OPENMETRICS_TEXT: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

/// The running server: its address, and a task that ends once it has shut
/// down (after the token is cancelled).
pub struct Server {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Server {
    /// Waits for the shutdown that cancelling the token started.
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

struct State {
    metrics: Arc<dyn AsRef<Registry> + Send + Sync>,
    readiness: Readiness,
}

/// Binds now (so a taken port is a start-up error) and serves until `stop`.
/// `metrics` is what the run counts (its `Stats`), `database` what
/// `/readyz` pings (its store).
pub async fn serve<M, D>(
    addr: SocketAddr,
    metrics: Arc<M>,
    database: Arc<D>,
    wrapper: Arc<dyn KeyWrapper>,
    stop: CancellationToken,
) -> anyhow::Result<Server>
where
    M: AsRef<Registry> + Send + Sync + 'static,
    D: Probe + ?Sized + 'static,
{
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "serving /metrics, /healthz, /readyz");
    let state = Arc::new(State {
        metrics,
        readiness: Readiness::new(Arc::new(database), wrapper),
    });
    let task = tokio::spawn(accept_loop(listener, state, stop));
    Ok(Server { addr: local, task })
}

async fn accept_loop(listener: TcpListener, state: Arc<State>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.keep_alive(false)
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT);
    let http = Arc::new(http);
    loop {
        // A free slot first, then a connection: past the limit, clients
        // wait in the kernel's listen queue.
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("semaphore never closed"),
            _ = stop.cancelled() => break,
        };
        let stream = tokio::select! {
            c = listener.accept() => match c {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a little
                    // rather than spin.
                    tracing::warn!(error = %e, "metrics server: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => break,
        };
        let (state, stop, http) = (state.clone(), stop.clone(), http.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(respond(&req, &state).await) }
            });
            let conn = http.serve_connection(TokioIo::new(stream), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(CONNECTION_TIMEOUT) => {}
                _ = stop.cancelled() => {}
            }
            // Finish the request in hand (if any), then close.
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        });
    }
    drop(listener);
    // Every connection returns its slot when it ends.
    let _ = tokio::time::timeout(SHUTDOWN_GRACE, slots.acquire_many(MAX_CONNECTIONS as u32)).await;
}

async fn respond(req: &Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = text(
            StatusCode::METHOD_NOT_ALLOWED,
            PLAIN_TEXT,
            "GET or HEAD only\n",
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    // For HEAD, hyper sends the headers (with this body's length) and no body.
    match req.uri().path() {
        "/metrics" => {
            let openmetrics = req
                .headers()
                .get_all(ACCEPT)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains("application/openmetrics-text"));
            if openmetrics {
                text(
                    StatusCode::OK,
                    OPENMETRICS_TEXT,
                    (*state.metrics).as_ref().render_openmetrics(),
                )
            } else {
                text(
                    StatusCode::OK,
                    PROMETHEUS_TEXT,
                    (*state.metrics).as_ref().render_prometheus(),
                )
            }
        }
        "/healthz" => text(StatusCode::OK, PLAIN_TEXT, "ok\n"),
        "/readyz" => {
            let r = state.readiness.check().await;
            if r.database && r.kms {
                text(StatusCode::OK, PLAIN_TEXT, "ready\n")
            } else {
                let word = |ok, not| if ok { "ok" } else { not };
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    PLAIN_TEXT,
                    format!(
                        "database: {}\nkms: {}\n",
                        word(r.database, "unreachable or refusing writes"),
                        word(r.kms, "unreachable")
                    ),
                )
            }
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN_TEXT, "not found\n"),
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// The outcome of one readiness check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ready {
    pub database: bool,
    pub kms: bool,
}

/// A dependency `/readyz` checks: answering or not. The database's is
/// implemented beside the pipeline's `Stats`, since this module sits below
/// the store and cannot name it.
pub trait Probe: Send + Sync {
    /// Whether the dependency answers; [`Readiness`] bounds the wait.
    fn answers(&self) -> BoxFuture<'_, bool>;
}

impl<P: Probe + ?Sized> Probe for Arc<P> {
    fn answers(&self) -> BoxFuture<'_, bool> {
        (**self).answers()
    }
}

/// `/readyz`'s checks, cached for [`READY_TTL`]; concurrent callers share
/// one check (they queue on the lock the check runs under, then find its
/// result fresh). Failures are cached too: a dependency that is down is
/// exactly when probes must not pile onto it.
pub struct Readiness {
    database: Arc<dyn Probe>,
    wrapper: Arc<dyn KeyWrapper>,
    last: Mutex<Option<(Instant, Ready)>>,
}

impl Readiness {
    pub fn new(database: Arc<dyn Probe>, wrapper: Arc<dyn KeyWrapper>) -> Self {
        Readiness {
            database,
            wrapper,
            last: Mutex::new(None),
        }
    }

    pub async fn check(&self) -> Ready {
        let mut last = self.last.lock().await;
        if let Some((at, ready)) = *last {
            if at.elapsed() < READY_TTL {
                return ready;
            }
        }
        let (db, kms) = tokio::join!(
            tokio::time::timeout(CHECK_TIMEOUT, self.database.answers()),
            tokio::time::timeout(CHECK_TIMEOUT, self.wrapper.check()),
        );
        let ready = Ready {
            database: matches!(db, Ok(true)),
            kms: matches!(kms, Ok(Ok(()))),
        };
        *last = Some((Instant::now(), ready));
        ready
    }
}
