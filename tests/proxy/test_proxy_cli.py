"""``cube-proxy``'s configuration: flags, CUBE_PROXY_* environment and the config file, with
their precedence, validation, and secrets kept out of options."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from proxy.cli import main
from proxy.config import OPTIONS, ConfigError, ProxyConfig, effective_config
from proxy.gateway import GatewaySettings
from tests.proxy.processes import proxy_executable


def test_every_option_has_a_flag_and_an_environment_variable() -> None:
    names = {o.name for o in OPTIONS}
    assert {"host", "port", "database", "issuer_url", "health_interval", "access_log"} <= names
    for option in OPTIONS:
        assert option.flag == "--" + option.name.replace("_", "-")
        assert option.env == "CUBE_PROXY_" + option.name.upper()
    # Every gateway setting is reachable from the command line.
    from dataclasses import fields

    # (The shared files are set by --workers for each worker, not options of their own.)
    internal = {"shared_limits_file", "shared_trust_dir"}
    assert {f.name for f in fields(GatewaySettings)} - internal <= names
    assert "workers" in names and "durable_audit" in names
    # Secrets are not options (a flag shows in ps; a file is copied around).
    assert not {"admin_password", "key_secret"} & names


def test_precedence_flags_over_environment_over_file(tmp_path: Path) -> None:
    config_file = tmp_path / "proxy.json"
    config_file.write_text(
        json.dumps(
            {
                "format": "cube-proxy-config/1",
                "port": 9001,
                "health_interval": 7,
                "database": "sqlite:///from-file.db",
                "access_log": False,
            }
        )
    )
    env = {"CUBE_PROXY_PORT": "9002", "CUBE_PROXY_CONFIG": str(config_file)}
    config = effective_config({"port": None}, env)
    assert config.port == 9002  # environment over file
    assert config.health_interval == 7.0 and config.access_log is False  # from the file
    assert config.database == "sqlite:///from-file.db"
    config = effective_config({"port": "9003", "access_log": "yes"}, env)
    assert config.port == 9003 and config.access_log is True  # flags over everything
    assert effective_config({}, {}) == ProxyConfig()
    settings = config.gateway_settings()
    assert settings.health_interval == 7.0 and settings.access_log is True


@pytest.mark.parametrize(
    ("flags", "env", "message"),
    [
        ({"port": "http"}, {}, "not a valid int"),
        ({}, {"CUBE_PROXY_PORT": "70000"}, "out of range"),
        ({"tls_cert": "c.pem"}, {}, "both tls_cert and tls_key"),
        ({"health_interval": "0"}, {}, "health_interval"),
        ({"access_log": "maybe"}, {}, "not a valid bool"),
        ({"oidc_issuer": "https://idp"}, {}, "oidc_audience"),
        ({"event_loop": "trio"}, {}, "event_loop"),
        ({"rate_limits": "redis"}, {}, "rate_limits must be auto, database or local"),
        ({}, {"CUBE_PROXY_RATE_LIMITS": "database"}, "needs a PostgreSQL database"),
        # A SQLite file whose name starts like "postgres" is still SQLite.
        ({"database": "postgres-data.db", "rate_limits": "database"}, {}, "needs a PostgreSQL"),
        ({"audit_flush_interval": "nan"}, {}, "finite"),
        ({}, {"CUBE_PROXY_HEALTH_INTERVAL": "inf"}, "finite"),
    ],
)
def test_invalid_configurations_are_refused(
    flags: dict[str, str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        effective_config(flags, env)


def test_config_file_is_strict(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "cube-proxy-config/1", "prot": 1}))
    with pytest.raises(ConfigError, match="unknown key 'prot'"):
        effective_config({}, {}, str(bad))
    bad.write_text(json.dumps({"format": "cube-proxy-config/1", "port": "8080"}))
    with pytest.raises(ConfigError, match="expected int"):
        effective_config({}, {}, str(bad))
    bad.write_text(json.dumps({"port": 8080}))
    with pytest.raises(ConfigError, match="format"):
        effective_config({}, {}, str(bad))


def test_issuer_defaults_to_the_listening_url() -> None:
    assert ProxyConfig(port=8443).effective_issuer == "http://127.0.0.1:8443"
    assert ProxyConfig(host="0.0.0.0", tls_cert="c", tls_key="k").effective_issuer == (
        "https://127.0.0.1:8080"
    )
    assert ProxyConfig(issuer_url="https://proxy.example/").effective_issuer == (
        "https://proxy.example"
    )


def test_print_config_redacts_the_database_password(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(
        ["--print-config"],
        environ={"CUBE_PROXY_DATABASE": "postgresql://cube:s3cret-pw@db:5432/cube"},
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["database"] == "postgresql://cube:***@db:5432/cube"
    assert "s3cret-pw" not in json.dumps(printed)
    # asyncpg also takes the password in the query string.
    assert (
        main(
            ["--print-config"],
            environ={"CUBE_PROXY_DATABASE": "postgresql://db/cube?user=cube&password=s3cret-pw"},
        )
        == 0
    )
    assert "s3cret-pw" not in capsys.readouterr().out
    assert main(["--port", "nope"], environ={}) == 2


def test_the_executable_refuses_a_bad_configuration_with_exit_2() -> None:
    proc = subprocess.run(
        [str(proxy_executable()), "--port", "0x"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CUBE_PROXY_DATABASE": "sqlite:///x.db"},
    )
    assert proc.returncode == 2
    assert "invalid configuration" in proc.stderr and "Traceback" not in proc.stderr


def test_the_metrics_token_comes_from_the_environment_and_must_be_a_secret(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from proxy.gateway.ops import METRICS_TOKEN_ENV, metrics_token

    assert metrics_token({}) is None and metrics_token({METRICS_TOKEN_ENV: ""}) is None
    assert metrics_token({METRICS_TOKEN_ENV: "k" * 16}) == b"k" * 16
    for weak in (
        "short-token",
        "with a space in it!!",
        "non-ascii-tökenxxxxxx",
        "tab\there-xxxxxxxx",
    ):
        with pytest.raises(ValueError, match=METRICS_TOKEN_ENV) as caught:
            metrics_token({METRICS_TOKEN_ENV: weak})
        assert weak not in str(caught.value)
    env = {"CUBE_PROXY_DATABASE": "sqlite:///x.db", METRICS_TOKEN_ENV: "short-token"}
    assert main(["--print-config"], environ=env) == 2
    err = capsys.readouterr().err
    assert "invalid configuration" in err and "short-token" not in err


@pytest.mark.parametrize(
    "flags",
    [
        ["--session-ttl", "0"],
        ["--access-token-ttl", "0"],
        ["--refresh-token-ttl", "-5"],
        ["--pat-max-ttl", "0"],
        ["--key-rotation-seconds", "0"],
        ["--identity-cache-seconds", "-1"],
        [
            "--oidc-issuer",
            "https://idp.example",
            "--oidc-audience",
            "cube",
            "--oidc-jwks-url",
            "http://idp.example/jwks.json",
        ],
    ],
)
def test_what_the_identity_layer_refuses_is_a_configuration_error(
    flags: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """These passed validation, then the identity layer's ValueError was a traceback and
    exit 1 at start: now "invalid configuration" and exit 2, before anything starts."""
    env = {"CUBE_PROXY_DATABASE": f"sqlite:///{tmp_path / 'p.db'}"}
    assert main([*flags, "--workers", "1", "--port", "1"], environ=env) == 2
    err = capsys.readouterr().err
    assert err.startswith("cube-proxy: invalid configuration: ") and "Traceback" not in err
    assert not (tmp_path / "p.db").exists()


def test_the_executable_refuses_a_zero_session_ttl_with_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run(
        [str(proxy_executable()), "--session-ttl", "0", "--workers", "1", "--port", "1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "CUBE_PROXY_DATABASE": f"sqlite:///{tmp_path / 'p.db'}"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "invalid configuration: session_ttl" in proc.stderr and "Traceback" not in proc.stderr
