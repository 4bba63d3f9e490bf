"""``cube admin ...`` against a running admin API."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from cube.cli import cube
from proxy.admin_cli import admin
from tests.proxy.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, AdminServer, free_port

POLICY = {"format": "cube-policy/1", "allow_simulated": True}


class Cli:
    def __init__(self, server: AdminServer) -> None:
        self.url = f"http://127.0.0.1:{server.port}"
        self.token = ""

    def __call__(self, *args: str, stdin: str | None = None, ok: bool = True) -> Result:
        env = {"CUBE_ADMIN_URL": self.url, "CUBE_ADMIN_TOKEN": self.token}
        result = CliRunner().invoke(admin, list(args), input=stdin, env=env)
        if ok:
            assert result.exit_code == 0, (args, result.output, result.stderr)
        return result

    def json(self, *args: str, stdin: str | None = None) -> Any:
        return json.loads(self(*args, stdin=stdin).stdout)


def test_the_cli_drives_the_whole_admin_api(admin_server: AdminServer, tmp_path: Path) -> None:
    cli = Cli(admin_server)
    token = cli(
        "login",
        "--email",
        ADMIN_EMAIL,
        "--password-stdin",
        "--print-token",
        stdin=ADMIN_PASSWORD + "\n",
    ).stdout.strip()
    assert token.count(".") == 2
    cli.token = token
    assert cli.json("whoami")["user"]["email"] == ADMIN_EMAIL

    user = cli.json(
        "users",
        "create",
        "ops@example.com",
        "--name",
        "Ops",
        "--password-stdin",
        stdin="ops-password-1234\n",
    )
    assert user["email"] == "ops@example.com" and "password" not in json.dumps(user)
    assert {u["email"] for u in cli.json("users", "list")["users"]} == {
        ADMIN_EMAIL,
        "ops@example.com",
    }
    assert cli.json("users", "update", user["id"], "--name", "Operations")["name"] == "Operations"
    assert cli.json("users", "disable", user["id"])["disabled"] is True
    assert cli.json("users", "enable", user["id"])["disabled"] is False
    assert cli.json("users", "get", user["id"])["name"] == "Operations"

    domain = cli.json("domains", "create", "acme", "--name", "Acme")
    assert domain["alias"] == "acme"
    assert [d["alias"] for d in cli.json("domains", "list")["domains"]] == ["acme"]
    assert cli.json("domains", "update", "acme", "--name", "ACME")["name"] == "ACME"
    # The platform admin is the owner (created it); add ops as a domain admin.
    assert (
        cli.json("members", "add", "acme", "ops@example.com", "--role", "admin")["role"] == "admin"
    )
    assert cli.json("members", "set-role", "acme", user["id"], "member")["role"] == "member"
    assert len(cli.json("members", "list", "acme")["members"]) == 2

    backend = cli.json(
        "backends",
        "add",
        "acme",
        "https://10.0.0.7:8443",
        "--kind",
        "vllm",
        "--model",
        "llama",
        "--model",
        "qwen",
    )
    assert backend["models"] == ["llama", "qwen"] and backend["enabled"] is True
    assert cli.json("backends", "update", "acme", backend["id"], "--disable")["enabled"] is False
    assert [b["id"] for b in cli.json("backends", "list", "acme")["backends"]] == [backend["id"]]

    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(POLICY))
    assert cli.json("policies", "set", "acme", str(policy_file)) == POLICY
    assert cli.json("policies", "get", "acme") == POLICY
    bad_file = tmp_path / "bad.json"
    bad_file.write_text(json.dumps({"format": "cube-policy/9"}))
    refused = cli("policies", "set", "acme", str(bad_file), ok=False)
    assert refused.exit_code == 1 and "invalid_policy" in refused.stderr

    limits = cli.json(
        "limits", "set", "acme", "--requests-per-minute", "120", "--token-tokens-per-minute", "5000"
    )
    assert limits["requests_per_minute"] == 120 and limits["token_tokens_per_minute"] == 5000
    limits = cli.json("limits", "set", "acme", "--requests-per-minute", "none")
    assert limits["requests_per_minute"] is None and limits["token_tokens_per_minute"] == 5000
    assert cli.json("limits", "get", "acme") == limits

    created = cli(
        "tokens",
        "create",
        "acme",
        "--name",
        "ci",
        "--action",
        "inference",
        "--model",
        "llama",
        "--expires-in",
        "3600",
    )
    pat = json.loads(created.stdout)
    assert pat["token"].startswith("cube_pat_") and "not shown again" in created.stderr
    listed = cli.json("tokens", "list")["tokens"]
    assert [t["id"] for t in listed] == [pat["id"]] and pat["token"] not in json.dumps(listed)
    assert [t["id"] for t in cli.json("tokens", "list", "--domain", "acme")["tokens"]] == [
        pat["id"]
    ]
    assert cli.json("tokens", "get", pat["id"])["models"] == ["llama"]
    assert cli.json("tokens", "revoke", pat["id"])["revoked_at"] is not None

    audit = cli.json("audit", "acme", "--limit", "50")["audit"]
    assert any(row["route"] == "POST /admin/tokens" for row in audit)
    assert cli.json("audit", "acme", "--event", "request")["audit"] == []
    assert cli.json("usage", "acme") == {"usage": []}

    keys = cli.json("keys", "list")["keys"]
    rotated = cli.json("keys", "rotate")
    assert rotated["active"] != keys[0]["kid"]

    assert "removed backend" in cli("backends", "remove", "acme", backend["id"]).stdout
    assert "removed" in cli("policies", "delete", "acme").stdout
    assert "removed" in cli("members", "remove", "acme", user["id"]).stdout
    assert "deleted domain" in cli("domains", "delete", "acme", "--yes").stdout
    assert "deleted user" in cli("users", "delete", user["id"]).stdout
    assert "logged out" in cli("logout").stdout
    assert cli("whoami", ok=False).exit_code == 1


def test_cli_errors_are_messages_not_tracebacks(admin_server: AdminServer) -> None:
    cli = Cli(admin_server)
    cli.token = "not-a-token"
    result = cli("domains", "list", ok=False)
    assert result.exit_code == 1
    assert result.stderr.startswith("error: 401") and "Traceback" not in result.output
    no_token = CliRunner().invoke(
        admin, ["whoami"], env={"CUBE_ADMIN_URL": cli.url, "CUBE_ADMIN_TOKEN": ""}
    )
    assert no_token.exit_code == 1 and "CUBE_ADMIN_TOKEN" in no_token.stderr
    no_url = CliRunner().invoke(admin, ["whoami"], env={"CUBE_ADMIN_URL": ""})
    assert no_url.exit_code == 1 and "CUBE_ADMIN_URL" in no_url.stderr
    down = CliRunner().invoke(
        admin, ["--url", f"http://127.0.0.1:{free_port()}", "--token", "x", "whoami"]
    )
    assert down.exit_code == 1 and "cannot reach" in down.stderr
    wrong = CliRunner().invoke(
        admin,
        ["--url", cli.url, "login", "--email", ADMIN_EMAIL, "--password-stdin"],
        input="wrong-password-here\n",
    )
    assert wrong.exit_code == 1 and "invalid email or password" in wrong.stderr


def test_a_redirect_never_carries_the_token_and_odd_answers_are_messages(
    tmp_path: Path,
) -> None:
    """A server that redirects elsewhere does not get the token repeated there; one that
    answers something other than JSON, or an unusable CA file, is an error message."""
    import http.server
    import threading

    seen: list[str | None] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization"))
            if self.path.startswith("/elsewhere"):
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")
            elif self.path.startswith("/html"):
                self.send_response(200)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<html>not the admin API</html>")
            else:
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{port}/elsewhere")
                self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port = server.server_address[1]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{port}"
        redirected = CliRunner().invoke(admin, ["--url", base, "--token", "SECRET-PAT", "whoami"])
        assert redirected.exit_code == 1 and "redirects" in redirected.stderr
        assert seen == ["Bearer SECRET-PAT"]  # the first request only: nothing followed
        html = CliRunner().invoke(admin, ["--url", f"{base}/html", "--token", "t", "whoami"])
        assert html.exit_code == 1 and "did not answer JSON" in html.stderr
        assert html.exception is None or isinstance(html.exception, SystemExit)
        bad_ca = tmp_path / "bad.pem"
        bad_ca.write_text("not a certificate")
        ca = CliRunner().invoke(
            admin, ["--url", base, "--token", "t", "--cacert", str(bad_ca), "whoami"]
        )
        assert ca.exit_code == 1 and "cannot use the CA file" in ca.stderr
    finally:
        server.shutdown()


def test_one_changes_ones_own_password_with_the_current_one(admin_server: AdminServer) -> None:
    """Changing one's own password needs the current one (the API asks for it): it comes
    from stdin too, its first line."""
    admin = Cli(admin_server)
    admin.token = admin_server.token()
    user = admin.json(
        "users", "create", "ops@example.com", "--password-stdin", stdin="ops-password-1234\n"
    )
    own = Cli(admin_server)
    own.token = admin_server.login("ops@example.com", "ops-password-1234")["access_token"]
    refused = own(
        "users", "update", user["id"], "--password-stdin", stdin="new-password-5678\n", ok=False
    )
    assert refused.exit_code == 1 and "current_password" in refused.output + refused.stderr
    own.json(
        "users",
        "update",
        user["id"],
        "--current-password-stdin",
        "--password-stdin",
        stdin="ops-password-1234\nnew-password-5678\n",
    )
    assert admin_server.login("ops@example.com", "new-password-5678")["access_token"]


def test_passwords_are_never_command_line_arguments() -> None:
    for command in (["login"], ["users", "create"], ["users", "update"]):
        help_text = CliRunner().invoke(admin, [*command, "--help"]).output
        assert "--password-stdin" in help_text
        assert "--password " not in help_text and "--password=" not in help_text


# -- answers that are not the admin API's ---------------------------------------------------------


class _Misbehaving:
    """A loopback server that answers every request with ``reply(conn)`` (raw bytes on the
    socket) and records the requests' bodies."""

    def __init__(self, reply: Callable[[socket.socket], None]) -> None:
        self.reply = reply
        self.bodies: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:  # closed: the test is over
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                data = b""
                while b"\r\n\r\n" not in data:
                    piece = conn.recv(65536)
                    if not piece:
                        return
                    data += piece
                head, _, body = data.partition(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                while len(body) < length:
                    piece = conn.recv(65536)
                    if not piece:
                        break
                    body += piece
                self.bodies.append(body)
                self.reply(conn)
            except OSError:
                pass

    def close(self) -> None:
        self.stop.set()
        self.listener.close()


@contextlib.contextmanager
def _misbehaving(reply: Callable[[socket.socket], None]) -> Iterator[_Misbehaving]:
    server = _Misbehaving(reply)
    try:
        yield server
    finally:
        server.close()


def _send(raw: bytes) -> Callable[[socket.socket], None]:
    return lambda conn: conn.sendall(raw)


def _answer(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _admin(*args: str, stdin: str | None = None, env: dict[str, str] | None = None) -> Result:
    """``cube admin ...`` as ``cube`` runs it (options also from CUBE_* variables)."""
    return CliRunner().invoke(
        cube, ["admin", *args], input=stdin, env=env or {}, auto_envvar_prefix="CUBE"
    )


def _refused(result: Result, *needles: str) -> None:
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    assert "Traceback" not in result.output and result.stderr.startswith("error: ")
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x00\x01garbage not http\r\n\r\n", "did not answer HTTP"),  # BadStatusLine
        (b"", "did not answer HTTP"),  # closed without an answer: RemoteDisconnected
        # A bad chunk size: IncompleteRead while reading the body.
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "did not answer HTTP"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 70000 + b"\r\n\r\n", "did not answer HTTP"),
        # An error answer cut short: its body unreadable (IncompleteRead), the status stays.
        (b'HTTP/1.1 500 X\r\nContent-Length: 100\r\n\r\n{"a":', "HTTP 500"),
        (b'HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{"a":', "did not answer JSON"),
    ],
)
def test_an_answer_that_is_not_http_is_an_error_message(raw: bytes, message: str) -> None:
    """http.client's exceptions (BadStatusLine, IncompleteRead, ...) are no OSError: they
    were tracebacks."""
    with _misbehaving(_send(raw)) as server:
        _refused(_admin("--url", server.url, "--token", "t", "whoami"), message)


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:notaport",  # http.client.InvalidURL (no ValueError in 3.11)
        "http://exa mple.com",
        "http://a%0d%0ab",
        "http://127.0.0.1:99999",
        "http://[::1",
        "http:///no-host",
    ],
)
def test_a_malformed_url_is_an_error_message(url: str) -> None:
    _refused(_admin("--url", url, "--token", "t", "whoami"), "error: ")


def test_a_server_sending_a_byte_a_second_meets_the_deadline() -> None:
    """A timeout per read never ends a call whose server sends a byte a second: the whole
    call has one deadline (--timeout)."""

    def drip(conn: socket.socket) -> None:
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
        while True:
            conn.sendall(b" ")
            time.sleep(0.2)

    with _misbehaving(drip) as server:
        started = time.monotonic()
        result = _admin("--url", server.url, "--token", "t", "--timeout", "1", "whoami")
        _refused(result, "did not answer within 1 seconds")
        assert time.monotonic() - started < 10


def test_a_server_dripping_its_status_line_meets_the_deadline() -> None:
    def drip(conn: socket.socket) -> None:
        for byte in b"HTTP/1.1 200 OK\r\n":
            conn.sendall(bytes([byte]))
            time.sleep(0.3)

    with _misbehaving(drip) as server:
        started = time.monotonic()
        _refused(_admin("--url", server.url, "--token", "t", "--timeout", "1", "whoami"))
        assert time.monotonic() - started < 10


@pytest.mark.parametrize("announced", [True, False])
def test_an_endless_answer_is_refused_past_16_mib(announced: bool) -> None:
    """An endless body grew the process to gigabytes: past 16 MiB the answer is refused."""

    def endless(conn: socket.socket) -> None:
        length = f"Content-Length: {2**40}\r\n" if announced else ""
        conn.sendall(f"HTTP/1.1 200 OK\r\n{length}\r\n".encode())
        chunk = b"[" * 65536
        while True:
            conn.sendall(chunk)

    with _misbehaving(endless) as server:
        _refused(_admin("--url", server.url, "--token", "t", "whoami"), "more than 16 MiB")


@pytest.mark.parametrize("answer", [b"[1,2]", b'"x"', b'{"ok":true}', b'{"access_token":7}'])
def test_login_print_token_without_a_token_in_the_answer_is_an_error(answer: bytes) -> None:
    with _misbehaving(_send(_answer("200 OK", answer))) as server:
        result = _admin(
            "--url", server.url, "login", "--email", "a@b.c", "--password-stdin", "--print-token",
            stdin="password\n",
        )  # fmt: skip
        _refused(result, "no access token")


def test_the_servers_error_text_is_shown_escaped() -> None:
    """What a server says is shown, never obeyed: an escape sequence cannot clear the screen."""
    body = b'{"error":{"message":"\\u001b[2J\\u001b[Hall good","code":"x\\u001b[31m"}}'
    with _misbehaving(_send(_answer("400 Bad Request", body))) as server:
        result = _admin("--url", server.url, "--token", "t", "whoami")
        _refused(result, "\\x1b[2J\\x1b[Hall good", "(x\\x1b[31m)")
        assert "\x1b" not in result.stderr


def test_a_url_is_shown_without_credentials_or_query() -> None:
    port = free_port()
    for url in (f"http://u:SECRET@127.0.0.1:{port}", f"http://127.0.0.1:{port}/?api_key=SECRET"):
        result = _admin("--url", url, "--token", "t", "whoami")
        _refused(result, f"127.0.0.1:{port}")
        assert "SECRET" not in result.output


def test_a_role_is_never_taken_from_the_environment() -> None:
    """CUBE_ADMIN_MEMBERS_ADD_ROLE=owner made every `members add` grant ownership."""
    answer = _answer("201 Created", b'{"role":"member"}')
    env = {"CUBE_ADMIN_MEMBERS_ADD_ROLE": "owner", "CUBE_ADMIN_DOMAINS_CREATE_OWNER_EMAIL": "x@y"}
    with _misbehaving(_send(answer)) as server:
        added = _admin(
            "--url", server.url, "--token", "t", "members", "add", "acme", "a@b.c", env=env
        )
        created = _admin("--url", server.url, "--token", "t", "domains", "create", "acme", env=env)
        assert added.exit_code == 0 and created.exit_code == 0, (added.output, created.output)
        sent = [json.loads(body) for body in server.bodies]
    assert sent == [{"email": "a@b.c", "role": "member"}, {"alias": "acme", "name": ""}]
