#!/usr/bin/env python3
"""Host-side checks of what the fake handler received (tests/systemd-nspawn/run calls this
after the container has stopped): each body is byte-for-byte the callback a real API would
have POSTed (the fixtures in tests/fixtures/), signed as README.md's verify() expects, and
each event kept its webhook-id. Prints "PASS name: detail" / "FAIL name: detail" lines and
exits 1 when any check failed.
"""

import argparse
import base64
import glob
import hashlib
import hmac
import json
import os
import re
import sys
import time

FIXTURE_TASK = "a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10"


def verify(secret, headers, body):
    """README.md's "Verifying the signature", as a handler would run it."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, ts = headers["webhook-id"], headers["webhook-timestamp"]
    if abs(time.time() - int(ts)) > 3600:  # the run is recent; README's 300 s is for live use
        return False
    mac = hmac.new(key, f"{msg_id}.{ts}.".encode() + body, hashlib.sha256).digest()
    expected = "v1," + base64.b64encode(mac).decode()
    return any(hmac.compare_digest(expected, s) for s in headers["webhook-signature"].split())


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--received", required=True)
    p.add_argument("--fixtures", required=True)
    p.add_argument("--secret", required=True)
    p.add_argument("--main-task", required=True)
    p.add_argument("--fail-task", required=True)
    args = p.parse_args()

    failures = 0

    def report(ok, name, detail):
        nonlocal failures
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)
        failures += 0 if ok else 1

    deliveries = []
    for path in sorted(glob.glob(os.path.join(args.received, "[0-9]*.json"))):
        m = re.fullmatch(r"(\d+)\.([^.]+)\.([a-z]+)\.json", os.path.basename(path))
        if not m or m.group(2) == "headers":
            continue
        with open(path, "rb") as f:
            body = f.read()
        with open(os.path.join(args.received, f"{m.group(1)}.headers.json")) as f:
            headers = json.load(f)
        deliveries.append((m.group(2), m.group(3), body, headers))

    expected = [
        (args.main_task, "text", "callback.text.json"),
        (args.main_task, "first", "callback.first.json"),
        (args.main_task, "complete", "callback.complete.json"),
        (args.fail_task, "error", "callback.error.sensitive-word.json"),
    ]
    for task, stage, fixture in expected:
        got = [d for d in deliveries if d[0] == task and d[1] == stage]
        with open(os.path.join(args.fixtures, fixture), encoding="utf-8") as f:
            want = json.loads(f.read().replace(FIXTURE_TASK, task))
        if not got:
            report(False, f"body-{stage}", f"{task}: no {stage} delivery received")
            continue
        body, headers = got[0][2], got[0][3]
        report(
            json.loads(body) == want,
            f"body-{stage}",
            f"{task} {stage}: the POSTed body equals tests/fixtures/{fixture}"
            + ("" if json.loads(body) == want else f"; got {body[:300]!r}"),
        )
        signed = all(verify(args.secret, h, b) for _, _, b, h in got)
        report(signed, f"signature-{stage}", f"{len(got)} delivery(ies), webhook-id {headers.get('webhook-id')}: "
               + ("README's verify() accepts the signature" if signed else "bad signature"))
        ids = {h.get("webhook-id") for _, _, _, h in got}
        report(len(ids) == 1, f"webhook-id-{stage}", f"{len(got)} delivery(ies) share one webhook-id: {sorted(ids)}")

    stages = [s for t, s, _, _ in deliveries if t == args.main_task]
    order = [s for i, s in enumerate(stages) if s not in stages[:i]]
    report(order == ["text", "first", "complete"], "order", f"{args.main_task} arrived in the order {stages}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
