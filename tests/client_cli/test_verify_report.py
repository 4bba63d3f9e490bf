"""``cube verify`` turning a verified endpoint into its report, in-process (the endpoint faked):
whatever fails while describing what verified becomes a verdict and an exit code, never a
traceback. The real-process tests are in test_verify.py."""

from __future__ import annotations

import dataclasses
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import cube_client
from attestation import evidence
from attestation._checks import Checks
from attestation.errors import MalformedError
from cube.verify_cli import verify
from tests.evidence import _util as e

URL = "https://127.0.0.1:9"  # never contacted: verify_endpoint is replaced


class _UnprintableTpm:
    """A verified quote whose fields cannot be shown (as an AK with an SM3 nameAlg was)."""

    def fields(self) -> dict[str, object]:
        raise MalformedError("hash algorithm sm3_256 is not supported here")


def _found(tpm: object) -> cube_client.AttestedEndpoint:
    verified = evidence.verify_evidence(
        e.collect(), nonce=e.NONCE, policy=e.ALLOW_SIMULATED, now=e.NOW
    )
    return cube_client.AttestedEndpoint(
        url=URL,
        evidence=dataclasses.replace(verified, tpm=tpm),  # type: ignore[arg-type]
        peer_cert_der=b"",
        tls_bound=True,
        nonce=e.NONCE,
        verified_at=e.NOW,
        expires_at=e.NOW + timedelta(seconds=300),
        hpke_public_key=bytes(32),
        checks=Checks(),
    )


@pytest.mark.parametrize("as_json", [False, True])
def test_fields_that_cannot_be_shown_are_a_verdict_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, as_json: bool
) -> None:
    found = _found(_UnprintableTpm())

    def fake_verify_endpoint(*args: Any, **kwargs: Any) -> cube_client.AttestedEndpoint:
        return found

    monkeypatch.setattr(cube_client, "verify_endpoint", fake_verify_endpoint)
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"format": "cube-policy/1", "allow_simulated": True}))
    args = [URL, "--direct", "--policy", str(policy), *(["--json"] if as_json else [])]
    result = CliRunner().invoke(verify, args)
    # Fails closed: exit 3 (malformed), through the report, not an uncaught exception.
    assert isinstance(result.exception, SystemExit), result.exception
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    if as_json:
        report = json.loads(result.output)
        assert report["verdict"] == "reject"
        assert report["error"]["type"] == "MalformedError"
        assert "sm3_256" in report["error"]["message"]
    else:
        assert result.output.startswith("REJECT"), result.output
