"""``cube admin ...`` against a running admin API."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from click.testing import CliRunner, Result

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


def test_passwords_are_never_command_line_arguments() -> None:
    for command in (["login"], ["users", "create"], ["users", "update"]):
        help_text = CliRunner().invoke(admin, [*command, "--help"]).output
        assert "--password-stdin" in help_text
        assert "--password " not in help_text and "--password=" not in help_text
