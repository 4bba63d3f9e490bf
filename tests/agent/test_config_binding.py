"""The appliance's configuration binding: inline issuer keys (so the configuration digest covers
them) and ``--expect-config-sha256`` (the agent refuses a configuration file whose bytes do not
hash to the value on the measured kernel command line)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent import auth, cli
from agent.config import CONFIG_FORMAT, AgentConfig, ConfigError, load_config
from tests.agent.tokens import TokenIssuer

DIGEST = "sha256:" + "ab" * 32


def config_document(issuer: TokenIssuer, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "format": CONFIG_FORMAT,
        "jwt_issuer": issuer.issuer,
        "jwt_audience": issuer.audience,
        "jwks": issuer.jwks(),
        "model_dir": "/srv/model",
        "model_digest": DIGEST,
        "backend": "openai",
        "tee": "none",
    }
    doc.update(overrides)
    return doc


def write(path: Path, doc: dict[str, Any]) -> tuple[Path, str]:
    data = json.dumps(doc, indent=2).encode()
    path.write_bytes(data)
    return path, hashlib.sha256(data).hexdigest()


def test_inline_jwks_is_loaded_validated_and_measured(tmp_path: Path) -> None:
    issuer = TokenIssuer()
    path, _ = write(tmp_path / "agent.json", config_document(issuer))
    config = load_config(path).validate()
    assert config.jwks is not None
    assert json.loads(config.jwks) == issuer.jwks()
    assert config.measured()["jwks"] == config.jwks
    # Another issuer's keys give another configuration digest.
    other, _ = write(tmp_path / "other.json", config_document(TokenIssuer()))
    assert load_config(other).validate().digest() != config.digest()
    # Key order in the file does not matter: the keys are canonicalised.
    shuffled = config_document(issuer)
    shuffled["jwks"] = {"keys": [dict(reversed(list(k.items()))) for k in issuer.jwks()["keys"]]}
    again, _ = write(tmp_path / "again.json", shuffled)
    assert load_config(again).validate().digest() == config.digest()


@pytest.mark.parametrize(
    ("jwks", "message"),
    [
        ({"keys": []}, "holds no keys"),
        ({"keys": [{"kty": "oct", "kid": "x", "k": "c2VjcmV0"}]}, "private or symmetric"),
        ("not json", "not valid JSON"),
    ],
)
def test_bad_inline_jwks_is_refused(tmp_path: Path, jwks: Any, message: str) -> None:
    path, _ = write(tmp_path / "agent.json", config_document(TokenIssuer(), jwks=jwks))
    with pytest.raises(ConfigError, match=message):
        load_config(path).validate()


def test_inline_jwks_excludes_the_other_key_sources(tmp_path: Path) -> None:
    doc = config_document(TokenIssuer(), jwks_url="https://issuer.test/jwks")
    path, _ = write(tmp_path / "agent.json", doc)
    with pytest.raises(ConfigError, match="exactly one of jwks_file, jwks_url and jwks"):
        load_config(path).validate()


def test_jwks_must_be_an_object_in_the_file(tmp_path: Path) -> None:
    path, _ = write(tmp_path / "agent.json", config_document(TokenIssuer(), jwks=[1, 2]))
    with pytest.raises(ConfigError, match="expected a JWKS object"):
        load_config(path)


def test_auth_setup_verifies_tokens_with_the_inline_keys(tmp_path: Path) -> None:
    issuer = TokenIssuer()
    path, _ = write(tmp_path / "agent.json", config_document(issuer))
    config = load_config(path).validate()
    app = web.Application()
    auth.setup(app, config)
    principal = app[auth.VERIFIER].verify(issuer.token())
    assert principal is not None
    with pytest.raises(auth.AuthError):
        app[auth.VERIFIER].verify(TokenIssuer().token())  # same kids, other keys


def test_expected_sha256_accepts_exactly_the_file_bytes(tmp_path: Path) -> None:
    path, sha = write(tmp_path / "agent.json", config_document(TokenIssuer()))
    assert load_config(path, expect_sha256=sha).source == str(path)
    assert load_config(path, expect_sha256=sha.upper()).source == str(path)
    # One more byte (a trailing newline) is another file: refused.
    path.write_bytes(path.read_bytes() + b"\n")
    with pytest.raises(ConfigError, match="refusing to start"):
        load_config(path, expect_sha256=sha)


@pytest.mark.parametrize("bad", ["", "abc", "g" * 64, "ab" * 33])
def test_malformed_expected_sha256_is_refused(tmp_path: Path, bad: str) -> None:
    path, _ = write(tmp_path / "agent.json", config_document(TokenIssuer()))
    with pytest.raises(ConfigError, match="64 hex digits"):
        load_config(path, expect_sha256=bad)


def test_cli_refuses_a_mismatching_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, sha = write(tmp_path / "agent.json", config_document(TokenIssuer()))
    wrong = hashlib.sha256(b"other").hexdigest()
    rc = cli.main(["--config", str(path), "--expect-config-sha256", wrong, "--print-config"], {})
    err = capsys.readouterr().err
    assert rc == 2
    assert "refusing to start" in err and sha in err
    # The environment variable works the same way.
    rc = cli.main(["--config", str(path), "--print-config"], {cli.EXPECT_CONFIG_SHA256_ENV: wrong})
    assert rc == 2
    capsys.readouterr()
    rc = cli.main(["--config", str(path), "--expect-config-sha256", sha, "--print-config"], {})
    out = capsys.readouterr().out
    assert rc == 0
    assert json.loads(out)["config"]["jwks"] is not None


def test_cli_refuses_an_expected_sha256_without_a_configuration_file(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rc = cli.main(["--expect-config-sha256", "ab" * 32, "--print-config"], {})
    assert rc == 2
    assert "no configuration file" in capsys.readouterr().err


def test_jwks_flag_and_environment_variable_exist() -> None:
    option = next(o for o in cli.OPTIONS if o.name == "jwks")
    assert option.flag == "--jwks" and option.env == "CUBE_AGENT_JWKS"
    assert isinstance(AgentConfig().jwks, type(None))
