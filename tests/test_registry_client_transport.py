"""The registry client's transport (site_agent.registry_client on httpx): redirects are not
followed (the token goes to the configured URL only), a silent server times out, answers are
read as they come. The protocol itself is tested against the real server in test_registry_http.py."""

import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from site_agent.errors import UserError
from site_agent.registry_client import RegistryClient


def _serve(handler) -> tuple[ThreadingHTTPServer, str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    return httpd, f"http://127.0.0.1:{httpd.server_address[1]}"


def test_a_redirect_is_refused_and_the_token_does_not_follow_it():
    seen: list[str | None] = []

    class Elsewhere(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    other, other_url = _serve(Elsewhere)

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            self.send_response(302)
            self.send_header("Location", other_url + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

    httpd, url = _serve(Redirect)
    try:
        with pytest.raises(UserError, match=r"refused the artifact list \(302\): it answered with a redirect to .*redirects are not followed") as exc:
            RegistryClient(url, "secret-token").list()
        assert "secret-token" not in str(exc.value)
        assert seen == []  # nothing (and no token) reached the redirect's target
    finally:
        for server in (httpd, other):
            server.shutdown()
            server.server_close()


def test_a_silent_registry_times_out_with_a_clear_error():
    with socket.socket() as s:  # accepts connections (backlog) and never answers
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot reach the registry at http://127.0.0.1:{port}"):
            RegistryClient(f"http://127.0.0.1:{port}", "secret-token", timeout=0.5).list()


def test_an_error_answer_names_the_servers_reason():
    class Refuse(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):  # noqa: N802
            body = b'{"error": "no such artifact"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd, url = _serve(Refuse)
    try:
        with pytest.raises(UserError, match="not in the registry at .*: factory gan: no such artifact"):
            RegistryClient(url, "t").versions("factory", "gan")
    finally:
        httpd.shutdown()
        httpd.server_close()
