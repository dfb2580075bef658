"""A fault-injecting HTTP proxy (stdlib only) in front of a real ``mlflow server``.

Every request is forwarded to the upstream server unless a rule says otherwise. A rule matches a method and
a path fragment and applies to the matching requests numbered ``first`` .. ``first + times - 1`` (1-based):

    lose      forward the request (the server acts on it), then close the connection without a reply
    fail503   forward the request, then answer 503 (the reply is lost as a server error)
    reset     close the connection without forwarding (the server never sees it)
    hold      forward the request only once ``release`` (a threading.Event) is set
    barrier   hold the first ``times`` matching requests until all of them arrived, then forward them all
    die       from this request on, every request is closed unanswered (``revive()`` undoes it)

Tests wait on events, never on time: ``seen(method, fragment, n)`` returns an Event set when the n-th
matching request arrives; ``count(method, fragment)`` counts them.
"""
from __future__ import annotations

import http.client
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "trailer", "upgrade",
       "content-length"}


@dataclass
class Rule:
    method: str
    fragment: str
    action: str
    first: int = 1
    times: int = 1
    release: threading.Event = field(default_factory=threading.Event)
    _arrived: int = 0


class FaultProxy:
    def __init__(self, upstream: str):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.rules: list[Rule] = []
        self.log: list[tuple[str, str]] = []
        self.dead = False
        self._lock = threading.Condition()
        self._waiters: list[tuple[str, str, int, threading.Event]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # ------------------------------------------------------------------------------------------ control

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for rule in self.rules:
            rule.release.set()
        self.server.shutdown()
        self.server.server_close()

    def add(self, method: str, fragment: str, action: str, first: int = 1, times: int = 1) -> Rule:
        rule = Rule(method, fragment, action, first, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def revive(self) -> None:
        with self._lock:
            self.dead = False
            self.rules = [r for r in self.rules if r.action != "die"]

    def count(self, method: str, fragment: str) -> int:
        with self._lock:
            return sum(1 for m, p in self.log if m == method and fragment in p)

    def seen(self, method: str, fragment: str, n: int = 1) -> threading.Event:
        event = threading.Event()
        with self._lock:
            if self.count_unlocked(method, fragment) >= n:
                event.set()
            else:
                self._waiters.append((method, fragment, n, event))
        return event

    def count_unlocked(self, method: str, fragment: str) -> int:
        return sum(1 for m, p in self.log if m == method and fragment in p)

    # ------------------------------------------------------------------------------------------ serving

    def _arrive(self, method: str, path: str) -> tuple[str | None, Rule | None]:
        """Record the request; return the action that applies to it (None: forward as usual)."""
        with self._lock:
            self.log.append((method, path))
            for waiter in list(self._waiters):
                if waiter[0] == method and waiter[1] in path and self.count_unlocked(method, waiter[1]) >= waiter[2]:
                    waiter[3].set()
                    self._waiters.remove(waiter)
            if self.dead:
                return "die", None
            for rule in self.rules:
                if rule.method == method and rule.fragment in path:
                    number = self.count_unlocked(method, rule.fragment)
                    if rule.first <= number < rule.first + rule.times:
                        if rule.action == "die":
                            self.dead = True
                        if rule.action == "barrier":
                            rule._arrived += 1
                            if rule._arrived >= rule.times:
                                rule.release.set()
                        return rule.action, rule
        return None, None

    def _forward(self, method: str, path: str, headers, body: bytes):
        conn = http.client.HTTPConnection(*self.upstream, timeout=120)
        try:
            conn.request(method, path, body=body if body or method in ("POST", "PUT", "PATCH") else None,
                         headers={k: v for k, v in headers.items() if k.lower() not in HOP | {"host"}})
            answer = conn.getresponse()
            return answer.status, answer.getheaders(), answer.read()
        finally:
            conn.close()

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):      # quiet
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if size == 0:
                            self.rfile.readline()
                            break
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _close(self):
                self.close_connection = True
                try:
                    self.connection.shutdown(2)
                except OSError:
                    pass

            def _serve(self):
                body = self._body()
                action, rule = proxy._arrive(self.command, self.path)
                if action in ("die", "reset"):
                    return self._close()
                if action in ("hold", "barrier"):
                    rule.release.wait()
                    if proxy.dead:
                        return self._close()
                try:
                    status, headers, payload = proxy._forward(self.command, self.path, self.headers, body)
                except OSError:                   # the upstream is gone: so is the answer
                    return self._close()
                if action == "lose":
                    return self._close()
                if action == "fail503":
                    status, headers, payload = 503, [("Content-Type", "text/plain")], b"injected 503"
                self.send_response(status)
                for key, value in headers:
                    if key.lower() not in HOP:
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(payload)))
                self.send_header("Connection", "close")     # no connection outlives this proxy (or its rules)
                self.close_connection = True
                self.end_headers()
                self.wfile.write(payload)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve

        return Handler
