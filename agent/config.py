"""The agent's configuration: one strict JSON file, overridable by flags and environment.

The *effective* configuration (file, then environment, then flags) is what the agent measures:
its digest (:meth:`AgentConfig.digest`, SHA-256 of the canonical JSON) goes into every piece of
evidence as ``config_digest``, so a verifier can pin exactly how the agent was configured. The
configuration holds no secrets (JWT verification keys are public), so it is safe to hash and log.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import re
import urllib.parse
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from attestation._json import ObjectReader, loads_object
from attestation.errors import MalformedError
from cube._loop import EVENT_LOOPS

__all__ = [
    "CONFIG_FORMAT",
    "AgentConfig",
    "ConfigError",
    "config_file_sha256",
    "load_config",
    "parse_config",
]

CONFIG_FORMAT = "cube-agent-config/1"
BackendKind = Literal["vllm", "openai", "ollama"]
TeeChoice = Literal["auto", "none", "sev-snp", "tdx", "sim-sev-snp", "sim-tdx"]
_BACKENDS = ("vllm", "openai", "ollama")
_TEES = ("auto", "none", "sev-snp", "tdx", "sim-sev-snp", "sim-tdx")
_LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(MalformedError):
    """The agent's configuration is invalid; the agent refuses to start."""


#: A DNS name (letters, digits, hyphens, dots; A-labels for internationalised names) or an IP.
_TLS_NAME = re.compile(r"[A-Za-z0-9.:*-]{1,253}")


def _on_loopback(url: str) -> bool:
    """``http://`` to a loopback address or ``localhost``, nothing that names another host
    (a prefix test would take ``http://127.0.0.1@10.0.0.5`` or ``http://localhost.evil``)."""
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for an invalid port
    except ValueError:
        return False
    host = parts.hostname
    if parts.scheme != "http" or host is None or parts.username is not None:
        return False
    if parts.password is not None or parts.query or parts.fragment or "@" in parts.netloc:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class AgentConfig:
    """Everything the agent needs to start. Defaults are the in-VM production values."""

    # Where the agent listens (HTTPS only), and extra names for its certificate's SAN.
    host: str = "0.0.0.0"  # noqa: S104 - inside the VM the agent is the one exposed service
    port: int = 8443
    tls_names: tuple[str, ...] = ()
    # The TLS and HPKE keys are replaced this often (each certificate valid for twice as long).
    key_rotate_seconds: float = 86400.0
    # The backend, always on loopback inside the VM.
    backend: BackendKind = "vllm"
    backend_url: str = "http://127.0.0.1:8000"
    # The model served, and where its weights are (verified against model_digest at start).
    model_name: str = "cube-tiny"
    model_dir: str | None = None
    model_digest: str | None = None
    # Tokens: issuer, audience (the domain this VM serves), and the issuer's public keys.
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwks_file: str | None = None
    jwks_url: str | None = None
    # Or the keys inline (a JWKS document as canonical JSON text): then the configuration digest,
    # which is bound to the measured boot (cube.config_sha256=), covers the issuer keys too.
    jwks: str | None = None
    # Evidence sources.
    tee: TeeChoice = "auto"
    tpm: str | None = None  # a TCTI ("device:/dev/tpmrm0", "swtpm:port=2321") or None
    tpm_pcrs: tuple[int, ...] = tuple(range(24))
    runtime_pcr: int = 15  # where the model and configuration digests are extended
    # Limits.
    max_body_bytes: int = 64 * 1024 * 1024
    evidence_rate_per_second: float = 10.0
    evidence_burst: int = 20
    backend_connect_timeout: float = 5.0
    log_level: str = "info"
    #: "asyncio" (the default: the image ships no uvloop, to keep the code that handles the
    #: network inside the TEE to the standard library's), "uvloop" or "auto" (cube._loop).
    event_loop: str = "asyncio"
    # Not part of the measured configuration: where the file came from.
    source: str = field(default="", compare=False)

    def validate(self) -> AgentConfig:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port {self.port} is out of range")
        if self.backend not in _BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(_BACKENDS)}")
        if self.tee not in _TEES:
            raise ConfigError(f"tee must be one of {', '.join(_TEES)}")
        if not _on_loopback(self.backend_url):
            raise ConfigError(
                f"backend_url {self.backend_url!r} is not http:// on loopback (127.0.0.0/8, ::1 "
                "or localhost, no user info): the backend must never be reachable from outside "
                "the VM"
            )
        if not self.jwt_issuer or not self.jwt_audience:
            raise ConfigError("jwt_issuer and jwt_audience are required")
        if sum(k is not None for k in (self.jwks_file, self.jwks_url, self.jwks)) != 1:
            raise ConfigError("give exactly one of jwks_file, jwks_url and jwks")
        if self.jwks is not None:
            from agent.auth import JwksError, parse_jwks  # auth imports this module

            try:
                parse_jwks(self.jwks.encode())
            except JwksError as exc:
                raise ConfigError(f"jwks: {exc}") from None
        if self.model_digest is not None and not (
            self.model_digest.startswith("sha256:") and len(self.model_digest) == 71
        ):
            raise ConfigError("model_digest must be 'sha256:<64 hex>'")
        if self.model_digest is None or self.model_dir is None:
            raise ConfigError(
                "model_dir and model_digest are required: the weights are always verified"
            )
        if self.jwks_url is not None and not self.jwks_url.startswith("https://"):
            raise ConfigError("jwks_url must be an https:// URL")
        if self.jwks_url is not None and "@" in self.jwks_url.split("/", 3)[2]:
            # Credentials in it would be logged with every fetch failure; a JWKS is public.
            raise ConfigError("jwks_url must not carry credentials (user:password@)")
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{f.name} must be a finite number")
        if self.evidence_rate_per_second <= 0 or self.evidence_burst < 1:
            raise ConfigError("evidence_rate_per_second must be > 0 and evidence_burst >= 1")
        if not 1 <= self.key_rotate_seconds <= 90 * 86400:
            raise ConfigError("key_rotate_seconds must be between 1 and 7776000 (90 days)")
        if self.backend_connect_timeout <= 0:
            raise ConfigError("backend_connect_timeout must be > 0")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"event_loop must be one of {', '.join(EVENT_LOOPS)}")
        if self.log_level.lower() not in _LOG_LEVELS:
            raise ConfigError(f"log_level must be one of {', '.join(_LOG_LEVELS)}")
        if not 0 <= self.runtime_pcr < 24 or not all(0 <= p < 24 for p in self.tpm_pcrs):
            raise ConfigError("PCR indices must be 0..23")
        if self.tpm is not None and self.runtime_pcr not in self.tpm_pcrs:
            raise ConfigError(
                f"runtime_pcr {self.runtime_pcr} is not among tpm_pcrs: no quote would cover "
                "the model and configuration digests extended there"
            )
        if 17 <= self.runtime_pcr <= 22:
            raise ConfigError("runtime_pcr 17..22 cannot be extended at locality 0")
        for name in self.tls_names:
            if not _TLS_NAME.fullmatch(name):
                raise ConfigError(
                    f"tls_names: {name!r} is not an ASCII DNS name or IP address (use the "
                    "A-label form, xn--..., of an internationalised name)"
                )
        if self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes is too small")
        return self

    def measured(self) -> dict[str, Any]:
        """The configuration as measured (canonical, every field but ``source``)."""
        out = asdict(self)
        out.pop("source")
        out["tpm_pcrs"] = list(self.tpm_pcrs)
        out["tls_names"] = list(self.tls_names)
        out["format"] = CONFIG_FORMAT
        return out

    def canonical(self) -> bytes:
        return json.dumps(self.measured(), sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.canonical()).hexdigest()

    def with_overrides(self, **overrides: Any) -> AgentConfig:
        """Apply non-None overrides (from flags or the environment)."""
        present = {k: v for k, v in overrides.items() if v is not None}
        if "tpm_pcrs" in present and isinstance(present["tpm_pcrs"], str):
            present["tpm_pcrs"] = _pcr_list(present["tpm_pcrs"])
        if "tls_names" in present and isinstance(present["tls_names"], str):
            present["tls_names"] = _name_list(present["tls_names"])
        return replace(self, **present)


def _pcr_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError as exc:
        raise ConfigError("tpm_pcrs must be a comma-separated list of integers") from exc


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(n.strip() for n in text.split(",") if n.strip())


def config_file_sha256(data: bytes) -> str:
    """Hex SHA-256 of a configuration file's bytes: what the image binds on the measured kernel
    command line (``cube.config_sha256=``) and ``cube-agent --expect-config-sha256`` checks."""
    return hashlib.sha256(data).hexdigest()


def _canonical_jwks(value: object) -> str:
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    if isinstance(value, str):
        return value
    raise ConfigError("configuration.jwks: expected a JWKS object")


def load_config(path: str | Path, *, expect_sha256: str | None = None) -> AgentConfig:
    """Read a ``cube-agent-config/1`` JSON file (unknown keys are an error). With
    ``expect_sha256`` (hex), the file's bytes must hash to exactly that, or it is refused; the
    bytes checked are the bytes parsed (read once)."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration {path}: {exc.strerror}") from exc
    if expect_sha256 is not None:
        expected = expect_sha256.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise ConfigError("the expected configuration sha256 must be 64 hex digits")
        actual = config_file_sha256(data)
        if not hmac.compare_digest(actual, expected):
            raise ConfigError(
                f"configuration {path} has sha256 {actual}, but {expected} is required "
                "(cube.config_sha256= on the measured kernel command line): refusing to start"
            )
    return parse_config(data, source=str(path))


def parse_config(data: bytes, *, source: str = "") -> AgentConfig:
    """Parse the bytes of a ``cube-agent-config/1`` JSON document."""
    reader = ObjectReader(
        loads_object(data, what="configuration", error=ConfigError),
        what="configuration",
        error=ConfigError,
    )
    fmt = reader.string("format", required=True)
    if fmt != CONFIG_FORMAT:
        raise ConfigError(f"configuration format must be {CONFIG_FORMAT!r}, got {fmt!r}")
    values: dict[str, Any] = {}
    defaults = AgentConfig()
    for f in fields(AgentConfig):
        if f.name == "source" or f.name not in reader:
            continue
        value = reader.raw(f.name)
        default = getattr(defaults, f.name)
        if f.name == "tpm_pcrs":
            if not isinstance(value, list) or not all(type(v) is int for v in value):
                raise ConfigError("configuration.tpm_pcrs: expected a list of integers")
            value = tuple(value)
        elif f.name == "jwks":
            value = None if value is None else _canonical_jwks(value)
        elif f.name == "tls_names":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError("configuration.tls_names: expected a list of strings")
            value = tuple(value)
        elif isinstance(default, bool) or (
            default is not None and type(value) is not type(default)
        ):
            if not (isinstance(default, float) and type(value) is int):
                raise ConfigError(f"configuration.{f.name}: expected {type(default).__name__}")
            value = float(value)
        elif default is None and value is not None and not isinstance(value, str):
            raise ConfigError(f"configuration.{f.name}: expected a string")
        values[f.name] = value
    reader.finish()
    return replace(defaults, **values, source=source)
