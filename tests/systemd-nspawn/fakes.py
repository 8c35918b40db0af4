#!/usr/bin/env python3
"""The fake Suno API and the callback handler for tests/systemd-nspawn/run.

Both listen on 127.0.0.1 (ports picked by the kernel, written to --ports-file as JSON), which
the container shares with the host, so the daemon inside reaches them as it would reach the
real API and a local handler.

The API answers GET /api/v1/generate/record-info?taskId=... with the fixtures in tests/fixtures/
(their task ID replaced by the one asked about). What a task goes through depends on its ID:

- "slow..."  : the answer is held for --slow-seconds, then SUCCESS (a poll in flight to drain)
- "hold..."  : the answer is held until GET /_release?taskId=... (at most --hold-seconds), then
               SUCCESS: a poll that stays in flight for as long as the check needs (an upgrade)
- "fail..."  : SENSITIVE_WORD_ERROR (an `error` event)
- anything else: one stage per poll, PENDING, TEXT_SUCCESS, FIRST_SUCCESS, then SUCCESS

A request without "Authorization: Bearer <--api-key>" gets the API's 401 envelope, so a task
only progresses when the key came through the systemd credential. GET /_stats?taskId=... says
"<polls> <in flight>" for one task (the check inside the container reads it with bash's
/dev/tcp), GET /_stats/unauthorized the number of requests with a wrong key, and
GET /_release?taskId=... lets the held polls of a "hold..." task answer.

The handler stores every POSTed body as <n>.<task>.<stage>.json (n counts arrivals from 1) in
--received, with its headers beside it as <n>.headers.json, and answers 200.
"""

import argparse
import json
import os
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FIXTURE_TASK = "a3f9c2e17b4d4e8f9c0b5d6e7f8a9b10"
STAGES = ["PENDING", "TEXT_SUCCESS", "FIRST_SUCCESS", "SUCCESS"]


class State:
    def __init__(self, fixtures, api_key, slow_seconds, hold_seconds, received):
        self.fixtures = fixtures
        self.api_key = api_key
        self.slow_seconds = slow_seconds
        self.hold_seconds = hold_seconds
        self.released = {}
        self.received = received
        self.lock = threading.Lock()
        self.polls = {}
        self.in_flight = {}
        self.unauthorized = 0
        self.deliveries = 0

    def release(self, task_id):
        with self.lock:
            event = self.released.setdefault(task_id, threading.Event())
        event.set()

    def wait_released(self, task_id):
        with self.lock:
            event = self.released.setdefault(task_id, threading.Event())
        event.wait(self.hold_seconds)

    def record_info(self, status, task_id):
        with open(os.path.join(self.fixtures, f"record-info.{status}.json"), encoding="utf-8") as f:
            return f.read().replace(FIXTURE_TASK, task_id).encode()


def api_handler(state):
    class Api(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            print("api:", fmt % args, flush=True)

        def answer(self, status, body, ctype="application/json"):
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            task_id = query.get("taskId", [""])[0]
            if url.path == "/_stats":
                with state.lock:
                    line = f"{state.polls.get(task_id, 0)} {state.in_flight.get(task_id, 0)}\n"
                return self.answer(200, line.encode(), "text/plain")
            if url.path == "/_release" and task_id:
                state.release(task_id)
                return self.answer(200, b"released\n", "text/plain")
            if url.path == "/_stats/unauthorized":
                with state.lock:
                    line = f"{state.unauthorized}\n"
                return self.answer(200, line.encode(), "text/plain")
            if url.path != "/api/v1/generate/record-info" or not task_id:
                with open(os.path.join(state.fixtures, "error.404.wrong-path.json"), "rb") as f:
                    return self.answer(404, f.read())
            if self.headers.get("authorization") != f"Bearer {state.api_key}":
                with state.lock:
                    state.unauthorized += 1
                with open(os.path.join(state.fixtures, "error.401.unauthorized.json"), "rb") as f:
                    return self.answer(200, f.read())
            with state.lock:
                state.polls[task_id] = n = state.polls.get(task_id, 0) + 1
                state.in_flight[task_id] = state.in_flight.get(task_id, 0) + 1
            try:
                if task_id.startswith("slow"):
                    time.sleep(state.slow_seconds)
                    status = "SUCCESS"
                elif task_id.startswith("hold"):
                    state.wait_released(task_id)
                    status = "SUCCESS"
                elif task_id.startswith("fail"):
                    status = "SENSITIVE_WORD_ERROR"
                else:
                    status = STAGES[min(n, len(STAGES)) - 1]
                self.answer(200, state.record_info(status, task_id))
            finally:
                with state.lock:
                    state.in_flight[task_id] -= 1

    return Api


def callback_handler(state):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            print("handler:", fmt % args, flush=True)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            try:
                data = json.loads(body)["data"]
                name = f"{data['task_id']}.{data['callbackType']}"
            except (ValueError, KeyError, TypeError):
                name = "unparsable"
            with state.lock:
                state.deliveries += 1
                n = state.deliveries
            headers = {k.lower(): v for k, v in self.headers.items()}
            with open(os.path.join(state.received, f"{n:04}.headers.json"), "w") as f:
                json.dump(headers, f)
            # The body file appears last and whole (rename), so a reader never sees half of it.
            path = os.path.join(state.received, f"{n:04}.{name}.json")
            with open(path + ".part", "wb") as f:
                f.write(body)
            os.rename(path + ".part", path)
            self.send_response(200)
            self.send_header("content-length", "0")
            self.end_headers()

    return Handler


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", required=True)
    p.add_argument("--api-key", required=True)
    p.add_argument("--received", required=True)
    p.add_argument("--ports-file", required=True)
    p.add_argument("--slow-seconds", type=float, default=4.0)
    p.add_argument("--hold-seconds", type=float, default=60.0)
    p.add_argument("--lifetime", type=float, default=900.0, help="exit after this many seconds")
    args = p.parse_args()

    state = State(args.fixtures, args.api_key, args.slow_seconds, args.hold_seconds, args.received)
    api = ThreadingHTTPServer(("127.0.0.1", 0), api_handler(state))
    handler = ThreadingHTTPServer(("127.0.0.1", 0), callback_handler(state))
    for server in (api, handler):
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
    ports = {"api": api.server_address[1], "handler": handler.server_address[1]}
    with open(args.ports_file + ".part", "w") as f:
        json.dump(ports, f)
    os.rename(args.ports_file + ".part", args.ports_file)
    print(f"fakes: API on 127.0.0.1:{ports['api']}, handler on 127.0.0.1:{ports['handler']}", flush=True)
    # Bounded, so a run killed before it could stop us does not leave a server behind for long.
    time.sleep(args.lifetime)


if __name__ == "__main__":
    main()
