"""The timed part of scripts/soak.sh (run by it, with LocalStack's Python,
which has boto3): a producer at a steady rate, the scheduled rotations and
Postgres restarts, one report line a minute, the drain, and the RSS verdict.

Producer: the lines of --events are sent in order, ten to a
SendMessageBatch, batch k due at start + 10k/rate seconds, by --senders
threads; every message SQS accepted is written to OUT/sent.tsv as
`message_id <TAB> line index <TAB> malformed kind (empty if valid)`, which is
the manifest of the exactly-once check. A batch whose call failed without an
answer is sent again and counted as an ambiguous resend (SQS may have kept
the first copy, under an id the manifest does not know).

Every minute one line: the worker's counters from /metrics (deltas of that
minute), p50/p99 batch latency interpolated linearly inside the buckets of
the pii_vault_batch_seconds histogram (as Prometheus' histogram_quantile
does; the buckets are 5, 10, 25, 50, 100, 250, 500 ms, 1, 2.5, 5, 10 s, so a
figure is only as fine as its bucket), the worker's RSS (VmRSS, sampled every
5 s: the minute's largest sample), the queue's backlog (visible + in
flight), and what happened that minute.
"""

import argparse
import json
import os
import queue
import re
import shlex
import subprocess
import sys
import threading
import time
import urllib.request

import boto3
from botocore.config import Config

T0 = None  # the start of the run (time.monotonic())
LOCK = threading.Lock()


def log_event(events, text):
    with LOCK:
        events.append((time.monotonic(), text))
        # Also to stderr with the time, for the log of the run.
        sys.stderr.write("[%6.1fs] %s\n" % (time.monotonic() - T0, text))
        sys.stderr.flush()


def sqs_client():
    return boto3.client(
        "sqs",
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL"),
        region_name=os.environ.get("AWS_REGION", "us-east-1"),
        config=Config(retries={"max_attempts": 1}, max_pool_connections=4, read_timeout=20, connect_timeout=5),
    )


# ------------------------------------------------------------------ producer


class Producer:
    def __init__(self, a, events):
        self.a = a
        self.events = events
        self.sent = 0
        self.ambiguous = 0
        self.failed_calls = 0
        self.batches = queue.Queue(maxsize=2000)
        self.stop = threading.Event()
        self.lagging = 0  # batches due but not yet sent
        malformed = json.load(open(a.manifest))["malformed"]
        self.kind = {i: k for i, k in malformed}
        self.out = open(os.path.join(a.out, "sent.tsv"), "w")
        self.threads = []

    def start(self, deadline):
        p = threading.Thread(target=self.pace, args=(deadline,), daemon=True)
        p.start()
        self.threads.append(p)
        for _ in range(self.a.senders):
            t = threading.Thread(target=self.send_loop, daemon=True)
            t.start()
            self.threads.append(t)

    def pace(self, deadline):
        interval = 10.0 / self.a.rate
        k = 0
        with open(self.a.events) as f:
            batch = []
            for i, line in enumerate(f):
                batch.append((i, line.rstrip("\n")))
                if len(batch) < 10:
                    continue
                due = T0 + k * interval
                if due >= deadline or self.stop.is_set():
                    batch = []
                    break
                now = time.monotonic()
                if due > now:
                    time.sleep(due - now)
                self.batches.put(batch)
                k += 1
                batch = []
            if batch and not self.stop.is_set():
                self.batches.put(batch)
        if not self.stop.is_set() and time.monotonic() < deadline - 1:
            log_event(self.events, "producer: the events file ran out early")
        for _ in range(self.a.senders):
            self.batches.put(None)

    def send_loop(self):
        sqs = sqs_client()
        while True:
            batch = self.batches.get()
            if batch is None:
                return
            pending = {str(j): item for j, item in enumerate(batch)}
            attempt = 0
            while pending:
                attempt += 1
                try:
                    resp = sqs.send_message_batch(
                        QueueUrl=self.a.queue_url,
                        Entries=[{"Id": j, "MessageBody": body} for j, (_, body) in pending.items()],
                    )
                except Exception as e:  # no answer: SQS may or may not have them
                    with LOCK:
                        self.failed_calls += 1
                        self.ambiguous += len(pending)
                    if attempt in (1, 10, 100):
                        log_event(self.events, "producer: SendMessageBatch failed (%s), resending" % type(e).__name__)
                    time.sleep(min(5.0, 0.2 * attempt))
                    continue
                lines = []
                for ok in resp.get("Successful", []):
                    i, _ = pending.pop(ok["Id"])
                    lines.append("%s\t%d\t%s\n" % (ok["MessageId"], i, self.kind.get(i, "")))
                with LOCK:
                    self.out.writelines(lines)
                    self.sent += len(lines)
                if pending:
                    with LOCK:
                        self.failed_calls += 1
                    time.sleep(0.2)

    def join(self):
        for t in self.threads:
            t.join()
        self.out.close()


# ------------------------------------------------------------------ schedule


class Schedule:
    """Rotations every --rotate-every minutes (data-keys, token-key, in
    turn) and a Postgres restart every --restart-every minutes, 30 s into
    the minute; each in a thread of its own so that the clock goes on."""

    def __init__(self, a, events):
        self.a = a
        self.events = events
        self.threads = []
        self.rotations = []  # (kind, ok, seconds, summary)
        self.restarts = []  # (ok, seconds)
        self.n_rot = 0

    def plan(self, seconds):
        items = []
        if self.a.rotate_every > 0:
            t = self.a.rotate_every * 60
            while t < seconds:
                items.append((t, "rotate"))
                t += self.a.rotate_every * 60
        if self.a.restart_every > 0:
            t = self.a.restart_every * 60 + 30
            while t < seconds:
                items.append((t, "restart"))
                t += self.a.restart_every * 60
        return sorted(items)

    def run(self, seconds, stop):
        for at, what in self.plan(seconds):
            if stop.wait(max(0.0, T0 + at - time.monotonic())):
                return
            if what == "rotate":
                kind = ["data-keys", "token-key"][self.n_rot % 2]
                self.n_rot += 1
                t = threading.Thread(target=self.rotate, args=(kind, self.n_rot), daemon=True)
            else:
                t = threading.Thread(target=self.restart, daemon=True)
            t.start()
            self.threads.append(t)

    def rotate(self, kind, n):
        started = time.monotonic()
        log_event(self.events, "rotate %s started" % kind)
        path = os.path.join(self.a.out, "rotate-%d-%s.log" % (n, kind))
        for attempt in range(1, 6):
            with open(path, "a") as err:
                rc = subprocess.call(
                    [self.a.bin, "--database-url", self.a.rotator_url, "--kms-key-id", self.a.kms_key_id,
                     "rotate", kind, "--reason", "soak benchmark"],
                    stdout=err, stderr=err, stdin=subprocess.DEVNULL)
            text = open(path).read().strip().splitlines()
            last = text[-1] if text else ""
            if rc == 0:
                break
            log_event(self.events, "rotate %s exited %d (%s); running it again" % (kind, rc, last[-120:]))
            time.sleep(5)
        secs = time.monotonic() - started
        m = re.search(r"(re-encrypted|re-tokenised) (\d+)", "\n".join(text))
        what = "%s %s" % (m.group(1), m.group(2)) if m else last[-80:]
        self.rotations.append((kind, rc == 0, secs, what))
        log_event(self.events, "rotate %s %s in %.0fs (%s)" % (kind, "done" if rc == 0 else "FAILED", secs, what))

    def restart(self):
        started = time.monotonic()
        log_event(self.events, "postgres restart (pg_ctl restart -m fast)")
        with open(os.path.join(self.a.out, "pg-restart.log"), "a") as err:
            rc = subprocess.call(shlex.split(self.a.pg_ctl) + ["restart", "-m", "fast"],
                                 stdout=err, stderr=err, stdin=subprocess.DEVNULL, cwd="/")
        secs = time.monotonic() - started
        self.restarts.append((rc == 0, secs))
        log_event(self.events, "postgres %s in %.1fs" % ("back" if rc == 0 else "restart FAILED", secs))

    def join(self):
        for t in self.threads:
            t.join()


# ------------------------------------------------------------------ monitor

LINE = re.compile(r'^([a-z_]+)(\{[^}]*\})?\s+(\S+)$')


def scrape(url):
    out = {}
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    except Exception:
        return None
    for line in text.splitlines():
        m = LINE.match(line.strip())
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def buckets(metrics):
    """[(le, cumulative count)] of pii_vault_batch_seconds, +Inf last."""
    bs = []
    for k, v in metrics.items():
        m = re.match(r'^pii_vault_batch_seconds_bucket\{le="([^"]+)"\}$', k)
        if m:
            bs.append((float("inf") if m.group(1) == "+Inf" else float(m.group(1)), v))
    return sorted(bs)


def quantile(q, bs):
    """histogram_quantile over [(le, cumulative)]; None without samples."""
    if not bs or bs[-1][1] <= 0:
        return None
    rank = q * bs[-1][1]
    lo, below = 0.0, 0.0
    for le, c in bs:
        if c >= rank:
            if le == float("inf"):
                return lo  # past the last finite bound: the bound
            if c == below:
                return le
            return lo + (le - lo) * (rank - below) / (c - below)
        lo, below = le, c
    return lo


def delta_buckets(now, before):
    b0 = dict(buckets(before)) if before else {}
    return [(le, c - b0.get(le, 0.0)) for le, c in buckets(now)]


def rss_kb(pid):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def queue_depth(sqs, url):
    try:
        a = sqs.get_queue_attributes(
            QueueUrl=url,
            AttributeNames=["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible"])["Attributes"]
        return int(a["ApproximateNumberOfMessages"]), int(a["ApproximateNumberOfMessagesNotVisible"])
    except Exception:
        return None


def get(m, name):
    return m.get(name, 0.0) if m else 0.0


def fmt_ms(s):
    return "-" if s is None else "%.0f" % (s * 1000)


HEADER = "%5s %7s %7s %5s %5s %7s %6s %6s %7s %7s %5s %5s  %s" % (
    "min", "sent", "stored", "dup", "quar", "msg/s", "p50ms", "p99ms", "RSS MiB", "backlog", "dbrty", "warn", "events")


class Monitor:
    def __init__(self, a, events, producer):
        self.a = a
        self.events = events
        self.producer = producer
        self.sqs = sqs_client()
        self.rows = []
        self.rss_max = 0
        self.log_pos = 0
        self.samples = open(os.path.join(a.out, "samples.jsonl"), "w")
        self.prev_metrics = None
        self.prev_sent = 0
        self.prev_t = T0
        self.prev_bound = T0
        self.first_metrics = None

    def warn_lines(self):
        """WARN/ERROR lines the worker logged since the last call."""
        try:
            with open(self.a.worker_log, "rb") as f:
                f.seek(self.log_pos)
                data = f.read()
                self.log_pos += len(data)
        except OSError:
            return 0, 0
        text = data.decode(errors="replace")
        return len(re.findall(r"\bWARN\b", text)), len(re.findall(r"\bERROR\b", text))

    def poll_rss(self):
        r = rss_kb(self.a.worker_pid)
        if r is not None:
            self.rss_max = max(self.rss_max, r)
        return r

    def row(self, label, t_end, bound=None):
        """One report line for (prev_t, t_end]; events are those logged up
        to `bound` (the nominal end of the minute), so that an action
        scheduled on a minute boundary counts in the minute it starts."""
        bound = t_end if bound is None else bound
        m = scrape(self.a.metrics_url)
        if self.first_metrics is None:
            self.first_metrics = m
        depth = queue_depth(self.sqs, self.a.queue_url)
        rss_now = self.poll_rss()
        with LOCK:
            sent_total = self.producer.sent
            evs = [t for ts, t in self.events if self.prev_bound < ts <= bound]
        warns, errors = self.warn_lines()
        secs = max(1e-6, t_end - self.prev_t)
        mm = m if m is not None else self.prev_metrics  # unanswered: no deltas this minute
        d = lambda name: get(mm, name) - get(self.prev_metrics, name)
        db = delta_buckets(mm, self.prev_metrics) if mm else []
        row = {
            "label": label,
            "t": round(t_end - T0, 1),
            "sent": sent_total - self.prev_sent,
            "stored": d("pii_vault_logins_stored_total"),
            "dup": d("pii_vault_duplicates_total"),
            "quar": d("pii_vault_rejected_total"),
            "acked": d("pii_vault_messages_acked_total"),
            "db_retries": d('pii_vault_retries_total{dependency="database"}'),
            "errors": sum(get(mm, k) - get(self.prev_metrics, k) for k in (mm or {}) if k.startswith("pii_vault_errors_total")),
            "p50": quantile(0.5, db),
            "p99": quantile(0.99, db),
            "batches": db[-1][1] if db else 0,
            "rss_max_kb": self.rss_max,
            "rss_kb": rss_now,
            "backlog": None if depth is None else sum(depth),
            "warn": warns,
            "error": errors,
            "events": evs,
            "metrics_ok": m is not None,
        }
        self.samples.write(json.dumps(row) + "\n")
        self.samples.flush()
        self.rows.append(row)
        ev = "; ".join(evs)
        if m is None:
            ev = ("/metrics did not answer; " + ev).strip("; ")
        line = "%5s %7d %7d %5d %5d %7.0f %6s %6s %7.1f %7s %5d %5s  %s" % (
            label, row["sent"], row["stored"], row["dup"], row["quar"], row["acked"] / secs,
            fmt_ms(row["p50"]), fmt_ms(row["p99"]), self.rss_max / 1024.0,
            "?" if row["backlog"] is None else row["backlog"], row["db_retries"],
            "%d%s" % (warns, "+%dE" % errors if errors else ""), ev)
        print(line.rstrip(), flush=True)
        if m is not None:
            self.prev_metrics = m
        self.prev_sent = sent_total
        self.prev_t = t_end
        self.prev_bound = bound
        self.rss_max = rss_now or 0
        return row

    def wait_until(self, t):
        while True:
            left = t - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(5.0, left))
            self.poll_rss()


# ------------------------------------------------------------------ main


def main():
    global T0
    p = argparse.ArgumentParser()
    p.add_argument("--queue-url", required=True)
    p.add_argument("--events", required=True)
    p.add_argument("--manifest", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--senders", type=int, default=4)
    p.add_argument("--minutes", type=int, required=True)
    p.add_argument("--rotate-every", type=int, required=True)
    p.add_argument("--restart-every", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--rss-limit-pct", type=float, required=True)
    p.add_argument("--drain-timeout", type=int, default=600)
    p.add_argument("--metrics-url", required=True)
    p.add_argument("--worker-pid", type=int, required=True)
    p.add_argument("--worker-log", required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--rotator-url", required=True)
    p.add_argument("--kms-key-id", required=True)
    p.add_argument("--pg-ctl", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    events = []
    T0 = time.monotonic()
    seconds = a.minutes * 60
    deadline = T0 + seconds
    producer = Producer(a, events)
    schedule = Schedule(a, events)
    monitor = Monitor(a, events, producer)
    monitor.first_metrics = scrape(a.metrics_url)
    monitor.prev_metrics = monitor.first_metrics
    stop = threading.Event()
    producer.start(deadline)
    sched = threading.Thread(target=schedule.run, args=(seconds, stop), daemon=True)
    sched.start()
    print(HEADER, flush=True)
    for minute in range(1, a.minutes + 1):
        monitor.wait_until(T0 + minute * 60)
        monitor.row(str(minute), time.monotonic(), T0 + minute * 60)
    stop.set()
    producer.join()
    sent_total = producer.sent
    log_event(events, "producer stopped: %d sent" % sent_total)

    # Drain: the rotations still running finish, the queue empties.
    started = time.monotonic()
    drained = False
    while time.monotonic() - started < a.drain_timeout:
        time.sleep(2)
        monitor.poll_rss()
        depth = queue_depth(monitor.sqs, a.queue_url)
        m = scrape(a.metrics_url)
        if depth == (0, 0) and m is not None and get(m, "pii_vault_in_flight") == 0 and \
                all(not t.is_alive() for t in schedule.threads):
            drained = True
            break
    monitor.row("drain", time.monotonic())
    schedule.join()
    drain_secs = time.monotonic() - started

    # Summary.
    rows = [r for r in monitor.rows if r["label"] != "drain"]
    last = monitor.prev_metrics
    first = monitor.first_metrics
    allb = delta_buckets(last, first) if last else []
    stored = get(last, "pii_vault_logins_stored_total") - get(first, "pii_vault_logins_stored_total")
    acked_run = sum(r["acked"] for r in rows)
    summary = {
        "minutes": a.minutes,
        "rate": a.rate,
        "sent": sent_total,
        "ambiguous_resends": producer.ambiguous,
        "failed_send_calls": producer.failed_calls,
        "stored": stored,
        "duplicates": get(last, "pii_vault_duplicates_total") - get(first, "pii_vault_duplicates_total"),
        "quarantined": get(last, "pii_vault_rejected_total") - get(first, "pii_vault_rejected_total"),
        "msgs_per_s_sending": acked_run / seconds,
        "p50": quantile(0.5, allb),
        "p99": quantile(0.99, allb),
        "drained": drained,
        "drain_seconds": drain_secs,
        "rotations": schedule.rotations,
        "restarts": schedule.restarts,
    }
    w = min(a.warmup, max(1, a.minutes // 2))
    warm = [r["rss_max_kb"] for r in rows[:w]]
    half = [r["rss_max_kb"] for r in rows[len(rows) // 2:]] if len(rows) > w else []
    if warm and half:
        base, late = max(warm), max(half)
        growth = (late - base) / 1024.0
        pct = 100.0 * (late - base) / base if base else 0.0
        rss_pass = pct < a.rss_limit_pct
        summary.update(rss_warmup_kb=base, rss_last_half_kb=late, rss_growth_mib=growth, rss_growth_pct=pct,
                       rss_pass=rss_pass, rss_warmup_minutes=w)
    with open(os.path.join(a.out, "summary.json"), "w") as f:
        json.dump(summary, f)

    print()
    print("sent %d messages in %d min (target %.0f/s: %.0f/s sent); worker %.0f msg/s over the sending period"
          % (sent_total, a.minutes, a.rate, sent_total / seconds, summary["msgs_per_s_sending"]))
    print("batch latency over the run (interpolated in histogram buckets): p50 %s ms, p99 %s ms"
          % (fmt_ms(summary["p50"]), fmt_ms(summary["p99"])))
    print("worker: %d stored, %d duplicates (redeliveries found already stored), %d quarantined"
          % (stored, summary["duplicates"], summary["quarantined"]))
    rot_ok = sum(1 for r in schedule.rotations if r[1])
    print("rotations: %d of %d finished%s; postgres restarts: %d of %d (%s)" % (
        rot_ok, len(schedule.rotations),
        "" if not schedule.rotations else " (" + ", ".join("%s %.0fs" % (k, s) for k, _, s, _ in schedule.rotations) + ")",
        sum(1 for r in schedule.restarts if r[0]), len(schedule.restarts),
        ", ".join("%.1fs" % s for _, s in schedule.restarts) or "none"))
    if producer.ambiguous:
        print("producer: %d messages resent after a call without an answer (SQS may hold extra copies)" % producer.ambiguous)
    print("drain: %s after %.0fs" % ("queue empty" if drained else "NOT EMPTY", drain_secs))
    if "rss_pass" in summary:
        print("RSS: max %.1f MiB in the warm-up (minutes 1-%d), max %.1f MiB in the last half (minutes %d-%d): "
              "%+.1f MiB (%+.1f%%), limit +%.0f%%: %s" % (
                  summary["rss_warmup_kb"] / 1024.0, w, summary["rss_last_half_kb"] / 1024.0,
                  len(rows) // 2 + 1, len(rows), summary["rss_growth_mib"], summary["rss_growth_pct"],
                  a.rss_limit_pct, "PASS" if summary["rss_pass"] else "FAIL"))
    else:
        print("RSS: run too short for a verdict")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
