"""The REST admin API: users, domains, members, tokens, backends, policies, limits, audit.

Routes (all JSON; errors are ``{"error": {"message", "type", "code"}}``)::

    POST   /auth/login                         {email, password} -> access + refresh token
    POST   /auth/refresh                       {refresh_token} -> rotated pair
    POST   /auth/logout                        bearer access token, or {refresh_token}
    GET    /.well-known/jwks.json              the proxy's public signing keys
    GET    /admin/me                           the caller and their domains
    GET    /admin/users                        platform admins
    POST   /admin/users                        platform admins {email, password?, name?, is_admin?}
    GET    /admin/users/{user_id}              platform admins, or the user
    PATCH  /admin/users/{user_id}              platform admins; a user: name, password
    DELETE /admin/users/{user_id}              platform admins
    GET    /admin/domains                      the caller's domains (platform admins: all)
    POST   /admin/domains                      platform admins {alias, name?, owner_id?}
    GET    /admin/domains/{d}                  members
    PATCH  /admin/domains/{d}                  manage_domain {name}
    DELETE /admin/domains/{d}                  owners, platform admins
    GET    /admin/domains/{d}/members          manage_members
    POST   /admin/domains/{d}/members          manage_members {user_id | email, role}
    GET|PUT|PATCH|DELETE /admin/domains/{d}/members/{user_id}
    GET    /admin/domains/{d}/backends         manage_backends
    POST   /admin/domains/{d}/backends         manage_backends {url, kind, models, enabled?}
    GET|PATCH|DELETE /admin/domains/{d}/backends/{backend_id}
    GET    /admin/domains/{d}/policy           members
    PUT    /admin/domains/{d}/policy           manage_domain (a cube-policy/1 document)
    DELETE /admin/domains/{d}/policy           manage_domain
    GET    /admin/domains/{d}/limits           members
    PUT|PATCH /admin/domains/{d}/limits        manage_domain
    GET    /admin/domains/{d}/audit            read_audit (?limit=&before=&event=)
    GET    /admin/domains/{d}/usage            read_audit (?since=)
    GET    /admin/domains/{d}/tokens           manage_members (metadata of the domain's PATs)
    GET    /admin/tokens                       the caller's PATs
    POST   /admin/tokens                       {domain, name?, actions?, models?, expires_in?}
    GET    /admin/tokens/{id}
    DELETE /admin/tokens/{id}                  revoke
    GET    /admin/keys                         platform admins (metadata only)
    POST   /admin/keys/rotate                  platform admins

``{d}`` is a domain alias or id. A domain the caller has no rights in answers 404 exactly like
one that does not exist, and so do its members, backends and tokens: nothing of one domain is
visible from another. Secrets are returned only by the response that creates them (the PAT of
``POST /admin/tokens``, the tokens of ``/auth/login`` and ``/auth/refresh``) and never logged.
Domain-scoped changes are written to the domain's audit log (event ``admin``).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from attestation.errors import AttestationError
from attestation.policy import load_policy
from cube._http import BodyTooLarge as TooLong
from cube._http import is_content_encoded, read_stream_at_most
from proxy.db.engine import is_unavailable
from proxy.directory import AuditRecord, BackendSpec
from proxy.gateway.errors import DATABASE_UNAVAILABLE
from proxy.gateway.service import GATEWAY
from proxy.identity import IDENTITY, Identity, IdentityConfig, StartupError
from proxy.identity.errors import (
    BodyTooLarge,
    Forbidden,
    IdentityError,
    Invalid,
    NotFound,
    TooManyAttempts,
    Unauthorized,
    UnsupportedEncoding,
)
from proxy.identity.models import Principal, backend_json, check_email, limits_json
from proxy.identity.records import read_audit, usage_summary
from proxy.identity.service import DomainAccess

__all__ = ["JWKS_PATH", "main", "make_app", "setup"]

log = logging.getLogger("cube.proxy.admin")

JWKS_PATH = "/.well-known/jwks.json"
PRINCIPAL = "cube_admin_principal"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_NO_STORE = {"Cache-Control": "no-store"}


# -- responses and errors ------------------------------------------------------------------------


def error_response(
    status: int, message: str, *, type_: str, code: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": type_, "code": code}},
        status=status,
        headers=headers,
    )


def _json_errors(handler: Handler) -> Handler:
    """Every failure becomes a JSON error with the right status; never a traceback."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            _check_target(request)
            return await handler(request)
        except TooManyAttempts as exc:
            return error_response(
                exc.status,
                exc.message,
                type_=exc.type,
                code=exc.code,
                headers={"Retry-After": str(exc.retry_after)},
            )
        except Unauthorized as exc:
            return error_response(
                401,
                exc.message,
                type_=exc.type,
                code=exc.code,
                headers={"WWW-Authenticate": 'Bearer realm="cube-proxy"'},
            )
        except BodyTooLarge as exc:
            response = error_response(exc.status, exc.message, type_=exc.type, code=exc.code)
            # Not kept alive: aiohttp would otherwise read (and drop) the rest of the body
            # for up to 10 s before the connection could serve another request.
            response.force_close()
            return response
        except IdentityError as exc:
            return error_response(exc.status, exc.message, type_=exc.type, code=exc.code)
        except web.HTTPException:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if is_unavailable(exc):
                log.error("database unavailable: %s", type(exc).__name__)  # noqa: TRY400
                message, code = DATABASE_UNAVAILABLE
                return error_response(
                    503,
                    message,
                    type_="service_unavailable",
                    code=code,
                    headers={"Retry-After": "1"},
                )
            # Only the type: a message could quote a value from the request.
            log.error(  # noqa: TRY400 - no traceback: it could quote request values
                "admin request failed: %s %s: %s",
                request.method,
                request.path,
                type(exc).__name__,
            )
            return error_response(
                500, "internal error", type_="server_error", code="internal_error"
            )

    return wrapped


def _identity(request: web.Request) -> Identity:
    return request.app[IDENTITY]


_MAX_NESTING = 32  # far deeper than any admin body (a policy is four levels)


def _check_text(value: object, depth: int = 0) -> None:
    """Refuse what no field may hold and the store could not keep: a NUL (PostgreSQL text
    cannot), a lone surrogate (not UTF-8: it would fail later, at hashing or storing), and
    nesting deeper than any admin body needs."""
    if depth > _MAX_NESTING:
        raise Invalid("the request body is nested too deeply")
    if isinstance(value, str):
        _check_string(value, "the request body")
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, depth + 1)
            _check_text(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_text(item, depth + 1)


def _check_string(value: str, where: str) -> None:
    if "\x00" in value:
        raise Invalid(f"{where} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise Invalid(f"{where} contains text that is not valid Unicode") from None


#: The largest admin request body (a policy is a few KiB). The application's own limit is the
#: inference one (64 MiB), and an admin body is parsed on the event loop: 30 MiB sent to
#: /auth/login, before any credential, held every tenant's traffic for seconds.
MAX_ADMIN_BODY = 1024 * 1024


async def _read_bounded(request: web.Request) -> bytes:
    try:
        return await read_stream_at_most(request.content, MAX_ADMIN_BODY, request.content_length)
    except TooLong:
        raise BodyTooLarge(
            f"the request body exceeds the admin API's {MAX_ADMIN_BODY} bytes"
        ) from None


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.body_exists:
        return {}
    return _parse_body(await _raw_body(request))


async def _raw_body(request: web.Request) -> bytes:
    if is_content_encoded(request.headers):
        raise UnsupportedEncoding("request bodies must not be content-encoded")
    return await _read_bounded(request)


def _parse_body(raw: bytes) -> dict[str, Any]:
    # UTF-8 whatever the Content-Type says (RFC 8259): an unknown charset is no reason to fail.
    try:
        value = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise Invalid("the request body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise Invalid("the request body must be a JSON object")
    _check_text(value)
    return value


def _check_target(request: web.Request) -> None:
    """A NUL or a lone surrogate in the path or the query names nothing the store holds."""
    _check_string(request.path, "the request path")
    for key, item in request.query.items():
        _check_string(key + item, "the query")


def _bearer(request: web.Request) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("a bearer token is required", code="missing_token")
    return token.strip()


async def _principal(request: web.Request) -> Principal:
    return await _identity(request).authenticate_principal(_bearer(request))


def _platform_admin(principal: Principal) -> bool:
    """Platform rights come with a login (or OIDC) token, never with a domain-bound PAT."""
    return principal.user.is_admin and principal.pat_domain_id is None


def _require_platform_admin(principal: Principal) -> None:
    if not _platform_admin(principal):
        raise Forbidden("this requires a platform administrator")


def _int_query(
    request: web.Request, name: str, default: int | None, *, maximum: int, minimum: int = 1
) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError as exc:
        raise Invalid(f"{name} must be an integer") from exc
    if not minimum <= value <= maximum:
        raise Invalid(f"{name} must be between {minimum} and {maximum}")
    return value


async def _audit_admin(
    request: web.Request,
    principal: Principal,
    domain_id: str,
    status: int,
    detail: str,
) -> None:
    """Record a domain-scoped admin change in the domain's audit log (never secrets)."""
    await _identity(request).record_audit(
        AuditRecord(
            domain_id=domain_id,
            user_id=principal.user.id,
            route=f"{request.method} {request.path}",
            status=status,
            when=datetime.now(UTC),
            token_id=principal.token_id,
            event="admin",
            detail=detail,
        )
    )


async def _access(request: web.Request, principal: Principal) -> DomainAccess:
    return await _identity(request).domain_access(principal, request.match_info["domain"])


# -- auth ----------------------------------------------------------------------------------------


@_json_errors
async def login(request: web.Request) -> web.Response:
    body = await _body(request)
    pair = await _identity(request).login(body.get("email"), body.get("password"))
    return web.json_response(pair.to_json(), headers=_NO_STORE)


@_json_errors
async def refresh(request: web.Request) -> web.Response:
    body = await _body(request)
    pair = await _identity(request).refresh(body.get("refresh_token"))
    return web.json_response(pair.to_json(), headers=_NO_STORE)


@_json_errors
async def logout(request: web.Request) -> web.Response:
    identity = _identity(request)
    body = await _body(request)
    if "Authorization" in request.headers:
        principal = await _principal(request)
        if principal.session_id is None:
            raise Invalid("only a login session can log out (revoke a PAT instead)")
        await identity.logout(session_id=principal.session_id)
    elif isinstance(body.get("refresh_token"), str):
        await identity.logout(refresh_token=body["refresh_token"])
    else:
        raise Invalid("send the access token (Authorization) or the refresh_token")
    return web.Response(status=204)


async def jwks(request: web.Request) -> web.Response:
    return web.json_response(
        _identity(request).issuer().jwks(), headers={"Cache-Control": "public, max-age=60"}
    )


# -- me and users --------------------------------------------------------------------------------


@_json_errors
async def me(request: web.Request) -> web.Response:
    principal = await _principal(request)
    domains = await _identity(request).list_domains(principal)
    return web.json_response(
        {
            "user": principal.user.to_json(),
            "token_kind": principal.token_kind,
            "token_id": principal.token_id,
            "domains": [
                {"id": d.id, "alias": d.alias, "name": d.name, "role": role}
                for d, role in domains
                if role is not None
            ],
        }
    )


@_json_errors
async def list_users(request: web.Request) -> web.Response:
    _require_platform_admin(await _principal(request))
    limit = _int_query(request, "limit", 100, maximum=1000) or 100
    offset = _int_query(request, "offset", 0, maximum=10**9, minimum=0) or 0
    found = await _identity(request).list_users(limit=limit, offset=offset)
    return web.json_response({"users": [u.to_json() for u in found]})


@_json_errors
async def create_user(request: web.Request) -> web.Response:
    _require_platform_admin(await _principal(request))
    body = await _body(request)
    _only(body, {"email", "password", "name", "is_admin"})
    is_admin = body.get("is_admin", False)
    if not isinstance(is_admin, bool):
        raise Invalid("is_admin must be true or false")
    user = await _identity(request).create_user(
        email=body.get("email"),
        password=body.get("password"),
        name=body.get("name"),
        is_admin=is_admin,
    )
    return web.json_response(user.to_json(), status=201)


def _only(body: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise Invalid(f"unknown fields: {', '.join(sorted(unknown))}")


def _self_or_admin(principal: Principal, user_id: str) -> None:
    if principal.user.id != user_id and not _platform_admin(principal):
        raise NotFound("no such user")


@_json_errors
async def get_user(request: web.Request) -> web.Response:
    principal = await _principal(request)
    user_id = request.match_info["user_id"]
    _self_or_admin(principal, user_id)
    return web.json_response((await _identity(request).get_user(user_id)).to_json())


@_json_errors
async def update_user(request: web.Request) -> web.Response:
    principal = await _principal(request)
    user_id = request.match_info["user_id"]
    _self_or_admin(principal, user_id)
    body = await _body(request)
    _only(body, {"email", "name", "password", "current_password", "is_admin", "disabled"})
    identity = _identity(request)
    admin = _platform_admin(principal)
    if not admin:
        if principal.pat_domain_id is not None:
            raise Forbidden("a personal access token cannot change the account; log in")
        if {"email", "is_admin", "disabled"} & set(body):
            raise Forbidden("only a platform administrator can change that")
    if "password" in body and principal.user.id == user_id:
        # Changing one's own password needs the current one (a stolen session is not enough).
        current = body.get("current_password")
        if not isinstance(current, str):
            raise Invalid("current_password is required to change your password")
        if not await identity.check_password(principal.user, current):
            raise Forbidden("current_password is wrong")
    for flag in ("is_admin", "disabled"):
        if flag in body and not isinstance(body[flag], bool):
            raise Invalid(f"{flag} must be true or false")
    user = await identity.update_user(
        user_id,
        email=body.get("email"),
        name=body.get("name"),
        password=body.get("password"),
        is_admin=body.get("is_admin"),
        disabled=body.get("disabled"),
    )
    return web.json_response(user.to_json())


@_json_errors
async def delete_user(request: web.Request) -> web.Response:
    _require_platform_admin(await _principal(request))
    await _identity(request).delete_user(request.match_info["user_id"])
    return web.Response(status=204)


# -- domains -------------------------------------------------------------------------------------


def _domain_json(access: DomainAccess) -> dict[str, Any]:
    out = access.domain.to_json()
    out["role"] = access.role
    out["actions"] = sorted(access.actions)
    return out


@_json_errors
async def list_domains(request: web.Request) -> web.Response:
    principal = await _principal(request)
    found = await _identity(request).list_domains(principal)
    return web.json_response({"domains": [{**d.to_json(), "role": role} for d, role in found]})


@_json_errors
async def create_domain(request: web.Request) -> web.Response:
    principal = await _principal(request)
    _require_platform_admin(principal)
    body = await _body(request)
    _only(body, {"alias", "name", "owner_id", "owner_email"})
    identity = _identity(request)
    owner_id = body.get("owner_id")
    if "owner_email" in body:
        owner = await identity.find_user(check_email(body["owner_email"]))
        if owner is None:
            raise NotFound("no such user")
        owner_id = owner.id
    if owner_id is None:
        owner_id = principal.user.id
    if not isinstance(owner_id, str):
        raise Invalid("owner_id must be a string")
    domain = await identity.create_domain(
        alias=body.get("alias"), name=body.get("name"), owner_id=owner_id
    )
    await _audit_admin(request, principal, domain.id, 201, f"domain created; owner {owner_id}")
    return web.json_response(domain.to_json(), status=201)


@_json_errors
async def get_domain(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    return web.json_response(_domain_json(access))


@_json_errors
async def update_domain(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    access.require("manage_domain")
    body = await _body(request)
    _only(body, {"name"})
    if "name" not in body:
        raise Invalid("nothing to change (give a name)")  # a PATCH of {} wiped the name
    await _identity(request).update_domain(access.domain.id, name=body["name"])
    await _audit_admin(request, principal, access.domain.id, 200, "domain renamed")
    access = await _access(request, principal)
    return web.json_response(_domain_json(access))


@_json_errors
async def delete_domain(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    if not access.is_owner and not _platform_admin(principal):
        raise Forbidden("only an owner (logged in) or a platform administrator can delete a domain")
    await _identity(request).delete_domain(access.domain.id)
    await _audit_admin(request, principal, access.domain.id, 204, "domain deleted")
    return web.Response(status=204)


# -- members -------------------------------------------------------------------------------------


@_json_errors
async def list_members(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    access.require("manage_members")
    found = await _identity(request).list_members(access.domain.id)
    return web.json_response({"members": [m.to_json() for m in found]})


@_json_errors
async def add_member(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    access.require("manage_members")
    body = await _body(request)
    _only(body, {"user_id", "email", "role"})
    identity = _identity(request)
    user_id = body.get("user_id")
    if "email" in body:
        user = await identity.find_user(check_email(body["email"]))
        if user is None:
            raise NotFound("no such user")
        user_id = user.id
    if not isinstance(user_id, str):
        raise Invalid("user_id or email is required")
    member = await identity.set_member(
        access,
        user_id=user_id,
        role=body.get("role", "member"),
        platform_admin=_platform_admin(principal),
        adding=True,
    )
    await _audit_admin(
        request, principal, access.domain.id, 201, f"member {user_id} set to {member.role}"
    )
    return web.json_response(member.to_json(), status=201)


@_json_errors
async def get_member(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    access.require("manage_members")
    member = await _identity(request).get_member(access.domain.id, request.match_info["user_id"])
    return web.json_response(member.to_json())


@_json_errors
async def set_member_role(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    access.require("manage_members")
    identity = _identity(request)
    user_id = request.match_info["user_id"]
    await identity.get_member(access.domain.id, user_id)
    body = await _body(request)
    _only(body, {"role"})
    member = await identity.set_member(
        access, user_id=user_id, role=body.get("role"), platform_admin=_platform_admin(principal)
    )
    await _audit_admin(
        request, principal, access.domain.id, 200, f"member {user_id} set to {member.role}"
    )
    return web.json_response(member.to_json())


@_json_errors
async def remove_member(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    user_id = request.match_info["user_id"]
    await _identity(request).remove_member(
        access, user_id=user_id, platform_admin=_platform_admin(principal)
    )
    await _audit_admin(request, principal, access.domain.id, 204, f"member {user_id} removed")
    return web.Response(status=204)


# -- backends ------------------------------------------------------------------------------------


@_json_errors
async def list_backends(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    access.require("manage_backends")
    found = await _identity(request).list_backends(access.domain.id)
    return web.json_response({"backends": [_backend_with_status(request, b) for b in found]})


@_json_errors
async def add_backend(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    access.require("manage_backends")
    body = await _body(request)
    _only(body, {"url", "kind", "models", "enabled"})
    spec = await _identity(request).add_backend(
        access.domain.id,
        url=body.get("url"),
        kind=body.get("kind"),
        models=body.get("models"),
        enabled=body.get("enabled", True),
    )
    await _audit_admin(request, principal, access.domain.id, 201, f"backend {spec.id} added")
    return web.json_response(backend_json(spec), status=201)


@_json_errors
async def get_backend(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    access.require("manage_backends")
    spec = await _identity(request).get_backend(access.domain.id, request.match_info["backend_id"])
    return web.json_response(_backend_with_status(request, spec))


def _backend_with_status(request: web.Request, spec: BackendSpec) -> dict[str, Any]:
    """The backend and, where this application forwards too, what its attestation gate knows
    of it now (``status``: null until the gate has met it)."""
    out = backend_json(spec)
    gateway = request.app.get(GATEWAY)
    if gateway is not None:
        out["status"] = gateway.backend_status(spec.domain_id, spec.id)
    return out


@_json_errors
async def update_backend(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    access.require("manage_backends")
    body = await _body(request)
    spec = await _identity(request).update_backend(
        access.domain.id, request.match_info["backend_id"], body
    )
    await _audit_admin(request, principal, access.domain.id, 200, f"backend {spec.id} changed")
    return web.json_response(backend_json(spec))


@_json_errors
async def remove_backend(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    access.require("manage_backends")
    backend_id = request.match_info["backend_id"]
    await _identity(request).remove_backend(access.domain.id, backend_id)
    await _audit_admin(request, principal, access.domain.id, 204, f"backend {backend_id} removed")
    return web.Response(status=204)


# -- policy and limits ---------------------------------------------------------------------------


@_json_errors
async def get_policy(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    document = await _identity(request).get_policy(access.domain.id)
    if document is None:
        raise NotFound("this domain has no policy", code="no_policy")
    return web.json_response(document)


@_json_errors
async def put_policy(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    access.require("manage_domain")
    raw = await _raw_body(request)
    try:
        # The gateway's own loader, on the bytes as sent: what it would refuse (duplicate
        # keys, which a plain parse merges; a document over its size limit) is refused here.
        load_policy(raw)
    except AttestationError as exc:
        raise Invalid(f"invalid policy: {exc}", code="invalid_policy") from exc
    document = await _identity(request).set_policy(access.domain.id, _parse_body(raw))
    await _audit_admin(request, principal, access.domain.id, 200, "policy set")
    return web.json_response(document)


@_json_errors
async def delete_policy(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    access.require("manage_domain")
    await _identity(request).set_policy(access.domain.id, None)
    await _audit_admin(request, principal, access.domain.id, 204, "policy removed")
    return web.Response(status=204)


@_json_errors
async def get_limits(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    return web.json_response(limits_json(access.domain.limits))


@_json_errors
async def set_limits(request: web.Request) -> web.Response:
    principal = await _principal(request)
    access = await _access(request, principal)
    access.require("manage_domain")
    body = await _body(request)
    limits = await _identity(request).set_limits(
        access.domain.id, body, replace=request.method == "PUT"
    )
    await _audit_admin(request, principal, access.domain.id, 200, "limits set")
    return web.json_response(limits_json(limits))


# -- audit and usage -----------------------------------------------------------------------------


@_json_errors
async def get_audit(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    access.require("read_audit")
    limit = _int_query(request, "limit", 100, maximum=1000) or 100
    before = _int_query(request, "before", None, maximum=2**62)
    event = request.query.get("event")
    rows = await read_audit(
        _identity(request).db, access.domain.id, limit=limit, before_id=before, event=event
    )
    return web.json_response({"audit": rows})


@_json_errors
async def get_usage(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    access.require("read_audit")
    since = request.query.get("since")
    try:
        since_ts = None if since is None else float(since)
    except ValueError as exc:
        raise Invalid("since must be a UNIX time") from exc
    rows = await usage_summary(_identity(request).db, access.domain.id, since=since_ts)
    return web.json_response({"usage": rows})


# -- tokens --------------------------------------------------------------------------------------


@_json_errors
async def list_tokens(request: web.Request) -> web.Response:
    principal = await _principal(request)
    found = await _identity(request).list_pats(user_id=principal.user.id)
    if principal.pat_domain_id is not None:
        found = [p for p in found if p.domain_id == principal.pat_domain_id]
    return web.json_response({"tokens": [p.to_json() for p in found]})


@_json_errors
async def create_token(request: web.Request) -> web.Response:
    principal = await _principal(request)
    body = await _body(request)
    _only(body, {"domain", "name", "actions", "models", "expires_in"})
    domain = body.get("domain")
    if not isinstance(domain, str):
        raise Invalid("domain (alias or id) is required")
    identity = _identity(request)
    pat, secret = await identity.create_pat(
        principal,
        domain,
        name=body.get("name"),
        actions=body.get("actions"),
        models=body.get("models"),
        expires_in=body.get("expires_in"),
    )
    await _audit_admin(request, principal, pat.domain_id, 201, f"token {pat.id} created")
    out = pat.to_json()
    out["token"] = secret  # the only time it is ever shown
    return web.json_response(out, status=201, headers=_NO_STORE)


@_json_errors
async def get_token(request: web.Request) -> web.Response:
    principal = await _principal(request)
    identity = _identity(request)
    try:
        pat = await identity.get_pat(request.match_info["token_id"])
    except NotFound:
        raise NotFound("no such token") from None
    if principal.pat_domain_id is not None and pat.domain_id != principal.pat_domain_id:
        # A PAT sees only its own domain's tokens, as in the list.
        raise NotFound("no such token")
    if pat.user_id != principal.user.id:
        try:
            (await identity.domain_access(principal, pat.domain_id)).require("manage_members")
        except (NotFound, Forbidden):
            raise NotFound("no such token") from None
    return web.json_response(pat.to_json())


@_json_errors
async def revoke_token(request: web.Request) -> web.Response:
    principal = await _principal(request)
    pat = await _identity(request).revoke_pat(principal, request.match_info["token_id"])
    await _audit_admin(request, principal, pat.domain_id, 200, f"token {pat.id} revoked")
    return web.json_response(pat.to_json())


@_json_errors
async def domain_tokens(request: web.Request) -> web.Response:
    access = await _access(request, await _principal(request))
    access.require("manage_members")
    found = await _identity(request).list_pats(domain_id=access.domain.id)
    return web.json_response({"tokens": [p.to_json() for p in found]})


# -- keys ----------------------------------------------------------------------------------------


@_json_errors
async def list_keys(request: web.Request) -> web.Response:
    _require_platform_admin(await _principal(request))
    return web.json_response({"keys": _identity(request).keys.kids()})


@_json_errors
async def rotate_keys(request: web.Request) -> web.Response:
    _require_platform_admin(await _principal(request))
    identity = _identity(request)
    kid = await identity.keys.rotate()
    identity.invalidate()
    return web.json_response({"active": kid, "keys": identity.keys.kids()})


# -- wiring --------------------------------------------------------------------------------------


def setup(app: web.Application, identity: Identity | None = None) -> None:
    """Add the admin API, ``/auth/*`` and the JWKS to ``app``.

    ``identity``: the opened :class:`Identity` (stored at ``app[IDENTITY]``); None when a
    ``cleanup_ctx`` (:func:`proxy.identity.identity_ctx`) provides it at start-up.
    """
    if identity is not None:
        app[IDENTITY] = identity
    r = app.router
    r.add_post("/auth/login", login)
    r.add_post("/auth/refresh", refresh)
    r.add_post("/auth/logout", logout)
    r.add_get(JWKS_PATH, jwks, allow_head=False)
    r.add_get("/admin/me", me, allow_head=False)
    r.add_get("/admin/users", list_users, allow_head=False)
    r.add_post("/admin/users", create_user)
    r.add_get("/admin/users/{user_id}", get_user, allow_head=False)
    r.add_patch("/admin/users/{user_id}", update_user)
    r.add_delete("/admin/users/{user_id}", delete_user)
    r.add_get("/admin/domains", list_domains, allow_head=False)
    r.add_post("/admin/domains", create_domain)
    d = "/admin/domains/{domain}"
    r.add_get(d, get_domain, allow_head=False)
    r.add_patch(d, update_domain)
    r.add_delete(d, delete_domain)
    r.add_get(d + "/members", list_members, allow_head=False)
    r.add_post(d + "/members", add_member)
    r.add_get(d + "/members/{user_id}", get_member, allow_head=False)
    r.add_put(d + "/members/{user_id}", set_member_role)
    r.add_patch(d + "/members/{user_id}", set_member_role)
    r.add_delete(d + "/members/{user_id}", remove_member)
    r.add_get(d + "/backends", list_backends, allow_head=False)
    r.add_post(d + "/backends", add_backend)
    r.add_get(d + "/backends/{backend_id}", get_backend, allow_head=False)
    r.add_patch(d + "/backends/{backend_id}", update_backend)
    r.add_delete(d + "/backends/{backend_id}", remove_backend)
    r.add_get(d + "/policy", get_policy, allow_head=False)
    r.add_put(d + "/policy", put_policy)
    r.add_delete(d + "/policy", delete_policy)
    r.add_get(d + "/limits", get_limits, allow_head=False)
    r.add_put(d + "/limits", set_limits)
    r.add_patch(d + "/limits", set_limits)
    r.add_get(d + "/audit", get_audit, allow_head=False)
    r.add_get(d + "/usage", get_usage, allow_head=False)
    r.add_get(d + "/tokens", domain_tokens, allow_head=False)
    r.add_get("/admin/tokens", list_tokens, allow_head=False)
    r.add_post("/admin/tokens", create_token)
    r.add_get("/admin/tokens/{token_id}", get_token, allow_head=False)
    r.add_delete("/admin/tokens/{token_id}", revoke_token)
    r.add_get("/admin/keys", list_keys, allow_head=False)
    r.add_post("/admin/keys/rotate", rotate_keys)


def make_app(config: IdentityConfig) -> web.Application:
    """A standalone admin server (the identity layer and this API only; no gateway)."""
    from proxy.identity import identity_ctx

    app = web.Application(client_max_size=1024 * 1024)
    app.cleanup_ctx.append(identity_ctx(config))
    setup(app)
    return app


def main(argv: list[str] | None = None) -> int:
    """``python -m proxy.admin_api``: serve the admin API alone (development, tests)."""
    parser = argparse.ArgumentParser(prog="python -m proxy.admin_api")
    parser.add_argument("--database", default=os.environ.get("CUBE_PROXY_DATABASE", "proxy.db"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--issuer-url", default=os.environ.get("CUBE_PROXY_ISSUER_URL"))
    parser.add_argument("--argon2-memory-kib", type=int, default=64 * 1024)
    parser.add_argument("--argon2-time-cost", type=int, default=3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    issuer = args.issuer_url or f"http://{args.host}:{args.port}"
    config = IdentityConfig(
        database=args.database,
        issuer_url=issuer,
        argon2_memory_kib=args.argon2_memory_kib,
        argon2_time_cost=args.argon2_time_cost,
    ).with_env()
    try:
        web.run_app(
            make_app(config),
            host=args.host,
            port=args.port,
            print=None,
            handle_signals=True,
            access_log=None,
        )
    except StartupError as exc:
        print(f"cube-proxy admin: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    raise SystemExit(main())
