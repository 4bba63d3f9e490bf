"""The identity layer's records and the validation of what clients send for them."""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import unicodedata
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from proxy.directory import (
    ACTIONS,
    RESERVED_ALIASES,
    ROLES,
    BackendKind,
    BackendSpec,
    DomainLimits,
    TokenKind,
)
from proxy.identity.errors import Invalid

__all__ = [
    "BACKEND_KINDS",
    "RESERVED_ALIASES",
    "Domain",
    "Member",
    "Pat",
    "Principal",
    "TokenPair",
    "User",
    "backend_json",
    "check_actions",
    "check_alias",
    "check_backend_url",
    "check_email",
    "check_kind",
    "check_limit",
    "check_models",
    "check_name",
    "check_role",
    "dump_list",
    "load_list",
    "normal_email",
]

BACKEND_KINDS: tuple[BackendKind, ...] = ("vllm", "openai", "ollama")
_ALIAS = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
_ID_LIKE = re.compile(r"^[0-9a-f]{32}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_MODEL = re.compile(r"^[\x21-\x7e]{1,200}$")  # printable, no spaces (scope entries split on them)
MAX_MODELS = 256
#: Limits are 32-bit integer columns (PostgreSQL's INTEGER).
MAX_LIMIT = 2**31 - 1


@dataclass(frozen=True)
class User:
    id: str
    email: str
    name: str
    is_admin: bool
    disabled: bool
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "email": self.email,
            "name": self.name,
            "is_admin": self.is_admin,
            "disabled": self.disabled,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> User:
        return cls(
            id=row["id"],
            email=row["email"],
            name=row["name"],
            is_admin=bool(row["is_admin"]),
            disabled=bool(row["disabled"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


@dataclass(frozen=True)
class Domain:
    id: str
    alias: str
    name: str
    limits: DomainLimits
    has_policy: bool
    created_at: float
    updated_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "alias": self.alias,
            "name": self.name,
            "has_policy": self.has_policy,
            "limits": limits_json(self.limits),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Domain:
        return cls(
            id=row["id"],
            alias=row["alias"],
            name=row["name"],
            limits=DomainLimits(
                requests_per_minute=row["requests_per_minute"],
                tokens_per_minute=row["tokens_per_minute"],
                token_requests_per_minute=row["token_requests_per_minute"],
                token_tokens_per_minute=row["token_tokens_per_minute"],
            ),
            has_policy=row["policy"] is not None,
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )


def limits_json(limits: DomainLimits) -> dict[str, int | None]:
    return {
        "requests_per_minute": limits.requests_per_minute,
        "tokens_per_minute": limits.tokens_per_minute,
        "token_requests_per_minute": limits.token_requests_per_minute,
        "token_tokens_per_minute": limits.token_tokens_per_minute,
    }


@dataclass(frozen=True)
class Member:
    domain_id: str
    user_id: str
    email: str
    name: str
    role: str
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "domain_id": self.domain_id,
            "user_id": self.user_id,
            "email": self.email,
            "name": self.name,
            "role": self.role,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Pat:
    """A personal access token's metadata (never its secret, nor its hash)."""

    id: str
    user_id: str
    domain_id: str
    name: str
    actions: frozenset[str]
    models: frozenset[str] | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user_id": self.user_id,
            "domain_id": self.domain_id,
            "name": self.name,
            "actions": sorted(self.actions),
            "models": None if self.models is None else sorted(self.models),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
            "last_used_at": self.last_used_at,
        }

    @classmethod
    def from_row(cls, row: Mapping[Any, Any]) -> Pat:
        models = load_list(row["models"]) if row["models"] is not None else None
        return cls(
            id=row["id"],
            user_id=row["user_id"],
            domain_id=row["domain_id"],
            name=row["name"],
            actions=frozenset(load_list(row["actions"])),
            models=None if models is None else frozenset(models),
            created_at=row["created_at"],
            expires_at=row["expires_at"],
            revoked_at=row["revoked_at"],
            last_used_at=row["last_used_at"],
        )


@dataclass(frozen=True)
class Principal:
    """Who calls the admin API (user-level; domain rights are resolved per route)."""

    user: User
    token_kind: TokenKind
    token_id: str | None = None  # PAT id
    session_id: str | None = None  # access tokens
    pat_domain_id: str | None = None
    pat_actions: frozenset[str] | None = None
    pat_models: frozenset[str] | None = None
    #: When the credential stops being valid (wall clock); None = no expiry.
    expires_at: float | None = None


@dataclass(frozen=True)
class TokenPair:
    access_token: str = ""
    expires_in: int = 0
    refresh_token: str = ""
    refresh_expires_in: int = 0
    session_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token,
            "token_type": "Bearer",
            "expires_in": self.expires_in,
            "refresh_token": self.refresh_token,
            "refresh_expires_in": self.refresh_expires_in,
        }


def backend_json(spec: BackendSpec) -> dict[str, Any]:
    return {
        "id": spec.id,
        "domain_id": spec.domain_id,
        "url": spec.url,
        "kind": spec.kind,
        "models": list(spec.models),
        "enabled": spec.enabled,
    }


# -- validation ----------------------------------------------------------------------------------


def normal_email(value: str) -> str:
    """The one form an address is stored, looked up and throttled in: two spellings of one
    address (case, composed or decomposed accents) are one account."""
    return unicodedata.normalize("NFC", value.strip()).lower()


def check_email(value: object) -> str:
    if not isinstance(value, str):
        raise Invalid("email must be a string")
    email = normal_email(value)
    if (
        len(email) > 320
        or not _EMAIL.match(email)
        or any(unicodedata.category(c)[0] == "C" for c in email)  # control, format, surrogate
    ):
        raise Invalid("email is not a valid address")
    return email


def check_name(value: object, *, what: str = "name") -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 200:
        raise Invalid(f"{what} must be a string of at most 200 characters")
    if any(ord(c) < 0x20 for c in value):
        raise Invalid(f"{what} must not contain control characters")
    return value.strip()


def check_alias(value: object) -> str:
    if not isinstance(value, str) or not _ALIAS.match(value):
        raise Invalid(
            "alias must be 1-63 lowercase letters, digits or '-', not starting or ending with '-'"
        )
    if value in RESERVED_ALIASES:
        raise Invalid(f"alias {value!r} is reserved")
    if _ID_LIKE.match(value):
        # Routes accept a domain's alias or its id: an alias shaped like an id is ambiguous.
        raise Invalid("alias must not look like a domain id (32 hex digits)")
    return value


def check_role(value: object) -> str:
    if not isinstance(value, str) or value not in ROLES:
        raise Invalid(f"role must be one of {', '.join(ROLES)}")
    return value


def check_actions(value: object) -> frozenset[str]:
    if not isinstance(value, list) or not value:
        raise Invalid("actions must be a non-empty list")
    out = set()
    for item in value:
        if not isinstance(item, str) or item not in ACTIONS:
            raise Invalid(f"unknown action (known: {', '.join(sorted(ACTIONS))})")
        out.add(item)
    return frozenset(out)


def check_models(value: object, *, allow_none: bool) -> tuple[str, ...] | None:
    if value is None:
        if allow_none:
            return None
        raise Invalid("models must be a list")
    if not isinstance(value, list) or len(value) > MAX_MODELS:
        raise Invalid(f"models must be a list of at most {MAX_MODELS} names")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not _MODEL.match(item):
            raise Invalid("each model must be 1-200 printable characters without spaces")
        if item not in out:
            out.append(item)
    if allow_none and not out:
        raise Invalid("models must not be empty (omit it or use null for any model)")
    return tuple(out)


def check_kind(value: object) -> BackendKind:
    for kind in BACKEND_KINDS:
        if value == kind:
            return kind
    raise Invalid(f"kind must be one of {', '.join(BACKEND_KINDS)}")


def check_backend_url(value: object) -> str:
    """An agent's base URL: https://host[:port], nothing else (no credentials, path or query)."""
    if not isinstance(value, str) or len(value) > 2048:
        raise Invalid("url must be a string")
    try:
        parts = urllib.parse.urlsplit(value.strip())
        port = parts.port
    except ValueError as exc:
        raise Invalid("url is not a valid URL") from exc
    if parts.scheme != "https":
        raise Invalid("url must be https:// (the proxy never forwards over plain HTTP)")
    if not parts.hostname or parts.username is not None or parts.password is not None:
        raise Invalid("url must name a host and carry no credentials")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise Invalid("url must be the agent's base URL (https://host:port), without a path")
    if port == 0 or any(ord(c) < 0x21 or ord(c) == 0x7F for c in parts.hostname):
        raise Invalid("url must name a valid host and port")
    host = _canonical_host(parts.hostname)
    if ":" in host:
        host = f"[{host}]"
    return f"https://{host}:{port or 443}"


def _canonical_host(host: str) -> str:
    """One spelling per host, so that "an agent URL belongs to one domain" cannot be dodged
    by writing it another way: IP addresses in their canonical form (an IPv4-mapped IPv6 one
    as IPv4; the legacy forms the resolver also takes, 0x7f000001 or 127.1, as dotted
    decimal), names lowercased, in their ASCII (IDNA) form, without a trailing dot. (Two DNS
    names for one address cannot be told apart from the text.)"""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(address)
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if last.isdigit() or (last[:2] == "0x" and all(c in "0123456789abcdef" for c in last[2:])):
        # Ends in a number: the resolver reads it as an IPv4 address, whatever its form.
        try:
            return socket.inet_ntoa(socket.inet_aton(host))  # 0x7f000001, 127.1, 2130706433
        except OSError:
            raise Invalid("url must name a valid host and port") from None
    name = host.rstrip(".")
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise Invalid("url must name a valid host and port") from None
    if not ascii_name:
        raise Invalid("url must name a valid host and port")
    return ascii_name


def check_limit(value: object, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise Invalid(f"{what} must be an integer from 1 to {MAX_LIMIT}, or null")
    return value


def dump_list(values: tuple[str, ...] | frozenset[str] | list[str]) -> str:
    return json.dumps(sorted(values) if isinstance(values, frozenset) else list(values))


def load_list(text: str) -> list[str]:
    value = json.loads(text)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("stored list is not a list of strings")
    return value
