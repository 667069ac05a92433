//! SQS misbehaving under a running worker (a worker login, reading through
//! a fault-injecting proxy, `common::aws_proxy`): deletions that partly
//! fail, receives that fail or time out, and a message whose deletion never
//! succeeds until SQS moves it to the dead-letter queue. Each test ends as
//! the other fault tests do (`faults::assert_exactly_once`): every valid
//! event stored once, every malformed one quarantined, the queue empty, no
//! plaintext in the database or in what the worker printed.

use crate::common::app::TestApp;
use crate::common::aws::Queue;
use crate::common::aws_proxy::{AwsProxy, Fault, Plan};
use crate::common::faults::{wait_until, Events, Worker};
use crate::faults::{assert_exactly_once, services, setup, step, worker_with_env};

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;
use serde_json::{json, Value};

/// Handles whose deletion the proxy makes fail: each is dropped from the
/// `DeleteMessageBatch` request (so SQS keeps the message) and reported in
/// the answer's `Failed`, as SQS reports an entry it could not delete.
#[derive(Clone, Default)]
struct FailingDeletes {
    doomed: Arc<Mutex<HashSet<String>>>,
}

impl FailingDeletes {
    /// Drops the doomed entries from `proxy`'s `DeleteMessageBatch`
    /// requests; `choose(entry index, handle, doomed so far)` says whether an
    /// entry not doomed yet becomes so. The answer hook is the test's, which
    /// passes it through [`FailingDeletes::answer`].
    fn drop_doomed(
        &self,
        proxy: &AwsProxy,
        choose: impl Fn(usize, &str, usize) -> bool + Send + Sync + 'static,
    ) {
        let doomed = self.doomed.clone();
        proxy.rewrite_request(Some(Arc::new(move |op: &str, mut req: Value| {
            if op == "DeleteMessageBatch" {
                let mut d = doomed.lock().unwrap();
                if let Some(entries) = req["Entries"].as_array_mut() {
                    let mut i = 0;
                    entries.retain(|e| {
                        let h = e["ReceiptHandle"].as_str().unwrap_or_default().to_string();
                        let n = d.len();
                        let drop = d.contains(&h) || choose(i, &h, n);
                        if drop {
                            d.insert(h);
                        }
                        i += 1;
                        !drop
                    });
                }
            }
            req
        })));
    }

    /// The answer SQS would give had it failed the doomed entries of `req`.
    fn answer(&self, op: &str, req: &Value, mut answer: Value) -> Value {
        if op == "DeleteMessageBatch" {
            let d = self.doomed.lock().unwrap();
            let failed: Vec<Value> = req["Entries"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|e| d.contains(e["ReceiptHandle"].as_str().unwrap_or_default()))
                .map(|e| {
                    json!({"Id": e["Id"], "SenderFault": false,
                           "Code": "InternalError", "Message": "injected by the test"})
                })
                .collect();
            if !failed.is_empty() {
                answer["Failed"] = Value::Array(failed);
            }
        }
        answer
    }

    fn count(&self) -> usize {
        self.doomed.lock().unwrap().len()
    }
}

/// A draining worker (`run --until-empty`, a worker login of its own) that
/// reaches SQS through `proxy`, with `args` added.
async fn drain_through(app: &TestApp, q: &Queue, proxy: &AwsProxy, args: &[&str]) -> Worker {
    let url = proxy.url();
    let all = [&["--until-empty"][..], args].concat();
    worker_with_env(app, q, "w", &all, &[("AWS_ENDPOINT_URL_SQS", &url)]).await
}

/// Waits for `w` to end with status 0 and a summary that counts every
/// valid event of `ev` stored and every malformed one rejected; returns
/// the duplicates it counted.
async fn all_stored(w: &mut Worker, ev: &Events, limit: Duration) -> u64 {
    let (stored, duplicates, rejected) = w.wait_success(limit).await;
    assert_eq!(
        (stored as i64, rejected as i64),
        (ev.valid_count(), ev.malformed_count())
    );
    duplicates
}

/// `DeleteMessageBatch` answers with some entries failed (every other entry
/// of a request, for the first 20 messages): the worker retries them once,
/// then reports the acknowledgement failed; SQS hands those messages out
/// again after their visibility timeout, and the worker finds them already
/// stored and counts them as duplicates: nothing is stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_failed_deletions_come_back_as_duplicates_never_stored_twice() {
    let Some((shared_pg, endpoint)) = services() else {
        return;
    };
    let started = Instant::now();
    let proxy = AwsProxy::start(&endpoint, "worker").await;
    let failing = FailingDeletes::default();
    failing.drop_doomed(&proxy, |i, _, n| i % 2 == 0 && n < 20);
    let f = failing.clone();
    proxy.rewrite(Some(Arc::new(
        move |op: &str, req: &Value, answer: Value| f.answer(op, req, answer),
    )));
    let (app, q, ev) = setup(&shared_pg, 300, 4401).await;
    q.send(&ev.bodies).await;

    step(started, "worker");
    let mut w = drain_through(
        &app,
        &q,
        &proxy,
        &["--visibility-timeout", "5", "--batch-size", "50"],
    )
    .await;
    let duplicates = all_stored(&mut w, &ev, Duration::from_secs(120)).await;
    step(started, "checking");
    let doomed = failing.count();
    assert_eq!(doomed, 20, "the proxy failed fewer deletions than planned");
    // Each failed deletion is one more delivery of its message (more if a
    // batch outlived the 5 s visibility timeout), each found already there.
    assert!(
        duplicates as usize >= doomed,
        "{duplicates} duplicates for {doomed} failed deletions"
    );
    assert!(
        w.output().contains("acknowledgement failed"),
        "the worker must say its acknowledgement failed"
    );
    assert_exactly_once(&app, &q, &ev, &[&w]).await;
    app.finish().await;
    step(started, "done");
}

/// Receives fail with 5xx, are throttled, then take longer than the
/// worker's timeout (the answer, with its messages, arrives after the
/// worker gave up: those messages come back after their visibility
/// timeout). The worker retries with backoff, keeps running, and stores
/// every event exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_and_timed_out_receives_are_retried_and_lose_nothing() {
    let Some((shared_pg, endpoint)) = services() else {
        return;
    };
    let started = Instant::now();
    let proxy = AwsProxy::start(&endpoint, "worker").await;
    let (app, q, ev) = setup(&shared_pg, 200, 4402).await;
    q.send(&ev.bodies).await;
    let receive = &["ReceiveMessage"];
    proxy.set(Plan::only(Fault::ServerError(500), receive).times(6));

    step(started, "worker under 5xx");
    let mut w = drain_through(
        &app,
        &q,
        &proxy,
        &[
            "--visibility-timeout",
            "5",
            "--batch-size",
            "50",
            "--concurrency",
            "1",
        ],
    )
    .await;
    let faulted = |fault: Fault| {
        let proxy = &proxy;
        move || async move {
            let n = proxy
                .calls_of("ReceiveMessage")
                .iter()
                .filter(|c| c.fault == fault && c.status.is_some())
                .count();
            (n >= 6).then_some(())
        }
    };
    wait_until(
        Duration::from_secs(60),
        "six failed receives",
        faulted(Fault::ServerError(500)),
    )
    .await;
    step(started, "throttled");
    proxy.set(Plan::only(Fault::Throttle, receive).times(6));
    wait_until(
        Duration::from_secs(60),
        "six throttled receives",
        faulted(Fault::Throttle),
    )
    .await;
    // Longer than a drain's receive may take (1 s of long polling plus the
    // 10 s request timeout), as often as the SDK tries a call (3): the
    // worker itself sees the call time out.
    step(started, "slow");
    let slow = Fault::Latency(Duration::from_secs(12));
    proxy.set(Plan::only(slow, receive).times(3));
    all_stored(&mut w, &ev, Duration::from_secs(180)).await;
    step(started, "checking");
    let out = w.output();
    assert!(out.contains("receive failed, retrying"), "no retry logged");
    assert!(
        out.contains("SQS: request timed out"),
        "no receive timed out: the test proves less than it says"
    );
    let slow_calls = proxy
        .calls_of("ReceiveMessage")
        .into_iter()
        .filter(|c| c.fault == slow)
        .count();
    assert_eq!(slow_calls, 3);
    assert_exactly_once(&app, &q, &ev, &[&w]).await;
    app.finish().await;
    step(started, "done");
}

/// One message's deletion never succeeds. SQS delivers it again and again;
/// the worker stores it the first time and counts each later delivery as a
/// duplicate; once its receive count passes the queue's `maxReceiveCount`
/// (3), SQS moves it to the dead-letter queue, where the operator finds it
/// (already stored: redriving it later would add nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_received_past_max_receive_count_lands_in_the_dlq() {
    let Some((shared_pg, endpoint)) = services() else {
        return;
    };
    let started = Instant::now();
    let (app, q, ev) = setup(&shared_pg, 60, 4403).await;
    let dlq = crate::common::aws::create_queue(&q.sqs).await;
    let dlq_arn = q
        .sqs
        .get_queue_attributes()
        .queue_url(&dlq)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    q.sqs
        .set_queue_attributes()
        .queue_url(&q.url)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            json!({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"}).to_string(),
        )
        .send()
        .await
        .unwrap();
    // The poisoned message is the first line, whatever it holds (valid or
    // not, a worker deletes it once done): its SQS id is learnt from the
    // queue's answer to its sending.
    let poisoned_body = ev.bodies[0].clone();
    let poisoned_id = q
        .sqs
        .send_message()
        .queue_url(&q.url)
        .message_body(&poisoned_body)
        .send()
        .await
        .unwrap()
        .message_id
        .unwrap();
    let rest: Vec<String> = ev.bodies[1..].to_vec();
    assert!(
        !rest.contains(&poisoned_body),
        "the poisoned body is unique"
    );
    q.send(&rest).await;

    // Handles of the poisoned message, learnt from each receive's answer.
    let proxy = AwsProxy::start(&endpoint, "worker").await;
    let poisoned_handles: Arc<Mutex<HashSet<String>>> = Arc::default();
    let failing = FailingDeletes::default();
    let handles = poisoned_handles.clone();
    failing.drop_doomed(&proxy, move |_, h, _| handles.lock().unwrap().contains(h));
    let (handles, id, f) = (
        poisoned_handles.clone(),
        poisoned_id.clone(),
        failing.clone(),
    );
    proxy.rewrite(Some(Arc::new(
        move |op: &str, req: &Value, answer: Value| {
            if op == "ReceiveMessage" {
                for m in answer["Messages"].as_array().into_iter().flatten() {
                    if m["MessageId"].as_str() == Some(id.as_str()) {
                        let h = m["ReceiptHandle"].as_str().unwrap_or_default();
                        handles.lock().unwrap().insert(h.to_string());
                    }
                }
            }
            f.answer(op, req, answer)
        },
    )));

    step(started, "worker");
    let mut w = drain_through(
        &app,
        &q,
        &proxy,
        &["--visibility-timeout", "2", "--batch-size", "20"],
    )
    .await;
    let duplicates = all_stored(&mut w, &ev, Duration::from_secs(180)).await;
    step(started, "checking");
    let deliveries = poisoned_handles.lock().unwrap().len();
    assert_eq!(
        deliveries, 3,
        "the poisoned message should be delivered maxReceiveCount times"
    );
    assert!(duplicates >= 2, "its later deliveries are duplicates");

    // In the dead-letter queue, with its receive count.
    let moved = q
        .sqs
        .receive_message()
        .queue_url(&dlq)
        .max_number_of_messages(10)
        .wait_time_seconds(1)
        .message_system_attribute_names(
            aws_sdk_sqs::types::MessageSystemAttributeName::ApproximateReceiveCount,
        )
        .send()
        .await
        .unwrap()
        .messages
        .unwrap_or_default();
    let ids: Vec<&str> = moved.iter().filter_map(|m| m.message_id()).collect();
    assert_eq!(
        ids,
        [poisoned_id.as_str()],
        "the DLQ holds the poisoned message only"
    );
    assert_exactly_once(&app, &q, &ev, &[&w]).await;
    app.finish().await;
    step(started, "done");
}
