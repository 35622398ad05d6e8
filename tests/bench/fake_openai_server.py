"""A tiny OpenAI-compatible streaming server for the benchmark tests (loopback only).

`/v1/completions` streams `max_tokens` SSE chunks, one token each, then (when asked for
`stream_options.include_usage`) a usage chunk and `[DONE]`. Every request body is kept
on the server object so tests can check what the load generator sent. Also runnable as
a script (`python fake_openai_server.py PORT`) to test the subprocess launcher.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeOpenAIServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog (5) would refuse a burst of concurrent clients

    def __init__(self, port: int = 0, token_delay_s: float = 0.001, model: str = "fake-model") -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.token_delay_s = token_delay_s
        self.model = model
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.bodies.append(body)


class _Handler(BaseHTTPRequestHandler):
    server: FakeOpenAIServer

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def _json(self, code: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        self.server.record(body)
        if self.path != "/v1/completions" or body.get("model") != self.server.model:
            self._json(404, {"error": {"message": "unknown model or path"}})
            return
        n = int(body.get("max_tokens", 16))
        prompt = body["prompt"]
        prompt_len = len(prompt) if isinstance(prompt, list) else len(prompt.split())
        # HTTP/1.0 semantics: the body ends when we close, no length or chunking needed.
        self.close_connection = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        self.wfile.write(b": a comment line the client must skip\n\n")
        for i in range(n):
            time.sleep(self.server.token_delay_s)
            chunk = {"id": "x", "object": "text_completion", "model": self.server.model,
                     "choices": [{"index": 0, "text": f" t{i}", "finish_reason": None}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}
            self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def start_in_thread(**kwargs: Any) -> tuple[FakeOpenAIServer, threading.Thread]:
    srv = FakeOpenAIServer(**kwargs)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return srv, thread


if __name__ == "__main__":
    server = FakeOpenAIServer(int(sys.argv[1]))
    server.serve_forever(poll_interval=0.05)
