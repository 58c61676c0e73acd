"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis):
whatever a client sends, the server answers without a 5xx, and every error
answer has the ``{"error": {"code", "message"}}`` body.

Bounded: FUZZ_EXAMPLES generated requests per operation, against a real uvicorn
server (in a thread, on a loopback port) with the recording fake generator.
"""
from __future__ import annotations

import socket
import threading

import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from server.app import create_app
from server.config import Settings

FUZZ_EXAMPLES = 40


@pytest.fixture
def fuzz_server(server_settings, server_generators):
    """(app, base URL) of a server running in a background thread."""
    app = create_app(
        server_settings(max_sessions=10_000, max_upload_bytes=256 * 1024), generator_factory=server_generators.factory
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="critical", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fuzz-server", daemon=True)
    thread.start()  # requests wait in the listen backlog until the server is up
    try:
        yield app, f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


# The schema does not depend on settings or the generator: load it from an app that never starts.
schema = schemathesis.openapi.from_dict(create_app(Settings()).openapi())


@schema.parametrize()
@settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case, fuzz_server):
    _, base_url = fuzz_server
    response = case.call(base_url=base_url, timeout=30)
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
        assert "Traceback" not in response.text
