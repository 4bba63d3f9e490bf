"""``cube admin ...``: the proxy's admin API from the command line.

Every command is one REST call (see :mod:`proxy.admin_api`) and prints its JSON answer. The
server and credential come from ``--url``/``--token`` or ``CUBE_ADMIN_URL``/``CUBE_ADMIN_TOKEN``
(``--cacert``/``CUBE_ADMIN_CACERT`` for a private CA). Passwords are never taken as arguments
(they would land in shell history and ``ps``): they are prompted for, or read from stdin with
``--password-stdin``. Errors print the server's message (escaped: control characters are shown,
never obeyed) and exit 1, as does an answer that is not the admin API's: not HTTP, not JSON,
over 16 MiB, or not complete within ``--timeout`` seconds (30; the whole call, however slowly
the server sends). A URL is shown without credentials or query. Options that grant powers
(``--admin``, ``--role``, ``--owner-email``, ``--action``, ``--model``, ``--enable``) or skip a
confirmation (``--yes``) are taken from the command line only, never from the environment.

    export CUBE_ADMIN_URL=https://proxy.example:8080
    export CUBE_ADMIN_TOKEN=$(cube admin login --email admin@example.com --print-token)
    cube admin domains create acme --name "Acme"
    cube admin backends add acme https://10.0.0.5:8443 --kind vllm --model llama-3
    cube admin policies set acme policy.json
    cube admin tokens create acme --name ci --action inference --expires-in 2592000
"""

from __future__ import annotations

import functools
import http.client
import json
import ssl
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, NoReturn, TypeVar

import click

from cube_client._text import printable, shown_url

__all__ = ["admin"]

_T = TypeVar("_T")

#: Seconds for a whole call by default: connecting, sending, and the complete answer.
_TIMEOUT = 30.0
#: The longest answer read (the admin API's largest, a page of 1000 audit rows, is far less).
_MAX_ANSWER_BYTES = 16 * 2**20
#: The longest error answer read for its message.
_MAX_ERROR_BYTES = 64 * 1024


class _Answer(NamedTuple):
    status: int
    body: bytes


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib would repeat the bearer token to whatever host (or plain
    http:// URL) a redirect names. The admin API never redirects."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Deadline(Exception):
    """The call did not complete within its time."""


class _TooLarge(Exception):
    """The answer is longer than the limit (nothing past the limit was read)."""


def _read_at_most(response: Any, limit: int) -> bytes:
    length = response.headers.get("Content-Length", "")
    if length.strip().isdigit() and int(length) > limit:
        raise _TooLarge
    body: bytes = response.read(limit + 1)
    if len(body) > limit:
        raise _TooLarge
    return body


def _exchange(
    opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout: float
) -> _Answer:
    """Send ``request``; the status and body of the answer, whatever its status."""
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        try:
            body = _read_at_most(exc, _MAX_ERROR_BYTES)
        except (_TooLarge, http.client.HTTPException, OSError, ValueError):
            body = b""  # the status alone then
        finally:
            exc.close()
        return _Answer(exc.code, body)
    with response:
        return _Answer(response.status, _read_at_most(response, _MAX_ANSWER_BYTES))


def _within(seconds: float, work: Callable[[], _T]) -> _T:
    """``work()``, or :class:`_Deadline` once ``seconds`` have passed.

    A socket timeout bounds each read only: a server sending a byte a second (or a name
    lookup that hangs) would hold the call for ever. The work runs in a daemon thread the
    process does not wait for (``cube admin`` exits right after the call)."""
    outcome: list[tuple[bool, Any]] = []

    def run() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # re-raised in the caller's thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run, name="cube-admin-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if not outcome:
        raise _Deadline
    done, value = outcome[0]
    if not done:
        raise value
    result: _T = value
    return result


def _base_url(url: str) -> str:
    """``url`` checked to be a base URL urllib can send to (an error message otherwise)."""
    shown = shown_url(url)
    if not url.startswith(("https://", "http://")):
        _fail("the URL must start with https:// or http://")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        _fail(f"the URL {shown} is not valid")
    if parts.username is not None or parts.password is not None:
        _fail(f"the URL {shown} holds credentials: give the token with --token")
    if parts.query or parts.fragment:
        _fail(f"the URL {shown} has a query or fragment: give the proxy's base URL")
    if not parts.hostname:
        _fail(f"the URL {shown} names no host")
    return url.rstrip("/")


@dataclass
class _Client:
    url: str
    token: str | None
    cacert: str | None
    timeout: float = _TIMEOUT

    def call(self, method: str, path: str, body: Any = None, *, auth: bool = True) -> Any:
        if not self.url:
            _fail("no server: pass --url or set CUBE_ADMIN_URL")
        base = _base_url(self.url)
        shown = shown_url(base)
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if auth:
            if not self.token:
                _fail(
                    "no credential: pass --token or set CUBE_ADMIN_TOKEN (see `cube admin login`)"
                )
            if not all(0x21 <= ord(c) <= 0x7E for c in self.token):
                # Not quoted back: urllib's error would show the whole header.
                _fail("the token contains characters no HTTP header can carry (a newline?)")
            headers["Authorization"] = f"Bearer {self.token}"
        target = base + path
        try:
            request = urllib.request.Request(target, data=data, method=method, headers=headers)  # noqa: S310 - scheme checked by _base_url
        except ValueError:
            _fail(f"the URL {shown} is not valid")
        try:
            context = ssl.create_default_context(cafile=self.cacert) if self.cacert else None
        except (OSError, ssl.SSLError) as exc:
            _fail(f"cannot use the CA file {self.cacert}: {exc}")
        opener = urllib.request.build_opener(
            _NoRedirects(), urllib.request.HTTPSHandler(context=context)
        )
        try:
            answer = _within(
                self.timeout, functools.partial(_exchange, opener, request, self.timeout)
            )
        except _Deadline:
            _fail(f"{shown} did not answer within {self.timeout:g} seconds (--timeout)")
        except _TooLarge:
            _fail(
                f"{shown} answered more than {_MAX_ANSWER_BYTES // 2**20} MiB: "
                "is this a cube-proxy admin URL?"
            )
        except http.client.InvalidURL:  # not a ValueError: checked when sending
            _fail(f"cannot send the request to {shown}: the URL is not valid")
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, http.client.InvalidURL):
                _fail(f"cannot send the request to {shown}: the URL is not valid")
            _fail(f"cannot reach {shown}: {printable(str(reason))}")
        except http.client.HTTPException as exc:  # BadStatusLine, IncompleteRead, ...
            _fail(f"{shown} did not answer HTTP (a cube-proxy admin URL?): {type(exc).__name__}")
        except OSError as exc:
            _fail(f"cannot reach {shown}: {printable(str(exc))}")
        except ValueError:  # an invalid URL (urllib checks some parts only when sending)
            _fail(f"cannot send the request to {shown}: the URL is not valid")
        if 300 <= answer.status < 400:
            _fail(f"{shown} redirects (HTTP {answer.status}); give the admin API's own URL")
        if not 200 <= answer.status < 300:
            _fail(_error_message(answer.status, answer.body))
        try:
            return json.loads(answer.body) if answer.body else None
        except (ValueError, RecursionError):
            _fail(f"{shown} did not answer JSON: is this a cube-proxy admin URL?")


def _error_message(status: int, payload: bytes) -> str:
    """The server's error message, escaped: a terminal shows it, never obeys it."""
    try:
        error = json.loads(payload)["error"]
        message, code = error["message"], error.get("code", "")
    except (ValueError, KeyError, TypeError, RecursionError):
        return f"HTTP {status}"
    if not isinstance(message, str) or not isinstance(code, str):
        return f"HTTP {status}"
    return f"{status}: {printable(message)} ({printable(code)})"


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _print(value: Any) -> None:
    if value is not None:
        click.echo(json.dumps(value, indent=2, sort_keys=True))


def _q(value: str) -> str:
    return urllib.parse.quote(value, safe="")


def _read_password(password_stdin: bool, prompt: str = "Password") -> str:
    if password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
        if not password:
            _fail("no password on stdin")
        return password
    value: str = click.prompt(prompt, hide_input=True)
    return value


pass_client = click.make_pass_decorator(_Client)


@click.group()
@click.option("--url", envvar="CUBE_ADMIN_URL", default="", help="The proxy's base URL.")
@click.option("--token", envvar="CUBE_ADMIN_TOKEN", default=None, help="An access token or PAT.")
@click.option(
    "--cacert",
    envvar="CUBE_ADMIN_CACERT",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="A CA bundle to verify the proxy's TLS certificate with.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1, max=86400),
    default=_TIMEOUT,
    show_default=True,
    help="Seconds for a whole call, the complete answer included.",
)
@click.pass_context
def admin(
    ctx: click.Context, url: str, token: str | None, cacert: str | None, timeout: float
) -> None:
    """Administer a cube-proxy: users, domains, members, tokens, backends, policies."""
    ctx.obj = _Client(url=url, token=token, cacert=cacert, timeout=timeout)


# -- session -------------------------------------------------------------------------------------


@admin.command()
@click.option("--email", required=True, envvar="CUBE_ADMIN_EMAIL")
@click.option("--password-stdin", is_flag=True, help="Read the password from stdin.")
@click.option("--print-token", is_flag=True, help="Print only the access token.")
@pass_client
def login(client: _Client, email: str, password_stdin: bool, print_token: bool) -> None:
    """Log in; prints the access and refresh tokens."""
    password = _read_password(password_stdin)
    answer = client.call("POST", "/auth/login", {"email": email, "password": password}, auth=False)
    if print_token:
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if (
            not isinstance(token, str)
            or not token
            or not token.isascii()
            or not token.isprintable()
        ):
            _fail("the server's answer holds no access token: is this a cube-proxy admin URL?")
        click.echo(token)
    else:
        _print(answer)


@admin.command()
@click.option("--refresh-token-stdin", is_flag=True, required=True)
@pass_client
def refresh(client: _Client, refresh_token_stdin: bool) -> None:
    """Rotate a refresh token (read from stdin) for a new pair."""
    del refresh_token_stdin
    token = sys.stdin.readline().strip()
    _print(client.call("POST", "/auth/refresh", {"refresh_token": token}, auth=False))


@admin.command()
@pass_client
def logout(client: _Client) -> None:
    """End the session of the access token in use."""
    client.call("POST", "/auth/logout")
    click.echo("logged out")


@admin.command()
@pass_client
def whoami(client: _Client) -> None:
    """The caller and their domains."""
    _print(client.call("GET", "/admin/me"))


# -- users ---------------------------------------------------------------------------------------


@admin.group()
def users() -> None:
    """Users (platform administrators)."""


@users.command("list")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@pass_client
def users_list(client: _Client, limit: int, offset: int) -> None:
    _print(client.call("GET", f"/admin/users?limit={limit}&offset={offset}"))


@users.command("create")
@click.argument("email")
@click.option("--name", default="")
@click.option(
    "--admin", "is_admin", is_flag=True, help="A platform administrator.", allow_from_autoenv=False
)
@click.option("--password-stdin", is_flag=True)
@click.option("--no-password", is_flag=True, help="No password login (e.g. OIDC only).")
@pass_client
def users_create(
    client: _Client,
    *,
    email: str,
    name: str,
    is_admin: bool,
    password_stdin: bool,
    no_password: bool,
) -> None:
    body: dict[str, Any] = {"email": email, "name": name, "is_admin": is_admin}
    if not no_password:
        body["password"] = _read_password(password_stdin, "New user's password")
    _print(client.call("POST", "/admin/users", body))


@users.command("get")
@click.argument("user_id")
@pass_client
def users_get(client: _Client, user_id: str) -> None:
    _print(client.call("GET", f"/admin/users/{_q(user_id)}"))


@users.command("update")
@click.argument("user_id")
@click.option("--name", default=None)
@click.option("--email", default=None)
# Granting platform-admin powers and skipping a confirmation are said on the command line only.
@click.option("--admin/--no-admin", "is_admin", default=None, allow_from_autoenv=False)
@click.option("--password-stdin", is_flag=True, help="Set a new password (read from stdin).")
@click.option(
    "--current-password-stdin",
    is_flag=True,
    help="Changing your own password: read the current one from stdin first (its first line; "
    "the new one is the second).",
)
@pass_client
def users_update(
    client: _Client,
    *,
    user_id: str,
    name: str | None,
    email: str | None,
    is_admin: bool | None,
    password_stdin: bool,
    current_password_stdin: bool,
) -> None:
    body: dict[str, Any] = {}
    if name is not None:
        body["name"] = name
    if email is not None:
        body["email"] = email
    if is_admin is not None:
        body["is_admin"] = is_admin
    if current_password_stdin:
        if not password_stdin:
            _fail("--current-password-stdin goes with --password-stdin")
        body["current_password"] = _read_password(True)
    if password_stdin:
        body["password"] = _read_password(True)
    if not body:
        _fail("nothing to change")
    _print(client.call("PATCH", f"/admin/users/{_q(user_id)}", body))


@users.command("disable")
@click.argument("user_id")
@pass_client
def users_disable(client: _Client, user_id: str) -> None:
    _print(client.call("PATCH", f"/admin/users/{_q(user_id)}", {"disabled": True}))


@users.command("enable")
@click.argument("user_id")
@pass_client
def users_enable(client: _Client, user_id: str) -> None:
    _print(client.call("PATCH", f"/admin/users/{_q(user_id)}", {"disabled": False}))


@users.command("delete")
@click.argument("user_id")
@pass_client
def users_delete(client: _Client, user_id: str) -> None:
    client.call("DELETE", f"/admin/users/{_q(user_id)}")
    click.echo(f"deleted user {user_id}")


# -- domains -------------------------------------------------------------------------------------


@admin.group()
def domains() -> None:
    """Domains (tenants)."""


@domains.command("list")
@pass_client
def domains_list(client: _Client) -> None:
    _print(client.call("GET", "/admin/domains"))


@domains.command("create")
@click.argument("alias")
@click.option("--name", default="")
@click.option(
    "--owner-email",
    default=None,
    help="The owner (default: you).",
    allow_from_autoenv=False,  # who owns the domain is said on the command line
)
@pass_client
def domains_create(client: _Client, alias: str, name: str, owner_email: str | None) -> None:
    body: dict[str, Any] = {"alias": alias, "name": name}
    if owner_email:
        body["owner_email"] = owner_email
    _print(client.call("POST", "/admin/domains", body))


@domains.command("get")
@click.argument("domain")
@pass_client
def domains_get(client: _Client, domain: str) -> None:
    _print(client.call("GET", f"/admin/domains/{_q(domain)}"))


@domains.command("update")
@click.argument("domain")
@click.option("--name", required=True)
@pass_client
def domains_update(client: _Client, domain: str, name: str) -> None:
    _print(client.call("PATCH", f"/admin/domains/{_q(domain)}", {"name": name}))


@domains.command("delete")
@click.argument("domain")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.", allow_from_autoenv=False)
@pass_client
def domains_delete(client: _Client, domain: str, yes: bool) -> None:
    if not yes:
        click.confirm(f"Delete domain {domain} with its members, backends and tokens?", abort=True)
    client.call("DELETE", f"/admin/domains/{_q(domain)}")
    click.echo(f"deleted domain {domain}")


# -- members -------------------------------------------------------------------------------------


@admin.group()
def members() -> None:
    """Members of a domain and their roles (owner, admin, member)."""


@members.command("list")
@click.argument("domain")
@pass_client
def members_list(client: _Client, domain: str) -> None:
    _print(client.call("GET", f"/admin/domains/{_q(domain)}/members"))


@members.command("add")
@click.argument("domain")
@click.argument("email")
@click.option(
    "--role",
    type=click.Choice(["member", "admin", "owner"]),
    default="member",
    show_default=True,
    allow_from_autoenv=False,  # a role's powers are said on the command line
)
@pass_client
def members_add(client: _Client, domain: str, email: str, role: str) -> None:
    _print(
        client.call("POST", f"/admin/domains/{_q(domain)}/members", {"email": email, "role": role})
    )


@members.command("set-role")
@click.argument("domain")
@click.argument("user_id")
@click.argument("role", type=click.Choice(["member", "admin", "owner"]))
@pass_client
def members_set_role(client: _Client, domain: str, user_id: str, role: str) -> None:
    _print(client.call("PUT", f"/admin/domains/{_q(domain)}/members/{_q(user_id)}", {"role": role}))


@members.command("remove")
@click.argument("domain")
@click.argument("user_id")
@pass_client
def members_remove(client: _Client, domain: str, user_id: str) -> None:
    client.call("DELETE", f"/admin/domains/{_q(domain)}/members/{_q(user_id)}")
    click.echo(f"removed {user_id} from {domain}")


# -- tokens --------------------------------------------------------------------------------------


@admin.group()
def tokens() -> None:
    """Personal access tokens (API keys for programs)."""


@tokens.command("list")
@click.option("--domain", default=None, help="All tokens of a domain (needs manage_members).")
@pass_client
def tokens_list(client: _Client, domain: str | None) -> None:
    if domain:
        _print(client.call("GET", f"/admin/domains/{_q(domain)}/tokens"))
    else:
        _print(client.call("GET", "/admin/tokens"))


@tokens.command("create")
@click.argument("domain")
@click.option("--name", default="")
@click.option(
    "--action",
    "actions",
    multiple=True,
    allow_from_autoenv=False,  # a token's powers are said on the command line
    type=click.Choice(
        ["inference", "read_audit", "manage_domain", "manage_members", "manage_backends"]
    ),
    help="Repeatable; default: inference.",
)
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Repeatable; default: any model.",
    allow_from_autoenv=False,
)
@click.option("--expires-in", type=click.IntRange(min=1), default=None, help="Seconds.")
@pass_client
def tokens_create(
    client: _Client,
    *,
    domain: str,
    name: str,
    actions: tuple[str, ...],
    models: tuple[str, ...],
    expires_in: int | None,
) -> None:
    """Create a token. Its secret is printed now and can never be shown again."""
    body: dict[str, Any] = {"domain": domain, "name": name}
    if actions:
        body["actions"] = list(actions)
    if models:
        body["models"] = list(models)
    if expires_in is not None:
        body["expires_in"] = expires_in
    answer = client.call("POST", "/admin/tokens", body)
    _print(answer)
    click.echo("Store the token now: it is not shown again.", err=True)


@tokens.command("get")
@click.argument("token_id")
@pass_client
def tokens_get(client: _Client, token_id: str) -> None:
    _print(client.call("GET", f"/admin/tokens/{_q(token_id)}"))


@tokens.command("revoke")
@click.argument("token_id")
@pass_client
def tokens_revoke(client: _Client, token_id: str) -> None:
    _print(client.call("DELETE", f"/admin/tokens/{_q(token_id)}"))


# -- backends ------------------------------------------------------------------------------------


@admin.group()
def backends() -> None:
    """A domain's agents (https://host:port), their kind and models."""


@backends.command("list")
@click.argument("domain")
@pass_client
def backends_list(client: _Client, domain: str) -> None:
    _print(client.call("GET", f"/admin/domains/{_q(domain)}/backends"))


@backends.command("add")
@click.argument("domain")
@click.argument("url")
@click.option("--kind", type=click.Choice(["vllm", "openai", "ollama"]), default="vllm")
@click.option(
    "--model", "models", multiple=True, required=True, help="Repeatable.", allow_from_autoenv=False
)
@click.option("--disabled", is_flag=True)
@pass_client
def backends_add(
    client: _Client, *, domain: str, url: str, kind: str, models: tuple[str, ...], disabled: bool
) -> None:
    body = {"url": url, "kind": kind, "models": list(models), "enabled": not disabled}
    _print(client.call("POST", f"/admin/domains/{_q(domain)}/backends", body))


@backends.command("update")
@click.argument("domain")
@click.argument("backend_id")
@click.option("--url", default=None)
@click.option("--kind", type=click.Choice(["vllm", "openai", "ollama"]), default=None)
@click.option(
    "--model",
    "models",
    multiple=True,
    help="Repeatable; replaces the list.",
    allow_from_autoenv=False,
)
@click.option("--enable/--disable", "enabled", default=None, allow_from_autoenv=False)
@pass_client
def backends_update(
    client: _Client,
    *,
    domain: str,
    backend_id: str,
    url: str | None,
    kind: str | None,
    models: tuple[str, ...],
    enabled: bool | None,
) -> None:
    body: dict[str, Any] = {}
    if url is not None:
        body["url"] = url
    if kind is not None:
        body["kind"] = kind
    if models:
        body["models"] = list(models)
    if enabled is not None:
        body["enabled"] = enabled
    if not body:
        _fail("nothing to change")
    _print(client.call("PATCH", f"/admin/domains/{_q(domain)}/backends/{_q(backend_id)}", body))


@backends.command("remove")
@click.argument("domain")
@click.argument("backend_id")
@pass_client
def backends_remove(client: _Client, domain: str, backend_id: str) -> None:
    client.call("DELETE", f"/admin/domains/{_q(domain)}/backends/{_q(backend_id)}")
    click.echo(f"removed backend {backend_id}")


# -- policies and limits -------------------------------------------------------------------------


@admin.group()
def policies() -> None:
    """A domain's attestation policy (cube-policy/1)."""


@policies.command("get")
@click.argument("domain")
@pass_client
def policies_get(client: _Client, domain: str) -> None:
    _print(client.call("GET", f"/admin/domains/{_q(domain)}/policy"))


@policies.command("set")
@click.argument("domain")
@click.argument("policy_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@pass_client
def policies_set(client: _Client, domain: str, policy_file: Path) -> None:
    """Set the policy from a file (as `cube measure` writes it); the server validates it."""
    try:
        document = json.loads(policy_file.read_text())
    except (OSError, ValueError) as exc:
        _fail(f"cannot read {policy_file}: {exc}")
    _print(client.call("PUT", f"/admin/domains/{_q(domain)}/policy", document))


@policies.command("delete")
@click.argument("domain")
@pass_client
def policies_delete(client: _Client, domain: str) -> None:
    client.call("DELETE", f"/admin/domains/{_q(domain)}/policy")
    click.echo(f"removed the policy of {domain} (its agents are refused until one is set)")


@admin.group()
def limits() -> None:
    """A domain's rate limits (per minute; per domain and per token)."""


@limits.command("get")
@click.argument("domain")
@pass_client
def limits_get(client: _Client, domain: str) -> None:
    _print(client.call("GET", f"/admin/domains/{_q(domain)}/limits"))


def _limit(value: str | None) -> int | None:
    if value is None or value in ("none", "unlimited"):
        return None
    try:
        number = int(value)
    except ValueError:
        _fail(f"{value!r} is not a number (or 'none')")
    return number


@limits.command("set")
@click.argument("domain")
@click.option("--requests-per-minute", default=None, help="A number, or 'none'.")
@click.option("--tokens-per-minute", default=None)
@click.option("--token-requests-per-minute", default=None)
@click.option("--token-tokens-per-minute", default=None)
@pass_client
def limits_set(
    client: _Client,
    *,
    domain: str,
    requests_per_minute: str | None,
    tokens_per_minute: str | None,
    token_requests_per_minute: str | None,
    token_tokens_per_minute: str | None,
) -> None:
    """Change the given limits (the others stay)."""
    given = {
        "requests_per_minute": requests_per_minute,
        "tokens_per_minute": tokens_per_minute,
        "token_requests_per_minute": token_requests_per_minute,
        "token_tokens_per_minute": token_tokens_per_minute,
    }
    body = {k: _limit(v) for k, v in given.items() if v is not None}
    if not body:
        _fail("nothing to change")
    _print(client.call("PATCH", f"/admin/domains/{_q(domain)}/limits", body))


# -- audit, usage, keys --------------------------------------------------------------------------


@admin.command()
@click.argument("domain")
@click.option("--limit", type=click.IntRange(1, 1000), default=100)
@click.option("--before", type=int, default=None, help="Rows older than this id.")
@click.option("--event", default=None)
@pass_client
def audit(client: _Client, domain: str, limit: int, before: int | None, event: str | None) -> None:
    """A domain's audit log, newest first (domain admins)."""
    query: dict[str, Any] = {"limit": limit}
    if before is not None:
        query["before"] = before
    if event is not None:
        query["event"] = event
    _print(client.call("GET", f"/admin/domains/{_q(domain)}/audit?{urllib.parse.urlencode(query)}"))


@admin.command()
@click.argument("domain")
@pass_client
def usage(client: _Client, domain: str) -> None:
    """Tokens used per user and model in a domain (domain admins)."""
    _print(client.call("GET", f"/admin/domains/{_q(domain)}/usage"))


@admin.group()
def keys() -> None:
    """The proxy's signing keys (platform administrators)."""


@keys.command("list")
@pass_client
def keys_list(client: _Client) -> None:
    _print(client.call("GET", "/admin/keys"))


@keys.command("rotate")
@pass_client
def keys_rotate(client: _Client) -> None:
    _print(client.call("POST", "/admin/keys/rotate"))
