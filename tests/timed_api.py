#!/usr/bin/env python3
"""The fake Suno API of the tests that judge request timing (driven by tests/it/timed_api.rs).

It runs in a process of its own so that a loaded test runner cannot bunch the arrivals it
records: each request's arrival is taken here, once its head has been read, on CLOCK_MONOTONIC
(the clock Rust's Instant reads, one clock for every process on the machine), and appended to the
arrivals file as one JSON line, [ns, task, authorization], before any answer is written. The test
process only reads that file.

The API side, as the in-process wiremock fake (tests/it/helpers.rs, FakeApi) answers it:
  GET /api/v1/generate/record-info?taskId=ID
      the override while one is set; else ID's script, one reply per answer (the last repeats;
      a script advances only when it answers, so a task resumes where it was after an override);
      else the PENDING fixture rewritten for ID. Anything else is a 404 and is not recorded.

The control side (the test process), JSON bodies, each answered {"ok": true} once in force:
  POST /_fake/script    {"task": ID, "replies": [REPLY, ...]}
  POST /_fake/override  {"reply": REPLY or null}
  POST /_fake/jitter    {"max_ms": N}: hold each request a uniform 0-N ms before it arrives (a
                        network whose latency jitters: requests sent evenly arrive bunched)
  GET  /_fake/clock     {"ns": now on CLOCK_MONOTONIC}, for the test to check the clocks agree
  REPLY = {"status": N, "body": BASE64, "retry_after": STR or null, "delay_ms": N,
           "fault": null, "truncate" (a head promising 4096 bytes, a few of them, then FIN) or
           "reset" (the same, then RST)}

Usage: timed_api.py --port P --arrivals FILE --pending FILE --placeholder ID
Prints "listening PORT" once it listens; exits when its stdin closes (the test process is gone,
however it ended).
"""

import argparse
import base64
import json
import os
import random
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

RECORD_INFO = "/api/v1/generate/record-info"
CONTROL = "/_fake/"
# What a cut answer sends before the cut: a head promising more than it gives.
PARTIAL = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 4096\r\n\r\n"
    b'{"code":200,"msg":"success","data":{"taskId":"'
)


def now_ns():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


class State:
    def __init__(self, arrivals, pending, placeholder):
        self.lock = threading.Lock()
        self.arrivals = open(arrivals, "a", encoding="utf-8", buffering=1)
        self.pending = pending
        self.placeholder = placeholder
        self.scripts = {}
        self.served = {}
        self.override = None
        self.jitter_ms = 0

    def arrive(self, task, auth):
        """Records one arrival and picks its answer, in one step: the file's order is the
        arrivals' order, and a script advances exactly once per answer it gives."""
        with self.lock:
            at = now_ns()
            self.arrivals.write(json.dumps([at, task, auth]) + "\n")
            if self.override is not None:
                return self.override
            script = self.scripts.get(task)
            if script is None:
                body = self.pending.replace(self.placeholder, task).encode()
                return {"status": 200, "body": body, "retry_after": None, "delay_ms": 0,
                        "fault": None}
            n = self.served.get(task, 0)
            self.served[task] = n + 1
            return script[min(n, len(script) - 1)]


def reply_from(j):
    return {
        "status": int(j["status"]),
        "body": base64.b64decode(j["body"]),
        "retry_after": j.get("retry_after"),
        "delay_ms": int(j.get("delay_ms", 0)),
        "fault": j.get("fault"),
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state = None

    def log_message(self, *args):
        pass

    def answer(self, status, body, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path == RECORD_INFO:
            self.record_info(url)
        elif url.path == CONTROL + "clock":
            self.answer(200, json.dumps({"ns": now_ns()}).encode())
        else:
            self.answer(404, b"")

    def do_POST(self):
        url = urlsplit(self.path)
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        if not url.path.startswith(CONTROL):
            self.answer(404, b"")
            return
        what, j = url.path[len(CONTROL):], json.loads(body or b"null")
        s = self.state
        with s.lock:
            if what == "script":
                s.scripts[j["task"]] = [reply_from(r) for r in j["replies"]]
            elif what == "override":
                s.override = None if j["reply"] is None else reply_from(j["reply"])
            elif what == "jitter":
                s.jitter_ms = int(j["max_ms"])
            else:
                self.answer(404, json.dumps({"ok": False, "unknown": what}).encode())
                return
        self.answer(200, b'{"ok":true}')

    def record_info(self, url):
        s = self.state
        if s.jitter_ms:
            time.sleep(random.uniform(0, s.jitter_ms) / 1000)
        task = (parse_qs(url.query).get("taskId") or [""])[0]
        reply = s.arrive(task, self.headers.get("authorization", ""))
        if reply["delay_ms"]:
            time.sleep(reply["delay_ms"] / 1000)
        fault = reply["fault"]
        if fault is None:
            headers = [("content-type", "application/json")]
            if reply["retry_after"] is not None:
                headers.append(("retry-after", reply["retry_after"]))
            self.answer(reply["status"], reply["body"], headers)
            return
        self.close_connection = True
        self.wfile.write(PARTIAL)
        self.wfile.flush()
        if fault == "truncate":
            self.connection.shutdown(socket.SHUT_WR)
        else:
            # Let the client read the head and the first bytes before the reset arrives.
            time.sleep(0.02)
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        # A client that gave up (its timeout, a reset) is part of the tests; anything else is
        # a fault of this fake and goes to its log.
        if not isinstance(sys.exc_info()[1], (ConnectionError, OSError)):
            super().handle_error(request, client_address)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--arrivals", required=True)
    p.add_argument("--pending", required=True)
    p.add_argument("--placeholder", required=True)
    a = p.parse_args()
    with open(a.pending, encoding="utf-8") as f:
        pending = f.read()
    Handler.state = State(a.arrivals, pending, a.placeholder)
    server = Server(("127.0.0.1", a.port), Handler)

    def orphaned():
        sys.stdin.buffer.read()
        os._exit(0)

    threading.Thread(target=orphaned, daemon=True).start()
    print("listening", server.server_address[1], flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
