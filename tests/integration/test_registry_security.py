"""A registry behind TLS and basic auth: the client works through it and fails closed in one line.

Apicurio does basic auth and TLS only with an identity server, so a small loopback proxy
stands in front of the stack's registry here: HTTPS with a certificate of a test CA
(``streams_dev.tls``), basic auth, and every request passed through to Apicurio as is.
"""

from __future__ import annotations

import base64
import ssl
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from streams.errors import ConfigError
from streams.io.codec import Codecs
from streams.ops import schemas
from streams_dev.tls import LocalCA

pytestmark = pytest.mark.integration

USER, PASSWORD = "deployer", "s3cret-registry-pw"


def proxy(upstream: str, certificate, expected: str) -> ThreadingHTTPServer:
    """HTTPS on a free loopback port; 401 without the right basic auth, else Apicurio's answer."""

    class Handler(BaseHTTPRequestHandler):
        def _relay(self) -> None:
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="registry"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k in ("Content-Type", "Accept")}
            request = urllib.request.Request(upstream + self.path, data=body, method=self.command, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, payload = response.status, response.read()
            except urllib.error.HTTPError as exc:
                status, payload = exc.code, exc.read()
            self.send_response(status)
            self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = _relay

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificate.cert, certificate.key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def secured(stack_settings, tmp_path_factory):
    directory = tmp_path_factory.mktemp("registry-tls")
    ca = LocalCA(directory)
    token = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    server = proxy(f"http://127.0.0.1:{stack_settings.registry_port}", ca.issue("registry"), token)
    other_ca = LocalCA(directory / "other", name="some-other-ca")
    try:
        yield server.server_address[1], ca.cert_file, other_ca.cert_file
    finally:
        server.shutdown()
        server.server_close()


def secure_env(port: int, ca_file, password: str = PASSWORD) -> dict[str, str]:
    return {
        "STREAMS_SCHEMA_REGISTRY_URL": f"https://127.0.0.1:{port}/apis/ccompat/v7",
        "STREAMS_SCHEMA_REGISTRY_USERNAME": USER,
        "STREAMS_SCHEMA_REGISTRY_PASSWORD": password,
        "STREAMS_SCHEMA_REGISTRY_CA_FILE": str(ca_file),
    }


def test_deploy_and_codecs_work_through_tls_and_basic_auth(pipeline, secured):
    port, ca_file, _ = secured
    result = pipeline.run("topics", "apply", **secure_env(port, ca_file))
    assert result.returncode == 0, result.stderr
    assert f"{pipeline.settings.masked_topic}-value" in result.stdout
    settings = pipeline.settings.model_copy(update=_settings(port, ca_file))
    codecs = Codecs.from_settings(settings)
    datum = {"message_id": "m", "sent_at": 1_700_000_000_000, "body": "{}", "attributes": {}}
    data = codecs.raw.encode(datum)
    assert data[:1] == b"\x00" and codecs.raw.decode_millis(data) == datum


def _settings(port: int, ca_file, password: str = PASSWORD) -> dict:
    from pydantic import SecretStr

    return {
        "schema_registry_url": f"https://127.0.0.1:{port}/apis/ccompat/v7",
        "schema_registry_username": USER,
        "schema_registry_password": SecretStr(password),
        "schema_registry_ca_file": ca_file,
    }


@pytest.mark.parametrize("command", [("topics", "apply"), ("worker",)])
def test_wrong_credentials_stop_a_process_in_one_line(pipeline, secured, command):
    port, ca_file, _ = secured
    pipeline.migrate()
    result = pipeline.run(*command, timeout=120, **secure_env(port, ca_file, password="wrong-password"))
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "refused user 'deployer' (HTTP 401)" in last and "STREAMS_SCHEMA_REGISTRY_PASSWORD" in last
    assert "Traceback" not in result.stderr and "wrong-password" not in result.stderr


def test_an_untrusted_registry_certificate_is_refused_in_one_line(pipeline, secured):
    port, _, other_ca = secured
    with pytest.raises(ConfigError) as err:
        schemas.register(pipeline.settings.model_copy(update=_settings(port, other_ca)))
    assert "TLS certificate is not trusted: check STREAMS_SCHEMA_REGISTRY_CA_FILE" in str(err.value)
    assert "\n" not in str(err.value)
    result = pipeline.run("migrate", **secure_env(port, other_ca))
    assert result.returncode == 2 and "STREAMS_SCHEMA_REGISTRY_CA_FILE" in result.stderr.strip().splitlines()[-1]
