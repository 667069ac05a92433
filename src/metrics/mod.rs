//! `--metrics-addr`: Prometheus metrics, `/healthz` and `/readyz`.
//!
//! A deliberately tiny HTTP/1.1 responder (GET only, one request per
//! connection): three fixed routes do not justify a web framework in a
//! binary that handles key material.

pub mod process;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::crypto::KeyWrapper;
use crate::pipeline::Stats;
use crate::store::Store;

/// Binds now (so a taken port is a start-up error) and serves until `stop`.
pub async fn serve(
    addr: SocketAddr,
    stats: Arc<Stats>,
    store: Arc<dyn Store>,
    wrapper: Arc<dyn KeyWrapper>,
    stop: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on --metrics-addr {addr}: {e}"))?;
    let local = listener.local_addr()?;
    tracing::info!(addr = %local, "serving /metrics, /healthz, /readyz");
    tokio::spawn(async move {
        loop {
            let conn = tokio::select! {
                c = listener.accept() => c,
                _ = stop.cancelled() => break,
            };
            let Ok((stream, _)) = conn else { continue };
            let (stats, store, wrapper) = (stats.clone(), store.clone(), wrapper.clone());
            tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    handle(stream, &stats, &*store, &*wrapper),
                )
                .await;
            });
        }
    });
    Ok(local)
}

async fn handle(
    mut s: TcpStream,
    stats: &Stats,
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut n = 0;
    while n < buf.len() {
        let got = s.read(&mut buf[n..]).await?;
        if got == 0 {
            break;
        }
        n += got;
        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..n]);
    let mut parts = head.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "text/plain; version=0.0.4",
            stats.render_prometheus(),
        ),
        ("GET", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET", "/readyz") => {
            let db = tokio::time::timeout(Duration::from_secs(3), store.ping()).await;
            let kms = tokio::time::timeout(Duration::from_secs(3), wrapper.check()).await;
            match (db, kms) {
                (Ok(Ok(())), Ok(Ok(()))) => ("200 OK", "text/plain", "ready\n".to_string()),
                (db, kms) => (
                    "503 Service Unavailable",
                    "text/plain",
                    format!(
                        "database: {}\nkms: {}\n",
                        if matches!(db, Ok(Ok(()))) {
                            "ok"
                        } else {
                            "unreachable"
                        },
                        if matches!(kms, Ok(Ok(()))) {
                            "ok"
                        } else {
                            "unreachable"
                        }
                    ),
                ),
            }
        }
        ("GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_string(),
        ),
    };
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(resp.as_bytes()).await?;
    s.shutdown().await
}
