"""An application written against suno-easy (PyPI), unmodified, pointed at sunopoll's API
stand-in by its documented base-URL setting (the class attribute SunoClient.BASE_URL).

It submits one song with its own handler as callBackUrl, never tells sunopoll anything, and
waits for the `complete` callback at that handler, which it reads with suno-easy's own webhook
parser. Used by tests/it/proxy.rs; run by hand as

    python3 tests/clients/suno_easy_callback.py http://127.0.0.1:8787 YOUR_KEY_OR_TOKEN
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

from suno_easy import SunoClient
from suno_easy.webhooks import parse_music_webhook

WAIT_SECONDS = 60

base_url, key = sys.argv[1], sys.argv[2]
done = threading.Event()
result = {}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        payload = json.loads(body)
        event, songs = parse_music_webhook(payload)
        print(f"handler: {event.callback_type} callback for task {event.task_id} "
              f"({len(songs)} songs: {', '.join(s.title or '?' for s in songs)})", flush=True)
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")
        if event.callback_type == "complete":
            result["task"] = event.task_id
            done.set()

    def log_message(self, *args):
        pass


server = HTTPServer(("127.0.0.1", 0), Handler)
threading.Thread(target=server.serve_forever, daemon=True).start()
handler_url = f"http://127.0.0.1:{server.server_address[1]}/suno/callback"

# The only change an application makes: its API base URL.
SunoClient.BASE_URL = base_url
client = SunoClient(api_key=key, callback_url=handler_url)
task = client.music.generate(
    prompt="A peaceful acoustic guitar melody",
    style="Folk, Acoustic",
    title="Morning Breeze",
    instrumental=True,
    wait=False,
)
print(f"submitted task {task.task_id}", flush=True)

if not done.wait(WAIT_SECONDS):
    print(f"no complete callback within {WAIT_SECONDS}s", flush=True)
    sys.exit(1)
if result["task"] != task.task_id:
    print(f"the callback was for {result['task']}, not {task.task_id}", flush=True)
    sys.exit(1)
server.shutdown()
