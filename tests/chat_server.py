"""A small OpenAI-compatible chat-completions server on 127.0.0.1 for summarization tests.

It records every request (path, headers, JSON body, arrival time) and answers like the OpenAI
API: key points to the first turn, a summary to the second. Tests inject failures by setting
``plan`` (a list of ``(status, headers)`` consumed by the next requests), ``fail_after``
(answer 500 from that request on), ``delays`` (stall the next requests, for client timeouts),
``on_request`` (a hook called with the request number) or ``summary_text`` (a function of the
request body giving the summary to return).
"""
from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KEY_POINTS = "- invasive ductal carcinoma\n- grade 2\n- margins negative"
USAGE = {"first": (120, 20), "second": (160, 30)}  # (prompt, completion) tokens per turn


def is_summary_request(body: dict) -> bool:
    """The second turn carries the assistant's key points."""
    return any(m.get("role") == "assistant" for m in body.get("messages", []))


def report_text_of(body: dict) -> str:
    """The report embedded in the first user message (between triple quotes)."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    return user.split('"""')[1].strip() if '"""' in user else user


class ChatServer:
    """Threaded HTTP server speaking ``POST /v1/chat/completions``."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.plan: list[tuple[int, dict[str, str]]] = []
        self.fail_after: int | None = None
        self.on_request: Callable[[int], None] | None = None
        self.delays: list[float] = []  # seconds to stall the next requests (client timeouts)
        self.summary_text: Callable[[dict], str] = lambda body: (
            "Invasive ductal carcinoma, grade 2, with negative margins and no lymph node "
            f"metastasis ({report_text_of(body)[:20]}).")
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> ChatServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _respond(self, n: int, body: dict) -> tuple[int, dict[str, str], dict]:
        with self.lock:
            failure = self.plan.pop(0) if self.plan else None
        if failure is None and self.fail_after is not None and n >= self.fail_after:
            failure = (500, {})
        if failure is not None:
            status, headers = failure
            return status, headers, {"error": {"message": f"injected {status}", "type": "test"}}
        second = is_summary_request(body)
        content = self.summary_text(body) if second else KEY_POINTS
        pt, ct = USAGE["second" if second else "first"]
        return 200, {}, {
            "id": f"chatcmpl-{n}", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model", "?"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": pt, "completion_tokens": ct, "total_tokens": pt + ct},
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length) or b"{}")
                with server.lock:
                    n = len(server.requests)
                    headers = {k.lower(): v for k, v in self.headers.items()}
                    server.requests.append({"path": self.path, "headers": headers,
                                            "body": body, "time": time.monotonic()})
                if server.on_request is not None:
                    server.on_request(n)
                with server.lock:
                    delay = server.delays.pop(0) if server.delays else 0.0
                time.sleep(delay)
                status, headers, payload = server._respond(n, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        return Handler
