"""``cube-agent``: the in-VM agent's command line.

Every :class:`agent.config.AgentConfig` field is a flag (``--model-digest``), an environment
variable (``CUBE_AGENT_MODEL_DIGEST``) and a key of the ``--config`` file
(``cube-agent-config/1`` JSON; the file may also come from ``CUBE_AGENT_CONFIG``). Precedence:
flags, then environment, then file, then defaults. ``--print-config`` prints the effective,
measured configuration and its digest (what evidence names as ``config_digest``) and exits.

Exit codes: 0 after a clean shutdown, 2 for an invalid configuration or usage, 1 when the
environment refuses (model digest mismatch, missing TEE, unusable vTPM, port in use).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from agent.config import AgentConfig, ConfigError, load_config
from agent.identity import AGENT_VERSION

__all__ = ["ENV_PREFIX", "EXPECT_CONFIG_SHA256_ENV", "OPTIONS", "effective_config", "main"]

ENV_PREFIX = "CUBE_AGENT_"
CONFIG_ENV = "CUBE_AGENT_CONFIG"
EXPECT_CONFIG_SHA256_ENV = "CUBE_AGENT_EXPECT_CONFIG_SHA256"

_HELP = {
    "host": "address to listen on (HTTPS)",
    "port": "port to listen on",
    "tls_names": "extra DNS names / IPs for the certificate (comma-separated)",
    "key_rotate_seconds": "replace the TLS and HPKE keys this often (seconds)",
    "backend": "backend kind",
    "backend_url": "the backend's URL (loopback only)",
    "model_name": "the model served (as the backend names it)",
    "model_dir": "the model directory (with cube-model.json)",
    "model_digest": "the pinned weights digest, sha256:<hex>",
    "jwt_issuer": "the token issuer (iss) to accept",
    "jwt_audience": "the token audience (aud): the domain this VM serves",
    "jwks_file": "the issuer's public keys (JWKS file)",
    "jwks_url": "the issuer's public keys (https:// JWKS URL)",
    "jwks": "the issuer's public keys inline (a JWKS JSON document)",
    "tee": "TEE: auto, none (vTPM only), sev-snp, tdx, or the SIMULATOR sim-sev-snp / sim-tdx",
    "tpm": "vTPM TCTI, e.g. device:/dev/tpmrm0 or swtpm:port=2321",
    "tpm_pcrs": "PCRs to quote (comma-separated)",
    "runtime_pcr": "PCR receiving the model and configuration digests",
    "max_body_bytes": "largest request body accepted",
    "evidence_rate_per_second": "evidence requests per second (token bucket rate)",
    "evidence_burst": "evidence requests allowed in a burst",
    "backend_connect_timeout": "seconds to connect to the backend",
    "log_level": "debug, info, warning or error",
    "event_loop": "asyncio (default), uvloop, or auto (uvloop when installed)",
}


@dataclass(frozen=True)
class Option:
    """One configuration field as a flag and an environment variable."""

    name: str
    flag: str
    env: str
    parse: Callable[[str], Any]
    choices: tuple[str, ...] | None
    help: str


def _tuple_of(item: Callable[[str], Any]) -> Callable[[str], tuple[Any, ...]]:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(item(p.strip()) for p in text.split(",") if p.strip())

    return parse


def _parser_for(hint: Any) -> tuple[Callable[[str], Any], tuple[str, ...] | None]:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Literal:
        return str, tuple(str(a) for a in args)
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _parser_for(inner[0])
    if origin is tuple and args and args[-1] is Ellipsis:
        item, _ = _parser_for(args[0])
        return _tuple_of(item), None
    if hint in (int, float, str):
        return typing.cast(Callable[[str], Any], hint), None
    raise TypeError(f"no command-line parser for {hint!r}")  # pragma: no cover


def _options() -> tuple[Option, ...]:
    hints = typing.get_type_hints(AgentConfig)
    out = []
    for f in fields(AgentConfig):
        if f.name == "source":
            continue
        parse, choices = _parser_for(hints[f.name])
        out.append(
            Option(
                name=f.name,
                flag="--" + f.name.replace("_", "-"),
                env=ENV_PREFIX + f.name.upper(),
                parse=parse,
                choices=choices,
                help=_HELP.get(f.name, f.name.replace("_", " ")),
            )
        )
    return tuple(out)


#: Every configuration field, as the command line and the environment spell it.
OPTIONS = _options()


def _convert(option: Option, text: str, where: str) -> Any:
    if option.choices is not None and text not in option.choices:
        raise ConfigError(f"{where}: {text!r} is not one of {', '.join(option.choices)}")
    try:
        return option.parse(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a valid value") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cube-agent",
        description="Cube's in-VM agent: attested TLS, authenticated OpenAI/Ollama-compatible "
        "inference. Every option also reads CUBE_AGENT_<NAME> from the environment "
        "(flags > environment > --config file > defaults).",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"cube-agent-config/1 JSON file (also {CONFIG_ENV})",
    )
    parser.add_argument(
        "--expect-config-sha256",
        metavar="HEX",
        help="refuse to start unless the --config file's bytes have this SHA-256 (the appliance "
        "passes cube.config_sha256= from its measured kernel command line; also "
        f"{EXPECT_CONFIG_SHA256_ENV})",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the effective measured configuration and its digest, then exit",
    )
    parser.add_argument("--version", action="version", version=f"cube-agent {AGENT_VERSION}")
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.name.upper(),
            default=None,
            help=f"{option.help} (env {option.env})",
        )
    return parser


def effective_config(
    flags: Mapping[str, str | None],
    environ: Mapping[str, str],
    config_file: str | None = None,
    *,
    expect_config_sha256: str | None = None,
) -> AgentConfig:
    """Defaults, then the file, then the environment, then the flags. With
    ``expect_config_sha256`` a configuration file is required and must hash to it."""
    path = config_file or environ.get(CONFIG_ENV) or None
    if expect_config_sha256 is not None and not path:
        raise ConfigError("an expected configuration sha256 was given but no configuration file")
    config = load_config(path, expect_sha256=expect_config_sha256) if path else AgentConfig()
    from_env: dict[str, Any] = {}
    from_flags: dict[str, Any] = {}
    for option in OPTIONS:
        if environ.get(option.env):  # empty means unset
            from_env[option.name] = _convert(option, environ[option.env], option.env)
        flag_value = flags.get(option.name)
        if flag_value is not None:
            from_flags[option.name] = _convert(option, flag_value, option.flag)
    try:
        return config.with_overrides(**from_env).with_overrides(**from_flags)
    except (TypeError, ValueError) as exc:  # pragma: no cover - parsers produce the right types
        raise ConfigError(str(exc)) from exc


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    env = os.environ if environ is None else environ
    flags = {option.name: getattr(args, option.name) for option in OPTIONS}
    expect = args.expect_config_sha256 or env.get(EXPECT_CONFIG_SHA256_ENV) or None
    try:
        config = effective_config(flags, env, args.config, expect_config_sha256=expect).validate()
    except ConfigError as exc:
        print(f"cube-agent: invalid configuration: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        out = {"config": config.measured(), "digest": config.digest()}
        print(json.dumps(out, indent=2, sort_keys=True))
        return 0

    from agent.ops import configure_logging
    from agent.server import run

    # The access log writes a line per request: in batches (warnings at once), as the proxy.
    configure_logging(config.log_level, batch_seconds=0.2)
    return run(config)


if __name__ == "__main__":
    sys.exit(main())
