#!/usr/bin/env python3
"""Generate login events as JSON Lines, for samples, tests and benchmarks.

Deterministic for a given --seed. IPs and device ids are drawn from small
pools so that duplicates (which the tokens must reveal) are common. With
--malformed-pct, that share of lines is broken in the ways the worker must
reject: not JSON, a JSON array, a missing field, an IP that is no IP, an
over-long user_id, a NUL character, a wrong type. --manifest PATH writes the
generator's own record of which lines it broke and how, so that tests can
pin their expectations to it rather than to the parser under test.
"""
import argparse
import json
import random
import sys
import uuid

MALFORMED_KINDS = ["not_json", "array", "missing", "bad_ip", "long_user", "nul", "wrong_type"]


def event(rng, ips, devices, users):
    return {
        "user_id": rng.choice(users),
        "app_version": rng.choice(["2.3.0", "2.4.1", "3.0.0", 230]),
        "device_type": rng.choice(["android", "ios", "web"]),
        "ip": rng.choice(ips),
        "locale": rng.choice(["RU", "US", "DE", "IN", None]),
        "device_id": rng.choice(devices),
    }


def malformed(rng, ev, kind):
    if kind == "not_json":
        return "{this is not json"
    if kind == "array":
        return json.dumps([ev])
    if kind == "missing":
        ev = dict(ev)
        del ev[rng.choice(["ip", "device_id", "user_id", "device_type", "app_version"])]
    elif kind == "bad_ip":
        ev = dict(ev, ip="999.1.2.3")
    elif kind == "long_user":
        ev = dict(ev, user_id="u" * 200)
    elif kind == "nul":
        ev = dict(ev, device_id=ev["device_id"] + "\u0000")
    elif kind == "wrong_type":
        ev = dict(ev, ip=12345)
    return json.dumps(ev)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--count", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--malformed-pct", type=float, default=0.0)
    p.add_argument("--ips", type=int, default=0, help="size of the IP pool (default: count/4)")
    p.add_argument("--devices", type=int, default=0, help="size of the device pool (default: count/4)")
    p.add_argument("--users", type=int, default=0, help="number of users (default: count/10)")
    p.add_argument("--manifest", help="write {\"count\": N, \"malformed\": [[line index, kind], ...]} here")
    a = p.parse_args()
    rng = random.Random(a.seed)
    n_ips = a.ips or max(1, a.count // 4)
    n_dev = a.devices or max(1, a.count // 4)
    n_users = a.users or max(1, a.count // 10)
    ips = []
    for i in range(n_ips):
        if i % 10 == 9:
            ips.append("2001:db8:%x::%x" % (rng.randrange(65536), rng.randrange(65536)))
        else:
            ips.append("%d.%d.%d.%d" % (rng.randrange(1, 224), rng.randrange(256), rng.randrange(256), rng.randrange(1, 255)))
    devices = ["%03d-%02d-%04d" % (rng.randrange(1000), rng.randrange(100), rng.randrange(10000)) for _ in range(n_dev)]
    users = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(n_users)]
    out = sys.stdout
    broken = []
    for i in range(a.count):
        ev = event(rng, ips, devices, users)
        if a.malformed_pct and rng.random() * 100 < a.malformed_pct:
            kind = MALFORMED_KINDS[i % len(MALFORMED_KINDS)]
            broken.append([i, kind])
            out.write(malformed(rng, ev, kind) + "\n")
        else:
            out.write(json.dumps(ev) + "\n")
    if a.manifest:
        with open(a.manifest, "w") as f:
            json.dump({"count": a.count, "malformed": broken}, f)


if __name__ == "__main__":
    main()
