"""What an endpoint URL may be, as ``cube verify`` (and ``cube chat``) take it: an agent's URL
is never taken for a proxy domain's (which would drop the check that binds the agent's TLS
certificate to its evidence), and a URL is shown in messages without its credentials or query.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from attestation.errors import MalformedError
from cube.cli import cube
from cube_client import parse_endpoint
from tests.client.servers import InProcessAgent


@pytest.fixture
def policy_file(tmp_path: Path) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"format": "cube-policy/1", "allow_simulated": True}))
    return path


def _cube(*args: str, env: dict[str, str] | None = None) -> Result:
    """``cube ...`` as its main() runs it: options also from CUBE_* variables."""
    return CliRunner().invoke(cube, list(args), env=env or {}, auto_envvar_prefix="CUBE")


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1:8443", "https://127.0.0.1:8443/", "https://agent.example/v1"]
)
def test_a_url_without_a_domain_is_no_proxy_domain(url: str) -> None:
    with pytest.raises(MalformedError) as info:
        parse_endpoint(url, via_proxy=True)
    assert info.value.exit_code == 3
    assert "a proxy domain URL names its domain (https://proxy/DOMAIN)" in info.value.message
    assert parse_endpoint("https://proxy.example/acme", via_proxy=True).path == "/acme"


def test_cube_verify_via_proxy_from_the_environment_keeps_the_tls_binding(
    agent: InProcessAgent, policy_file: Path, tmp_path: Path
) -> None:
    """CUBE_VERIFY_VIA_PROXY=1 with an agent's URL accepted it without binding the agent's
    certificate to its evidence (a proxy's URL is fetched over ordinary TLS: here the
    certificate is trusted through --ca, as a public one would be): now malformed input."""
    ca = tmp_path / "agent.pem"
    ca.write_text(ssl.get_server_certificate(("127.0.0.1", agent.port)))
    args = ["verify", agent.url, "--policy", str(policy_file), "--ca", str(ca)]
    direct = _cube(*args, "--json")
    assert direct.exit_code == 0, direct.output
    assert json.loads(direct.stdout)["via_proxy"] is False
    proxied = _cube(*args, env={"CUBE_VERIFY_VIA_PROXY": "1"})
    assert proxied.exit_code == 3, proxied.output
    assert "names its domain" in proxied.output and "ACCEPT" not in proxied.output


@pytest.mark.parametrize(
    "url",
    [
        "https://user:SECRET@proxy.example/acme",
        "https://proxy.example/acme?api_key=SECRET",
        "https://proxy.example/acme#SECRET",
        "https://user:SECRET@proxy.example:notaport/acme",  # unparseable: urlsplit's error
        "https://user:SEC/RET@proxy.example/acme",
    ],
)
def test_a_url_is_shown_without_credentials_or_query(url: str) -> None:
    with pytest.raises(MalformedError) as info:
        parse_endpoint(url)
    assert "SECRET" not in info.value.message and "RET@" not in info.value.message
    assert "***" in info.value.message


def test_cube_verify_reports_a_url_without_its_credentials(policy_file: Path) -> None:
    for url in ("https://u:SECRET@127.0.0.1:9/acme", "https://127.0.0.1:9/acme?api_key=SECRET"):
        result = _cube("verify", url, "--policy", str(policy_file), "--json")
        assert result.exit_code == 3, result.output
        message = json.loads(result.stdout)["error"]["message"]
        assert "SECRET" not in message and "127.0.0.1:9" in message
        # Nor anywhere else in the report (its "url" field, the human header line).
        assert "SECRET" not in result.stdout
        human = _cube("verify", url, "--policy", str(policy_file))
        assert "SECRET" not in human.output and "127.0.0.1:9" in human.output
    # A policy that cannot be loaded is reported as none, not as the default policy.
    unloadable = _cube("verify", "https://127.0.0.1:9/acme", "--policy", __file__, "--json")
    assert json.loads(unloadable.stdout)["policy"] is None
