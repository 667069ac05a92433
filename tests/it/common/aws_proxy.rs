//! A fault-injecting, recording HTTP/1.1 proxy in front of an AWS endpoint
//! that speaks the AWS JSON protocol (KMS: JSON 1.1, SQS: JSON 1.0): the
//! `X-Amz-Target` header names the operation (`TrentService.Decrypt`,
//! `AmazonSQS.ReceiveMessage`), the body is one JSON object.
//!
//! A process is pointed at it with `AWS_ENDPOINT_URL` (or
//! `AWS_ENDPOINT_URL_KMS`, `AWS_ENDPOINT_URL_SQS`) = [`AwsProxy::url`]. One
//! proxy per process under test: each carries a label (the role, say), and
//! every request it sees is recorded as a [`Call`] under that label, with
//! its operation, key id and encryption context, and what the proxy did
//! with it.
//!
//! What it does with requests is a [`Fault`], switched at run time by the
//! test ([`AwsProxy::set`]), optionally for some operations only and for a
//! number of requests only ([`Plan`]):
//!
//! - [`Fault::Pass`]: forwarded (through the request hook,
//!   [`AwsProxy::rewrite_request`], if one is set), the answer handed back
//!   (through the answer hook, [`AwsProxy::rewrite`], if one is set);
//! - [`Fault::Throttle`]: `400` with `ThrottlingException`;
//! - [`Fault::ServerError`]: a `5xx` with `InternalFailure`;
//! - [`Fault::Reset`]: the request is read, then the connection is reset;
//! - [`Fault::Latency`]: forwarded after a delay;
//! - [`Fault::Hold`]: the request waits, unanswered, until the test sets
//!   another plan (then that plan decides): the way to act at the moment a
//!   process is inside a call ([`AwsProxy::wait_for`] says when);
//! - [`Fault::Outage`]: every connection is reset as it is accepted, and
//!   open ones at their next request: nothing reaches the service.
//!
//! A rewritten request no longer matches its SigV4 signature: fine for
//! LocalStack, which does not check signatures. Plain HTTP over loopback only; requests are read by `Content-Length`
//! (the SDK sends no chunked bodies to these services); answers are read
//! from a fresh upstream connection to its end, so chunked answers are
//! decoded here and handed back with a `Content-Length`.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What the proxy does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    Pass,
    Throttle,
    ServerError(u16),
    Reset,
    Latency(Duration),
    Hold,
    Outage,
}

/// A fault, for which operations (all when `None`), for how many requests
/// (then back to [`Fault::Pass`]; forever when `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub fault: Fault,
    pub only: Option<Vec<String>>,
    pub remaining: Option<usize>,
    /// Matching requests passed before the fault starts.
    pub skip: usize,
}

impl Plan {
    pub fn all(fault: Fault) -> Plan {
        Plan {
            fault,
            only: None,
            remaining: None,
            skip: 0,
        }
    }

    /// `fault` for these operations only (names without the service
    /// prefix: `Decrypt`, `DeleteMessageBatch`).
    pub fn only(fault: Fault, ops: &[&str]) -> Plan {
        Plan {
            fault,
            only: Some(ops.iter().map(|s| s.to_string()).collect()),
            remaining: None,
            skip: 0,
        }
    }

    /// The same, for the next `n` matching requests only.
    pub fn times(mut self, n: usize) -> Plan {
        self.remaining = Some(n);
        self
    }

    /// The same, after the next `n` matching requests passed.
    pub fn after(mut self, n: usize) -> Plan {
        self.skip = n;
        self
    }

    fn matches(&self, op: &str) -> bool {
        self.remaining != Some(0) && self.only.as_ref().is_none_or(|o| o.iter().any(|x| x == op))
    }

    fn applies(&self, op: &str) -> bool {
        self.skip == 0 && self.matches(op)
    }
}

/// One request the proxy saw.
#[derive(Debug, Clone)]
pub struct Call {
    /// The proxy's label when it came (the process's role).
    pub label: String,
    /// `X-Amz-Target`'s service prefix: `TrentService` (KMS), `AmazonSQS`.
    pub service: String,
    /// The operation: `Decrypt`, `GenerateDataKey`, `ReceiveMessage`, …
    pub operation: String,
    /// `KeyId`, or `SourceKeyId` of a `ReEncrypt`.
    pub key_id: Option<String>,
    /// `EncryptionContext`, or `SourceEncryptionContext` of a `ReEncrypt`.
    pub context: BTreeMap<String, String>,
    /// `DestinationKeyId` and `DestinationEncryptionContext` of a `ReEncrypt`.
    pub destination_key_id: Option<String>,
    pub destination_context: BTreeMap<String, String>,
    /// The request's JSON without its key material and ciphertexts.
    pub request: Value,
    /// What the proxy did with it.
    pub fault: Fault,
    /// The status handed back (`None`: reset, or held when recorded).
    pub status: Option<u16>,
}

/// Rewrites a passed answer: `(operation, request JSON, answer JSON)` →
/// the answer the client gets.
pub type Rewrite = Arc<dyn Fn(&str, &Value, Value) -> Value + Send + Sync>;

/// Rewrites a request before it is forwarded: `(operation, request JSON)` →
/// what the service gets (the call is recorded as the client sent it).
pub type RewriteRequest = Arc<dyn Fn(&str, Value) -> Value + Send + Sync>;

struct State {
    upstream: SocketAddr,
    label: Mutex<String>,
    plan: watch::Sender<Plan>,
    calls: Mutex<Vec<Call>>,
    /// Bumped at every recorded call (and status update), for waiters.
    seen: watch::Sender<usize>,
    rewrite: Mutex<Option<Rewrite>>,
    rewrite_request: Mutex<Option<RewriteRequest>>,
}

/// The proxy; see the module documentation. Stops when dropped.
pub struct AwsProxy {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl AwsProxy {
    /// A proxy on 127.0.0.1:0 in front of `endpoint` (`http://HOST:PORT`,
    /// loopback), recording under `label`, passing everything.
    pub async fn start(endpoint: &str, label: &str) -> AwsProxy {
        let upstream = crate::common::faults::endpoint_addr(endpoint);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            upstream,
            label: Mutex::new(label.to_string()),
            plan: watch::channel(Plan::all(Fault::Pass)).0,
            calls: Mutex::new(Vec::new()),
            seen: watch::channel(0).0,
            rewrite: Mutex::new(None),
            rewrite_request: Mutex::new(None),
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    continue;
                };
                if s.plan.borrow().fault == Fault::Outage {
                    drop(reset(client));
                    continue;
                }
                tokio::spawn(serve(client, s.clone()));
            }
        });
        AwsProxy { addr, state, task }
    }

    /// `http://127.0.0.1:PORT`, for `AWS_ENDPOINT_URL`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Records later calls under `label`.
    pub fn label(&self, label: &str) {
        *self.state.label.lock().unwrap() = label.to_string();
    }

    /// What to do with requests from now on (held requests go on under it).
    pub fn set(&self, plan: Plan) {
        self.state.plan.send_replace(plan);
    }

    /// Back to passing everything.
    pub fn pass(&self) {
        self.set(Plan::all(Fault::Pass));
    }

    /// Passed answers go through `f` (`None`: untouched).
    pub fn rewrite(&self, f: Option<Rewrite>) {
        *self.state.rewrite.lock().unwrap() = f;
    }

    /// Forwarded requests go through `f` first (`None`: untouched).
    pub fn rewrite_request(&self, f: Option<RewriteRequest>) {
        *self.state.rewrite_request.lock().unwrap() = f;
    }

    /// Every call so far, in the order they came.
    pub fn calls(&self) -> Vec<Call> {
        self.state.calls.lock().unwrap().clone()
    }

    /// The calls of operation `op` so far.
    pub fn calls_of(&self, op: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.operation == op)
            .collect()
    }

    /// Waits until a recorded call satisfies `pred` (panics after `limit`,
    /// naming `what`); returns it.
    pub async fn wait_for(
        &self,
        what: &str,
        limit: Duration,
        pred: impl Fn(&Call) -> bool,
    ) -> Call {
        let mut seen = self.state.seen.subscribe();
        let found = tokio::time::timeout(limit, async {
            loop {
                if let Some(c) = self.calls().into_iter().find(|c| pred(c)) {
                    return c;
                }
                seen.changed().await.expect("the proxy is running");
            }
        })
        .await;
        found.unwrap_or_else(|_| {
            panic!(
                "no call {what} within {limit:?}; calls: {:?}",
                self.calls()
                    .iter()
                    .map(|c| (&c.operation, c.fault, c.status))
                    .collect::<Vec<_>>()
            )
        })
    }
}

impl Drop for AwsProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.state.plan.send_replace(Plan::all(Fault::Outage));
    }
}

/// Sets SO_LINGER to 0, so that dropping the socket sends a reset.
fn reset(s: TcpStream) -> TcpStream {
    let _ = s.set_zero_linger();
    s
}

/// A request or answer as read off a connection.
struct Message {
    /// The start line and the headers, as (name, value), in order.
    start: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one request from `buf` + `conn` (`None`: the client closed).
async fn read_request(conn: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Message> {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        let mut chunk = [0u8; 8192];
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let start = lines.next()?.to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    let len: usize = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    buf.drain(..end + 4);
    while buf.len() < len {
        let mut chunk = [0u8; 8192];
        let n = conn.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body: Vec<u8> = buf.drain(..len).collect();
    Some(Message {
        start,
        headers,
        body,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Serves one client connection, request by request (keep-alive).
async fn serve(mut client: TcpStream, state: Arc<State>) {
    let mut buf = Vec::new();
    loop {
        let Some(req) = read_request(&mut client, &mut buf).await else {
            return;
        };
        let target = req.header("x-amz-target").unwrap_or("").to_string();
        let (service, op) = match target.split_once('.') {
            Some((s, o)) => (s.to_string(), o.to_string()),
            None => (String::new(), target.clone()),
        };
        let json: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        // The fault for this request, taken from the plan (counting it),
        // once it is not a hold.
        let mut plans = state.plan.subscribe();
        plans.borrow_and_update();
        let mut fault = take(&state, &op);
        let index = record(&state, &service, &op, &json, fault);
        while fault == Fault::Hold {
            if plans.changed().await.is_err() {
                return;
            }
            fault = take(&state, &op);
        }
        let answer = match fault {
            Fault::Outage | Fault::Reset => None,
            Fault::Throttle => Some(error(
                400,
                "ThrottlingException",
                "Rate exceeded (injected by the test proxy)",
            )),
            Fault::ServerError(status) => Some(error(
                status,
                "InternalFailure",
                "injected by the test proxy",
            )),
            Fault::Latency(d) => {
                tokio::time::sleep(d).await;
                forward(&state, &req, &op, &json).await
            }
            Fault::Pass | Fault::Hold => forward(&state, &req, &op, &json).await,
        };
        settle(&state, index, fault, answer.as_ref().map(|a| a.0));
        let Some((status, content_type, body)) = answer else {
            drop(reset(client));
            return;
        };
        let content_type = content_type.unwrap_or_else(|| {
            req.header("content-type")
                .unwrap_or("application/x-amz-json-1.1")
                .to_string()
        });
        let head = format!(
            "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\n\
             x-amzn-RequestId: {}\r\nContent-Length: {}\r\n\r\n",
            reason(status),
            uuid::Uuid::new_v4(),
            body.len()
        );
        if client.write_all(head.as_bytes()).await.is_err()
            || client.write_all(&body).await.is_err()
        {
            return;
        }
    }
}

/// The fault the plan gives a request of `op` now, counted against the
/// plan's `skip` and `remaining` (a hold counts once it is released).
fn take(state: &State, op: &str) -> Fault {
    let mut fault = Fault::Pass;
    state.plan.send_if_modified(|p| {
        if !p.matches(op) {
            return false;
        }
        if p.skip > 0 {
            p.skip -= 1;
            return true;
        }
        fault = p.fault;
        if fault == Fault::Hold {
            return false;
        }
        if let Some(n) = p.remaining.as_mut() {
            *n -= 1;
        }
        true
    });
    fault
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// An error answer (`None`: the request's own content type).
fn error(status: u16, kind: &str, message: &str) -> (u16, Option<String>, Vec<u8>) {
    (
        status,
        None,
        serde_json::to_vec(&serde_json::json!({"__type": kind, "message": message})).unwrap(),
    )
}

/// Records a call as it arrives; returns its index.
fn record(state: &State, service: &str, op: &str, json: &Value, fault: Fault) -> usize {
    let text = |k: &str| json.get(k).and_then(Value::as_str).map(str::to_string);
    let context = |k: &str| -> BTreeMap<String, String> {
        json.get(k)
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut request = json.clone();
    if let Some(m) = request.as_object_mut() {
        for secret in ["Plaintext", "CiphertextBlob", "Message"] {
            m.remove(secret);
        }
    }
    let call = Call {
        label: state.label.lock().unwrap().clone(),
        service: service.to_string(),
        operation: op.to_string(),
        key_id: text("KeyId").or_else(|| text("SourceKeyId")),
        context: if json.get("EncryptionContext").is_some() {
            context("EncryptionContext")
        } else {
            context("SourceEncryptionContext")
        },
        destination_key_id: text("DestinationKeyId"),
        destination_context: context("DestinationEncryptionContext"),
        request,
        fault,
        status: None,
    };
    let mut calls = state.calls.lock().unwrap();
    calls.push(call);
    let index = calls.len() - 1;
    drop(calls);
    state.seen.send_modify(|n| *n += 1);
    index
}

fn settle(state: &State, index: usize, fault: Fault, status: Option<u16>) {
    if let Some(c) = state.calls.lock().unwrap().get_mut(index) {
        c.fault = fault;
        c.status = status;
    }
    state.seen.send_modify(|n| *n += 1);
}

/// Sends `req` upstream (through the request hook) on a fresh connection;
/// the answer's status, content type and body, through the answer hook
/// (`None`: upstream did not answer).
async fn forward(
    state: &State,
    req: &Message,
    op: &str,
    json: &Value,
) -> Option<(u16, Option<String>, Vec<u8>)> {
    let mut up = TcpStream::connect(state.upstream).await.ok()?;
    let request_hook = state.rewrite_request.lock().unwrap().clone();
    let body = match request_hook {
        Some(f) if !json.is_null() => serde_json::to_vec(&f(op, json.clone())).unwrap(),
        _ => req.body.clone(),
    };
    let mut head = format!("{}\r\n", req.start);
    for (n, v) in &req.headers {
        if n.eq_ignore_ascii_case("connection") || n.eq_ignore_ascii_case("content-length") {
            continue;
        }
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    up.write_all(head.as_bytes()).await.ok()?;
    up.write_all(&body).await.ok()?;
    let mut raw = Vec::new();
    up.read_to_end(&mut raw).await.ok()?;
    let end = find(&raw, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
    let content_type = head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case("content-type")
            .then(|| v.trim().to_string())
    });
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let mut body = raw[end + 4..].to_vec();
    if chunked {
        body = dechunk(&body)?;
    }
    let hook = state.rewrite.lock().unwrap().clone();
    if let (Some(f), 200) = (hook, status) {
        if let Ok(answer) = serde_json::from_slice::<Value>(&body) {
            body = serde_json::to_vec(&f(op, json, answer)).unwrap();
        }
    }
    Some((status, content_type, body))
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = find(data, b"\r\n")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]).into_owned();
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(data.get(..size)?);
        data = data.get(size + 2..)?;
    }
}

/// The proxy in front of SQS (AWS JSON 1.0): calls recorded under the
/// service's prefix; a throttled request retried by the SDK; a batch
/// deletion whose request drops an entry and whose answer reports it
/// failed, as a partial `DeleteMessageBatch` failure would: the message
/// stays in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_throttles_records_and_rewrites_sqs_calls() {
    let Some(endpoint) = crate::common::aws::endpoint() else {
        return;
    };
    let proxy = AwsProxy::start(&endpoint, "client").await;
    let conf = aws_config::from_env()
        .endpoint_url(proxy.url())
        .load()
        .await;
    let sqs = aws_sdk_sqs::Client::new(&conf);
    let url = crate::common::aws::create_queue(&sqs).await;
    let bodies: Vec<String> = (0..3).map(|i| format!("{{\"n\":{i}}}")).collect();
    crate::common::aws::send_all(&sqs, &url, &bodies).await;
    let created = proxy.calls_of("CreateQueue");
    assert_eq!(created.len(), 1);
    assert_eq!(created[0].service, "AmazonSQS");
    assert_eq!(created[0].label, "client");

    proxy.set(Plan::only(Fault::Throttle, &["ReceiveMessage"]).times(1));
    let mut received = Vec::new();
    while received.len() < bodies.len() {
        let out = sqs
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .send()
            .await
            .expect("ReceiveMessage, retried by the SDK past one throttle");
        received.extend(out.messages.unwrap_or_default());
    }
    let receives = proxy.calls_of("ReceiveMessage");
    assert_eq!(
        (receives[0].fault, receives[0].status),
        (Fault::Throttle, Some(400))
    );
    assert_eq!(receives[1].status, Some(200));

    // Entry "0" never reaches SQS and is reported failed.
    proxy.rewrite_request(Some(Arc::new(|op: &str, mut req: Value| {
        if op == "DeleteMessageBatch" {
            if let Some(entries) = req["Entries"].as_array_mut() {
                entries.retain(|e| e["Id"] != "0");
            }
        }
        req
    })));
    proxy.rewrite(Some(Arc::new(
        |op: &str, _req: &Value, mut answer: Value| {
            if op == "DeleteMessageBatch" {
                answer["Failed"] = serde_json::json!([{
                    "Id": "0", "SenderFault": false, "Code": "InternalError", "Message": "injected"
                }]);
            }
            answer
        },
    )));
    let entries: Vec<_> = received
        .iter()
        .enumerate()
        .map(|(i, m)| {
            aws_sdk_sqs::types::DeleteMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .receipt_handle(m.receipt_handle.clone().unwrap())
                .build()
                .unwrap()
        })
        .collect();
    let out = sqs
        .delete_message_batch()
        .queue_url(&url)
        .set_entries(Some(entries))
        .send()
        .await
        .unwrap();
    assert_eq!(out.successful.len(), bodies.len() - 1);
    assert_eq!(out.failed.len(), 1);
    assert_eq!(out.failed[0].id, "0");
    assert_eq!(
        crate::common::aws::queue_counts(&sqs, &url).await,
        (0, 1),
        "the entry that failed is still in flight"
    );
    let sent = proxy.calls_of("DeleteMessageBatch");
    assert_eq!(
        sent[0].request["Entries"].as_array().map(Vec::len),
        Some(bodies.len()),
        "recorded as the client sent it"
    );
}
