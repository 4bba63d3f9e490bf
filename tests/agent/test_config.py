"""The agent's configuration: the file, the environment, the flags, and the measured digest."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import cli
from agent.config import CONFIG_FORMAT, AgentConfig, ConfigError, load_config
from tests.agent.conftest import ROOT, environment_without_agent_vars

DIGEST = "sha256:" + "ab" * 32


def valid(**overrides: Any) -> AgentConfig:
    values: dict[str, Any] = {
        "jwt_issuer": "https://issuer.test",
        "jwt_audience": "domain-a",
        "jwks_file": "/etc/cube/jwks.json",
        "model_dir": "/models/tiny",
        "model_digest": DIGEST,
    }
    values.update(overrides)
    return AgentConfig(**values)


def write(path: Path, **values: Any) -> Path:
    path.write_text(json.dumps({"format": CONFIG_FORMAT, **values}))
    return path


def test_valid_configuration_validates() -> None:
    assert valid().validate() == valid()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"backend_url": "http://10.0.0.5:8000"}, "loopback"),
        ({"backend_url": "https://example.com"}, "loopback"),
        # A prefix test would take these for loopback; the request would leave the VM.
        ({"backend_url": "http://127.0.0.1@10.0.0.5:8000"}, "loopback"),
        ({"backend_url": "http://localhost.evil.example:8000"}, "loopback"),
        ({"backend_url": "http://127.evil.example"}, "loopback"),
        ({"backend_url": "http://[::1"}, "loopback"),
        ({"evidence_rate_per_second": float("nan")}, "finite"),
        ({"backend_connect_timeout": float("inf")}, "finite"),
        ({"tpm": "device:/dev/tpmrm0", "tpm_pcrs": (0, 7)}, "not among tpm_pcrs"),
        ({"runtime_pcr": 17}, "locality"),
        ({"tls_names": ("b\u00fccher.example",)}, "tls_names"),
        ({"tls_names": ("a\x00b",)}, "tls_names"),
        ({"jwt_issuer": ""}, "jwt_issuer"),
        ({"jwt_audience": ""}, "jwt_audience"),
        ({"jwks_url": "https://issuer.test/jwks"}, "exactly one"),
        ({"jwks_file": None}, "exactly one"),
        ({"jwks_file": None, "jwks_url": "http://issuer.test/jwks"}, "https"),
        ({"model_digest": "sha256:abc"}, "model_digest"),
        ({"model_digest": None}, "required"),
        ({"model_dir": None}, "required"),
        ({"runtime_pcr": 24}, "PCR"),
        ({"tpm_pcrs": (0, 99)}, "PCR"),
        ({"max_body_bytes": 10}, "max_body_bytes"),
        ({"evidence_rate_per_second": 0.0}, "evidence_rate"),
        ({"evidence_burst": 0}, "evidence_rate"),
        ({"backend_connect_timeout": 0.0}, "backend_connect_timeout"),
        ({"log_level": "loud"}, "log_level"),
        ({"event_loop": "trio"}, "event_loop"),
        ({"tee": "sgx"}, "tee"),
        ({"backend": "tgi"}, "backend"),
    ],
)
def test_invalid_configurations_are_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        valid(**overrides).validate()


def test_digest_is_canonical_and_covers_every_measured_field() -> None:
    base = valid()
    assert base.digest() == valid().digest()
    assert base.digest().startswith("sha256:") and len(base.digest()) == 71
    measured = base.measured()
    assert measured["format"] == CONFIG_FORMAT
    assert "source" not in measured
    # The canonical form is sorted, compact JSON.
    assert base.canonical() == json.dumps(measured, sort_keys=True, separators=(",", ":")).encode()
    # Changing any measured field changes the digest; the source does not.
    changes: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": 9443,
        "tls_names": ("agent.example",),
        "key_rotate_seconds": 3600.0,
        "backend": "ollama",
        "backend_url": "http://127.0.0.1:11434",
        "model_name": "other",
        "model_dir": "/models/other",
        "model_digest": "sha256:" + "cd" * 32,
        "jwt_issuer": "https://other.test",
        "jwt_audience": "domain-b",
        "jwks_file": "/other.json",
        "jwks_url": "https://issuer.test/jwks",
        "jwks": '{"keys":[]}',
        "tee": "sim-tdx",
        "tpm": "swtpm:port=2321",
        "tpm_pcrs": (0, 1),
        "runtime_pcr": 16,
        "max_body_bytes": 1 << 20,
        "evidence_rate_per_second": 1.5,
        "evidence_burst": 3,
        "backend_connect_timeout": 1.0,
        "log_level": "debug",
        "event_loop": "uvloop",
    }
    names = {f.name for f in dataclasses.fields(AgentConfig)} - {"source"}
    assert set(changes) == names, "a new field needs a digest test"
    for name, value in changes.items():
        assert dataclasses.replace(base, **{name: value}).digest() != base.digest(), name
    assert dataclasses.replace(base, source="/elsewhere").digest() == base.digest()


def test_load_config_reads_every_kind_of_field(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.json",
        host="127.0.0.1",
        port=9443,
        tls_names=["agent.example", "10.0.0.1"],
        jwt_issuer="https://issuer.test",
        jwt_audience="domain-a",
        jwks_file="/jwks.json",
        model_dir="/m",
        model_digest=DIGEST,
        tpm_pcrs=[0, 7, 15],
        evidence_rate_per_second=2,  # an int where a float is expected is fine
        tpm=None,
    )
    config = load_config(path)
    assert config.port == 9443
    assert config.tls_names == ("agent.example", "10.0.0.1")
    assert config.tpm_pcrs == (0, 7, 15)
    assert config.evidence_rate_per_second == 2.0
    assert config.source == str(path)
    config.validate()


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bogus": 1}, "unknown"),
        ({"port": "8443"}, "port"),
        ({"port": True}, "port"),
        ({"tpm_pcrs": "0,1"}, "tpm_pcrs"),
        ({"tls_names": "a,b"}, "tls_names"),
        ({"model_dir": 5}, "model_dir"),
    ],
)
def test_load_config_is_strict(tmp_path: Path, values: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path / "agent.json", **values))


def test_load_config_refuses_other_formats(tmp_path: Path) -> None:
    path = tmp_path / "agent.json"
    path.write_text(json.dumps({"format": "cube-agent-config/2"}))
    with pytest.raises(ConfigError, match="format"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.json")


# -- the command line ------------------------------------------------------------------------


def test_every_field_has_a_flag_and_an_environment_variable() -> None:
    names = {f.name for f in dataclasses.fields(AgentConfig)} - {"source"}
    assert {o.name for o in cli.OPTIONS} == names
    help_text = cli.build_parser().format_help()
    for option in cli.OPTIONS:
        assert option.flag in help_text
        assert option.env == "CUBE_AGENT_" + option.name.upper()


def test_precedence_flags_over_environment_over_file_over_defaults(tmp_path: Path) -> None:
    path = write(
        tmp_path / "agent.json",
        port=1001,
        backend="openai",
        model_name="from-file",
        evidence_burst=7,
    )
    env = {
        "CUBE_AGENT_PORT": "2002",
        "CUBE_AGENT_MODEL_NAME": "from-env",
        "CUBE_AGENT_TPM_PCRS": "0,7",
    }
    flags: dict[str, str | None] = {"port": "3003"}
    config = cli.effective_config(flags, env, str(path))
    assert config.port == 3003  # flag
    assert config.model_name == "from-env"  # environment over file
    assert config.tpm_pcrs == (0, 7)  # environment over default
    assert config.backend == "openai"  # file over default
    assert config.evidence_burst == 7  # file
    assert config.host == AgentConfig().host  # default
    # The file may also come from the environment.
    assert cli.effective_config({}, {"CUBE_AGENT_CONFIG": str(path)}).port == 1001


def test_empty_environment_values_are_unset() -> None:
    config = cli.effective_config({}, {"CUBE_AGENT_TPM": "", "CUBE_AGENT_PORT": ""})
    assert config.tpm is None and config.port == 8443


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CUBE_AGENT_PORT": "eighty"}, "CUBE_AGENT_PORT"),
        ({"CUBE_AGENT_TEE": "sgx"}, "CUBE_AGENT_TEE"),
        ({"CUBE_AGENT_TPM_PCRS": "0,x"}, "CUBE_AGENT_TPM_PCRS"),
    ],
)
def test_bad_environment_values_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        cli.effective_config({}, env)


def test_print_config_prints_the_measured_configuration_and_digest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(
        tmp_path / "agent.json",
        jwt_issuer="https://issuer.test",
        jwt_audience="domain-a",
        jwks_file="/jwks.json",
        model_dir="/m",
        model_digest=DIGEST,
    )
    rc = cli.main(
        ["--config", str(path), "--print-config", "--tls-names", "a.example,b.example"],
        environ={"CUBE_AGENT_EVIDENCE_BURST": "5"},
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    expected = dataclasses.replace(
        load_config(path), tls_names=("a.example", "b.example"), evidence_burst=5
    )
    assert out["digest"] == expected.digest()
    assert out["config"] == expected.measured()


def test_invalid_configuration_exits_2_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["--print-config"], environ={})
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("cube-agent: invalid configuration:")


def test_console_script_reports_configuration_errors_without_a_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "--backend-url", "http://10.1.1.1:8000"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=environment_without_agent_vars(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "loopback" in result.stderr
