//! `pii-vault healthcheck`: one GET of a running worker's `/readyz`, for a
//! container's healthcheck (the image has no curl or wget). Exit status 0
//! when ready, 1 when the worker answers "not ready", 2 when nothing
//! answers; one line either way.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Exit;
use crate::cli::HealthcheckArgs;

/// The exit status when the worker answers that it is not ready.
pub const NOT_READY: u8 = 1;
/// The exit status when nothing answers (or not in HTTP).
pub const UNREACHABLE: u8 = 2;

/// The port `run --metrics-addr` listens on in the examples and compose file.
const DEFAULT_PORT: u16 = 9187;

pub async fn healthcheck(args: &HealthcheckArgs) -> anyhow::Result<()> {
    let url = match &args.url {
        Some(u) => u.clone(),
        None => default_url(std::env::var("PII_VAULT_METRICS_ADDR").ok().as_deref()),
    };
    let parsed =
        url::Url::parse(&url).map_err(|e| anyhow::anyhow!("--url {url:?} is not a URL: {e}"))?;
    if parsed.scheme() != "http" {
        anyhow::bail!("--url must be a plain http:// URL (the metrics server speaks no TLS)");
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| anyhow::anyhow!("--url {url:?} names no host"))?
        .to_string();
    let port = parsed.port().unwrap_or(80);
    let path = match parsed.query() {
        Some(q) => format!("{}?{q}", parsed.path()),
        None => parsed.path().to_string(),
    };
    let timeout = Duration::from_secs(args.timeout);
    let answer = tokio::time::timeout(timeout, get(&host, port, &path)).await;
    match answer {
        Ok(Ok((status, body))) => {
            let first = body.lines().next().unwrap_or("").trim();
            let said = if first.is_empty() {
                String::new()
            } else {
                format!(": {}", truncate(first, 200))
            };
            if (200..300).contains(&status) {
                println!("ready: {url} answered {status}{said}");
                Ok(())
            } else {
                Err(Exit::new(
                    NOT_READY,
                    format!("not ready: {url} answered {status}{said}"),
                )
                .into())
            }
        }
        Ok(Err(e)) => Err(Exit::new(UNREACHABLE, format!("unreachable: {url}: {e}")).into()),
        Err(_) => Err(Exit::new(
            UNREACHABLE,
            format!(
                "unreachable: {url}: no answer within {}s",
                timeout.as_secs()
            ),
        )
        .into()),
    }
}

/// `http://127.0.0.1:PORT/readyz`, PORT from `PII_VAULT_METRICS_ADDR`
/// (the worker's own setting, in the same container) when it has one.
/// The host is always the loopback: a worker bound to 0.0.0.0 or [::]
/// answers there too.
fn default_url(metrics_addr: Option<&str>) -> String {
    let port = metrics_addr
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map_or(DEFAULT_PORT, |a| a.port());
    format!("http://127.0.0.1:{port}/readyz")
}

/// A minimal HTTP/1.0 GET: the status code and up to 4 KiB of body.
async fn get(host: &str, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
    let request = format!(
        "GET {path} HTTP/1.0\r\nHost: {host}:{port}\r\nUser-Agent: pii-vault-healthcheck\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let mut raw = Vec::new();
    stream.take(64 * 1024).read_to_end(&mut raw).await?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow::anyhow!("the answer is not HTTP"))?;
    Ok((status, truncate(body, 4096).to_string()))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_url_takes_the_port_of_the_metrics_address() {
        assert_eq!(default_url(None), "http://127.0.0.1:9187/readyz");
        assert_eq!(
            default_url(Some("0.0.0.0:9300")),
            "http://127.0.0.1:9300/readyz"
        );
        assert_eq!(default_url(Some("junk")), "http://127.0.0.1:9187/readyz");
    }
}
