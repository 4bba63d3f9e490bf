"""``cube-proxy``'s configuration: one flat set of options, each a flag (``--agent-connect-
timeout``), an environment variable (``CUBE_PROXY_AGENT_CONNECT_TIMEOUT``) and a key of the
configuration file (``cube-proxy-config/1`` JSON; the file from ``--config`` or
``CUBE_PROXY_CONFIG``). Precedence: flags, then environment, then file, then defaults.

Secrets are never options (a flag shows in ``ps``, a file gets copied around): the bootstrap
admin's password and the signing-key secret come from the environment only
(``CUBE_PROXY_ADMIN_PASSWORD``, ``CUBE_PROXY_KEY_SECRET``), as :mod:`proxy.identity.config`
reads them. A database URL may hold a password: prefer ``CUBE_PROXY_DATABASE`` to the flag.
"""

from __future__ import annotations

import json
import math
import os
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from cube._loop import EVENT_LOOPS
from proxy.db.engine import DatabaseError, database_url, redacted_spec
from proxy.gateway.settings import GatewaySettings

__all__ = [
    "CONFIG_ENV",
    "CONFIG_FORMAT",
    "ENV_PREFIX",
    "OPTIONS",
    "ConfigError",
    "Option",
    "ProxyConfig",
    "effective_config",
    "load_config_file",
]

CONFIG_FORMAT = "cube-proxy-config/1"
ENV_PREFIX = "CUBE_PROXY_"
CONFIG_ENV = "CUBE_PROXY_CONFIG"
_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """An invalid configuration (the proxy refuses to start; exit code 2)."""


@dataclass(frozen=True)
class ProxyConfig:
    # -- serving -------------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 8080
    #: Serve HTTPS with this certificate chain and key (PEM files); plain HTTP without.
    tls_cert: str | None = None
    tls_key: str | None = None
    log_level: str = "info"
    #: "auto" (uvloop when installed), "uvloop" or "asyncio".
    event_loop: str = "auto"
    #: Worker processes serving the port together (SO_REUSEPORT); 0 = one per available CPU.
    #: They share one set of rate-limit buckets (docs/proxy.md, "Worker processes").
    workers: int = 0
    # -- identity and storage --------------------------------------------------------------------
    database: str = "sqlite:///cube-proxy.db"
    #: Where the rate-limit buckets live: "database" (PostgreSQL, shared by every replica),
    #: "local" (this host, shared by its workers), "auto" (database with PostgreSQL).
    rate_limits: str = "auto"
    #: ``iss`` of every token the proxy signs (agents are configured with it); default: the
    #: URL it listens on.
    issuer_url: str | None = None
    admin_email: str | None = None
    access_token_ttl: int = 900
    refresh_token_ttl: int = 7 * 86400
    session_ttl: int = 30 * 86400
    pat_max_ttl: int = 365 * 86400
    key_rotation_seconds: float = 30 * 86400
    identity_cache_seconds: float = 5.0
    oidc_issuer: str | None = None
    oidc_audience: str | None = None
    oidc_jwks_file: str | None = None
    oidc_jwks_url: str | None = None
    # -- the gateway (see proxy.gateway.settings) --------------------------------------------------
    max_body_bytes: int = GatewaySettings.max_body_bytes
    agent_connect_timeout: float = GatewaySettings.agent_connect_timeout
    attestation_timeout: float = GatewaySettings.attestation_timeout
    refresh_fraction: float = GatewaySettings.refresh_fraction
    failure_retry_seconds: float = GatewaySettings.failure_retry_seconds
    down_seconds: float = GatewaySettings.down_seconds
    health_interval: float = GatewaySettings.health_interval
    discover_agents: bool = GatewaySettings.discover_agents
    directory_cache_seconds: float = GatewaySettings.directory_cache_seconds
    auth_cache_seconds: float = GatewaySettings.auth_cache_seconds
    forward_token_ttl: int = GatewaySettings.forward_token_ttl
    forward_token_reuse: float = GatewaySettings.forward_token_reuse
    agent_keepalive: float = GatewaySettings.agent_keepalive
    audit_flush_interval: float = GatewaySettings.audit_flush_interval
    audit_queue_size: int = GatewaySettings.audit_queue_size
    durable_audit: bool = GatewaySettings.durable_audit
    max_evidence_bytes: int = GatewaySettings.max_evidence_bytes
    max_answer_bytes: int = GatewaySettings.max_answer_bytes
    access_log: bool = GatewaySettings.access_log

    @property
    def scheme(self) -> str:
        return "https" if self.tls_cert else "http"

    @property
    def effective_issuer(self) -> str:
        if self.issuer_url:
            return self.issuer_url.rstrip("/")
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host  # noqa: S104
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def effective_workers(self) -> int:
        if self.workers:
            return self.workers
        try:
            return max(1, len(os.sched_getaffinity(0)))
        except (AttributeError, OSError):
            return max(1, os.cpu_count() or 1)

    def gateway_settings(self) -> GatewaySettings:
        names = {f.name for f in fields(GatewaySettings)} & {f.name for f in fields(self)}
        return GatewaySettings(**{n: getattr(self, n) for n in names})

    def validate(self) -> ProxyConfig:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("give both tls_cert and tls_key, or neither")
        if not 0 <= self.workers <= 256:
            raise ConfigError("workers must be between 0 (one per CPU) and 256")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}")
        if self.rate_limits not in ("auto", "database", "local"):
            raise ConfigError("rate_limits must be auto, database or local")
        try:
            backend = database_url(self.database).get_backend_name()
        except DatabaseError as exc:
            raise ConfigError(f"database: {exc}") from None
        if self.rate_limits == "database" and backend != "postgresql":
            raise ConfigError("rate_limits database needs a PostgreSQL database")
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        if not self.effective_issuer.startswith(("https://", "http://")):
            raise ConfigError("issuer_url must be an http(s) URL")
        oidc = (self.oidc_issuer, self.oidc_audience)
        if any(oidc) and not all(oidc):
            raise ConfigError("OIDC needs both oidc_issuer and oidc_audience")
        if self.oidc_issuer and (self.oidc_jwks_file is None) == (self.oidc_jwks_url is None):
            raise ConfigError("OIDC needs exactly one of oidc_jwks_file and oidc_jwks_url")
        if self.oidc_jwks_url is not None and not self.oidc_jwks_url.startswith("https://"):
            raise ConfigError("oidc_jwks_url must be an https:// URL")
        # What proxy.identity.config would refuse with a ValueError (a traceback at start).
        for name in ("access_token_ttl", "refresh_token_ttl", "session_ttl", "pat_max_ttl"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a positive number of seconds")
        if not self.key_rotation_seconds > 0:
            raise ConfigError("key_rotation_seconds must be > 0")
        if not self.identity_cache_seconds >= 0:
            raise ConfigError("identity_cache_seconds must be >= 0")
        try:
            self.gateway_settings().validate()
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return self

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": CONFIG_FORMAT}
        for f in fields(self):
            out[f.name] = getattr(self, f.name)
        out["database"] = redacted_spec(self.database)
        return out


# -- options -------------------------------------------------------------------------------------


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


@dataclass(frozen=True)
class Option:
    name: str
    flag: str
    env: str
    type: type
    parse: Callable[[str], Any]
    optional: bool


def _options() -> tuple[Option, ...]:
    hints = typing.get_type_hints(ProxyConfig)
    out = []
    for f in fields(ProxyConfig):
        hint = hints[f.name]
        optional = False
        if typing.get_origin(hint) in (types.UnionType, typing.Union):
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            hint, optional = inner[0], True
        parse: Callable[[str], Any] = _parse_bool if hint is bool else hint
        out.append(
            Option(
                name=f.name,
                flag="--" + f.name.replace("_", "-"),
                env=ENV_PREFIX + f.name.upper(),
                type=hint,
                parse=parse,
                optional=optional,
            )
        )
    return tuple(out)


OPTIONS = _options()
_BY_NAME = {o.name: o for o in OPTIONS}


def _convert(option: Option, text: str, where: str) -> Any:
    try:
        value = option.parse(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a valid {option.type.__name__}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where}: {text!r} is not a finite number")
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """The options a ``cube-proxy-config/1`` JSON file sets (unknown keys are an error)."""
    try:
        data = json.loads(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise ConfigError(f"configuration {path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError("the configuration must be a JSON object")
    if data.pop("format", None) != CONFIG_FORMAT:
        raise ConfigError(f"the configuration's format must be {CONFIG_FORMAT!r}")
    out: dict[str, Any] = {}
    for key, value in data.items():
        option = _BY_NAME.get(key)
        if option is None:
            raise ConfigError(f"configuration: unknown key {key!r}")
        if value is None and option.optional:
            out[key] = None
        elif option.type is float and type(value) in (int, float):
            if not math.isfinite(value):
                raise ConfigError(f"configuration: {key} must be a finite number")
            out[key] = float(value)
        elif type(value) is option.type:
            out[key] = value
        else:
            raise ConfigError(f"configuration.{key}: expected {option.type.__name__}")
    return out


def effective_config(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str],
    config_file: str | None = None,
) -> ProxyConfig:
    """Defaults, then the file, then the environment, then the flags; validated."""
    values: dict[str, Any] = {}
    path = config_file or environ.get(CONFIG_ENV) or None
    if path:
        values.update(load_config_file(path))
    for option in OPTIONS:
        text = environ.get(option.env)
        if text:  # empty means unset
            values[option.name] = _convert(option, text, option.env)
    for option in OPTIONS:
        text = flags.get(option.name)
        if text is not None:
            values[option.name] = _convert(option, text, option.flag)
    return replace(ProxyConfig(), **values).validate()
