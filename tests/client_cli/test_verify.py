"""``cube verify`` (the installed executable) against real ``cube-agent`` processes with the
simulated SEV-SNP TEE: accept, a configuration the policy does not pin (exit 5, the field named),
a man in the middle terminating TLS with its own certificate (exit 4), ``--json``, an
unreachable endpoint (exit 7), usage errors (exit 2), and the proxy domain URL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.client_cli.conftest import (
    SIM_MEASUREMENT,
    Deployment,
    LiveAgent,
    TlsInterceptor,
    run_cube,
    sim_policy,
)
from tests.e2e.servers import free_port

pytestmark = pytest.mark.slow


def test_accepts_the_agent_its_policy_pins(live_agent: LiveAgent) -> None:
    done = run_cube(["verify", live_agent.url, "--policy", str(live_agent.policy)])
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert out.startswith(f"ACCEPT  {live_agent.url}  (direct to the agent)")
    assert "SIMULATED" in out.splitlines()[1]  # loudly, right under the verdict
    assert f"SEV-SNP MEASUREMENT {SIM_MEASUREMENT}" in out
    assert live_agent.model.digest in out and "cube-tiny" in out
    assert "presented by THIS connection ✓" in out
    assert "HPKE key" in out and "max 300 s" in out
    assert "✓ policy.config_digest" in out and "✓ tls.certificate" in out
    assert "✗" not in out
    assert "expected:" not in out  # values only with --explain
    explained = run_cube(
        ["verify", live_agent.url, "--policy", str(live_agent.policy), "--explain"]
    )
    assert explained.returncode == 0
    assert f"expected: {SIM_MEASUREMENT}" in explained.stdout


def test_json_is_parseable_and_complete(live_agent: LiveAgent) -> None:
    done = run_cube(
        ["verify", live_agent.url, "--json"],
        env={"CUBE_VERIFY_POLICY": str(live_agent.policy)},  # every flag also from the env
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "accept" and report["simulated"] is True
    assert report["platform"] == "sim-sev-snp" and report["via_proxy"] is False
    assert report["fields"]["measurement"] == SIM_MEASUREMENT
    assert report["fields"]["claims"]["model"]["digest"] == live_agent.model.digest
    endpoint = report["endpoint"]
    assert endpoint["tls_bound"] is True
    assert endpoint["peer_cert_sha256"] == endpoint["attested_cert_sha256"]
    assert len(endpoint["nonce"]) == 64
    names = {c["name"] for c in report["checks"]}
    assert {"evidence.nonce", "policy.model_digest", "policy.config_digest"} <= names
    assert all(c["passed"] for c in report["checks"])


def test_a_different_configuration_is_refused_naming_the_field(
    live_agent: LiveAgent, tmp_path: Path
) -> None:
    policy = sim_policy(live_agent.model.digest, "sha256:" + "ab" * 32)
    path = tmp_path / "other-config.json"
    path.write_text(json.dumps(policy))
    done = run_cube(["verify", live_agent.url, "--policy", str(path)])
    assert done.returncode == 5, done.stdout + done.stderr
    assert done.stdout.startswith("REJECT")
    assert "policy error: config_digest sha256:" in done.stdout
    assert "✗ policy.config_digest" in done.stdout
    assert f"expected: sha256:{'ab' * 32}" in done.stdout  # the failed check's values, always
    as_json = json.loads(
        run_cube(["verify", live_agent.url, "--policy", str(path), "--json"]).stdout
    )
    assert as_json["error"]["check"] == "policy.config_digest"
    assert as_json["error"]["class"] == "policy"


def test_a_tls_interceptor_is_refused(live_agent: LiveAgent, tmp_path: Path) -> None:
    with TlsInterceptor(live_agent.agent.port, tmp_path) as mitm:
        done = run_cube(["verify", mitm.url, "--policy", str(live_agent.policy), "--direct"])
        assert mitm.connections >= 1 and mitm.relayed_bytes > 0  # it did relay genuine evidence
    assert done.returncode == 4, done.stdout + done.stderr
    assert done.stdout.startswith("REJECT")
    assert "not the one the evidence names" in done.stdout
    assert "✗ tls.certificate" in done.stdout


def test_unreachable_has_its_own_exit_code(live_agent: LiveAgent) -> None:
    url = f"https://127.0.0.1:{free_port()}"
    done = run_cube(["verify", url, "--policy", str(live_agent.policy), "--timeout", "5"])
    assert done.returncode == 7, done.stdout + done.stderr
    assert "could not fetch evidence" in done.stdout
    as_json = json.loads(
        run_cube(["verify", url, "--policy", str(live_agent.policy), "--json"]).stdout
    )
    assert as_json["verdict"] == "reject" and as_json["error"]["class"] == "unreachable"


def test_usage_errors(live_agent: LiveAgent, tmp_path: Path) -> None:
    assert run_cube(["verify", live_agent.url]).returncode == 2  # no reference values
    both = ["--policy", str(live_agent.policy), "--reference", str(live_agent.policy)]
    assert run_cube(["verify", live_agent.url, *both]).returncode == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "cube-policy/1", "surprise": 1}')
    done = run_cube(["verify", live_agent.url, "--policy", str(bad)])
    assert done.returncode == 3 and "surprise" in done.stdout
    plain = live_agent.url.replace("https://", "http://")
    done = run_cube(["verify", plain, "--policy", str(live_agent.policy)])
    assert done.returncode == 3  # malformed (URL): nothing could bind a plain connection
    assert "is not https://" in done.stdout and "interceptor" not in done.stdout


def test_reference_document_with_an_embedded_policy(live_agent: LiveAgent, tmp_path: Path) -> None:
    reference = tmp_path / "release.json"
    policy = json.loads(live_agent.policy.read_text())
    reference.write_text(json.dumps({"measurements": {}, "policy": policy}))
    done = run_cube(["verify", live_agent.url, "--reference", str(reference)])
    assert done.returncode == 0, done.stdout
    measurements = tmp_path / "measurements.json"
    measurements.write_text(json.dumps({"format": "cube-measurements/1"}))
    refused = run_cube(["verify", live_agent.url, "--reference", str(measurements)])
    assert refused.returncode == 3 and "cube measure" in refused.stdout


def test_through_a_proxy_domain(deployment: Deployment) -> None:
    args = ["verify", deployment.domain_url, "--policy", str(deployment.policy)]
    done = run_cube(args, env={"CUBE_API_KEY": deployment.pat})
    assert done.returncode == 0, done.stdout + done.stderr
    assert "through a proxy domain" in done.stdout
    assert "TLS ends at the proxy" in done.stdout
    # Without the PAT the proxy answers 401: no evidence, no verdict.
    refused = run_cube(args)
    assert refused.returncode == 7, refused.stdout
    assert "HTTP 401" in refused.stdout
