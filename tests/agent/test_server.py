"""The start-up sequence and the served agent, end to end on loopback.

A client that trusts nothing in advance: it opens a TLS connection without verifying the
certificate, asks for evidence with its own nonce, verifies the evidence with the attestation
library, checks that the certificate of *this very connection* is the one the claims name,
and only then sends its token on that connection. Simulated SNP, simulated TDX, and a vTPM from
a real swtpm. Then the refusals, the private key's absence from disk, and the console script.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from agent.config import AgentConfig
from agent.measure import event_data
from agent.server import StartupError, detect_platform, free_port, prepare
from attestation.errors import BindingError
from attestation.evidence import VerifiedEvidence, verify_evidence
from attestation.guest import detect_tee
from attestation.policy import Policy
from attestation.tpm import extend
from attestation.tpm.device import TpmQuoter
from tests.agent.conftest import (
    ROOT,
    ModelDir,
    RecordingBackend,
    RunningAgent,
    StartAgent,
    base_config,
    environment_without_agent_vars,
    unverified_context,
)
from tests.agent.tokens import AUDIENCE, ISSUER, TokenIssuer

ALLOW_SIMULATED = Policy.from_json({"format": "cube-policy/1", "allow_simulated": True})
STRICT = Policy()
#: vTPM-only evidence has no hardware root for its AK: a verifier accepts it only on purpose.
VTPM_ONLY = Policy.from_json({"format": "cube-policy/1", "platforms": ["vtpm"]})


class AttestingClient:
    """Verifies the agent before trusting the connection with a token."""

    def __init__(self, host: str, port: int) -> None:
        self.conn = http.client.HTTPSConnection(
            host, port, context=unverified_context(), timeout=60
        )

    def attest(self, policy: Policy, *, source: tuple[str, int] | None = None) -> VerifiedEvidence:
        """Fetch evidence (from ``source`` if given: a relay test) and bind it to this
        connection's certificate."""
        nonce = secrets.token_bytes(32)
        if source is None:
            self.conn.request("GET", f"/attestation?nonce={nonce.hex()}")
            response = self.conn.getresponse()
            body = response.read()
        else:
            other = http.client.HTTPSConnection(*source, context=unverified_context(), timeout=60)
            other.request("GET", f"/attestation?nonce={nonce.hex()}")
            body = other.getresponse().read()
            other.close()
            self.conn.request("GET", "/health")
            self.conn.getresponse().read()
        verified = verify_evidence(body, nonce=nonce, policy=policy, now=datetime.now(UTC))
        assert self.conn.sock is not None
        peer = self.conn.sock.getpeercert(binary_form=True)
        assert peer is not None
        if hashlib.sha256(peer).digest() != verified.claims.tls_cert_sha256:
            raise BindingError("the connection's certificate is not the attested one")
        return verified

    def chat(self, token: str) -> tuple[int, Any]:
        body = json.dumps(
            {"model": "cube-tiny", "messages": [{"role": "user", "content": "hello"}]}
        ).encode()
        self.conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        response = self.conn.getresponse()
        return response.status, json.loads(response.read())

    def close(self) -> None:
        self.conn.close()


@pytest.mark.parametrize(
    ("tee", "platform"), [("sim-sev-snp", "sim-sev-snp"), ("sim-tdx", "sim-tdx")]
)
def test_client_verifies_evidence_pins_the_connection_then_chats(
    start_agent: StartAgent, backend: RecordingBackend, tee: str, platform: str
) -> None:
    agent = start_agent({"tee": tee, "backend_url": backend.url})
    client = AttestingClient(agent.host, agent.port)
    try:
        verified = client.attest(ALLOW_SIMULATED)
        assert verified.platform == platform and verified.simulated
        claims = verified.claims
        assert claims.model_digest == agent.config.model_digest
        assert claims.config_digest == agent.config.digest()
        assert claims.tpm_ak_sha256 is None
        # The same connection, now trusted, carries the token.
        status, body = client.chat(agent.token())
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == "RESPONSE-TEXT-7f3a"
        assert len(backend.requests) == 1
    finally:
        client.close()
    # A strict policy refuses simulated evidence.
    strict = AttestingClient(agent.host, agent.port)
    try:
        with pytest.raises(Exception, match="SIMULATED"):
            strict.attest(STRICT)
    finally:
        strict.close()


def test_evidence_relayed_from_another_agent_does_not_match_the_connection(
    start_agent: StartAgent,
) -> None:
    """A man in the middle that relays a genuine agent's evidence over its own TLS endpoint
    is caught: the claims name the genuine agent's certificate, not the one on the wire."""
    genuine, impostor = start_agent(), start_agent()
    client = AttestingClient(impostor.host, impostor.port)
    try:
        with pytest.raises(BindingError):
            client.attest(ALLOW_SIMULATED, source=(genuine.host, genuine.port))
        assert client.attest(ALLOW_SIMULATED)  # its own evidence matches its own connection
    finally:
        client.close()


# -- a real vTPM (swtpm) -----------------------------------------------------------------------


def _pcr(tcti: str, index: int) -> bytes:
    with TpmQuoter(tcti) as quoter:
        return quoter.pcr_read({"sha256": [index]})["sha256"][index]


@pytest.mark.slow
def test_vtpm_agent_is_verified_and_its_runtime_measurements_replay(
    start_agent: StartAgent, backend: RecordingBackend, swtpm: str
) -> None:
    before = _pcr(swtpm, 15)
    agent = start_agent(
        {"tee": "none", "tpm": swtpm, "backend_url": backend.url, "tpm_pcrs": (0, 7, 15)}
    )
    client = AttestingClient(agent.host, agent.port)
    try:
        with pytest.raises(Exception, match="vtpm"):
            client.attest(STRICT)  # the default policy does not take vTPM-only evidence
        verified = client.attest(VTPM_ONLY)  # a real (software) TPM, not the TEE simulator
        assert verified.platform == "vtpm"
        assert verified.tpm is not None and verified.claims.tpm_ak_sha256 is not None
        # The runtime measurements: PCR 15 = extend(extend(before, model event), config event).
        events = agent.prepared.runtime_log.events
        assert [e.kind for e in events] == ["model", "config"]
        assert events[0].data == event_data("model", agent.config.model_digest or "")
        assert events[1].data == event_data("config", agent.config.digest())
        expected = before
        for event in events:
            expected = extend(expected, hashlib.sha256(event.data).digest(), "sha256")
        assert verified.tpm.pcrs["sha256"][15] == expected
        assert set(verified.tpm.pcrs["sha256"]) == {0, 7, 15}
        status, _ = client.chat(agent.token())
        assert status == 200
    finally:
        client.close()


@pytest.mark.slow
def test_a_failed_runtime_measurement_is_a_refusal_to_serve(
    tmp_path: Path,
    model: ModelDir,
    issuer: TokenIssuer,
    swtpm: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unmeasured, the agent would attest a TPM state that names neither its model nor its
    configuration: it refuses to start, with one line, not a traceback."""
    import asyncio

    from agent import server
    from agent.measure import MeasurementError

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise MeasurementError("cannot extend PCR 15 with the model digest: the TPM said no")

    monkeypatch.setattr(server, "measure_runtime", broken)
    config = base_config(
        model, issuer.write_jwks(tmp_path / "jwks.json"), tee="none", tpm=swtpm, tpm_pcrs=(0, 15)
    )
    with pytest.raises(StartupError, match="refusing to serve: cannot extend PCR 15"):
        asyncio.run(prepare(config))


@pytest.mark.slow
def test_simulated_tee_with_a_vtpm_binds_both(start_agent: StartAgent, swtpm: str) -> None:
    agent = start_agent({"tee": "sim-tdx", "tpm": swtpm})
    client = AttestingClient(agent.host, agent.port)
    try:
        verified = client.attest(ALLOW_SIMULATED)
        assert verified.platform == "sim-tdx"
        assert verified.tee is not None and verified.tpm is not None
    finally:
        client.close()


@pytest.mark.slow
def test_unreachable_vtpm_refuses_to_start(model: ModelDir, tmp_path: Path) -> None:
    pytest.importorskip("tpm2_pytss")
    config = _config(model, tmp_path, tee="none", tpm=f"swtpm:port={free_port()}")
    with pytest.raises(StartupError, match="vTPM") as err:
        _prepare(config)
    assert err.value.exit_code == 1


# -- refusals ----------------------------------------------------------------------------------


def _config(model: ModelDir, tmp_path: Path, **overrides: Any) -> AgentConfig:
    jwks = TokenIssuer().write_jwks(tmp_path / "jwks.json")
    return base_config(model, jwks, **overrides)


def _prepare(config: AgentConfig) -> None:
    import asyncio

    async def main() -> None:
        prepared = await prepare(config)
        prepared.close()

    asyncio.run(main())


def test_model_digest_mismatch_refuses_to_start(model: ModelDir, tmp_path: Path) -> None:
    config = _config(model, tmp_path, model_digest="sha256:" + "00" * 32)
    with pytest.raises(StartupError, match="model digest mismatch") as err:
        _prepare(config)
    assert err.value.exit_code == 1


def test_tampered_weights_refuse_to_start(model: ModelDir, tmp_path: Path) -> None:
    (model.path / "model.safetensors").write_bytes(b"swapped")
    with pytest.raises(StartupError, match=r"model\.safetensors"):
        _prepare(_config(model, tmp_path))


def _has_real_tee() -> bool:
    return detect_tee() is not None


@pytest.mark.parametrize("tee", ["sev-snp", "tdx"])
def test_real_tee_requested_but_absent_refuses_to_start(
    model: ModelDir, tmp_path: Path, tee: str
) -> None:
    if _has_real_tee():
        pytest.skip("this machine has a TEE guest device")
    with pytest.raises(StartupError, match=f"tee '{tee}' was requested but no TEE") as err:
        _prepare(_config(model, tmp_path, tee=tee))
    assert err.value.exit_code == 1


def test_wrong_real_tee_refuses_to_start(model: ModelDir, tmp_path: Path) -> None:
    from attestation.guest import ConfigfsTsm
    from attestation.sim import EmulatedConfigfsTsm

    emulation = EmulatedConfigfsTsm.tdx()
    found = ConfigfsTsm(emulation.root, fs=emulation)  # reports sim-tdx: not a real sev-snp
    config = _config(model, tmp_path, tee="sev-snp").validate()
    with pytest.raises(StartupError, match="a sim-tdx device"):
        detect_platform(config, detect=lambda: found)


def test_no_tee_and_no_vtpm_refuses_to_start(model: ModelDir, tmp_path: Path) -> None:
    with pytest.raises(StartupError, match="nothing can produce evidence"):
        _prepare(_config(model, tmp_path, tee="none"))
    config = _config(model, tmp_path, tee="auto").validate()
    with pytest.raises(StartupError, match="nothing can produce evidence"):
        detect_platform(config, detect=lambda: None)


def test_bad_jwks_file_is_a_configuration_error(model: ModelDir, tmp_path: Path) -> None:
    config = _config(model, tmp_path)
    Path(config.jwks_file or "").write_text('{"keys": [{"kty": "oct", "k": "AA", "kid": "x"}]}')
    with pytest.raises(StartupError, match="invalid configuration") as err:
        _prepare(config)
    assert err.value.exit_code == 2


def test_port_in_use_refuses_to_start(start_agent: StartAgent) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(StartupError, match=f"cannot listen on 127.0.0.1:{port}") as err:
            start_agent({"port": port})
        assert err.value.exit_code == 1


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env or environment_without_agent_vars(),
        timeout=120,
        check=False,
    )


def _cli_args(config: AgentConfig) -> list[str]:
    return [
        "--host", config.host,
        "--port", str(config.port),
        "--backend-url", config.backend_url,
        "--model-dir", str(config.model_dir),
        "--model-digest", str(config.model_digest),
        "--jwt-issuer", config.jwt_issuer,
        "--jwt-audience", config.jwt_audience,
        "--jwks-file", str(config.jwks_file),
        "--tee", config.tee,
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("overrides", "code", "message"),
    [
        ({"model_digest": "sha256:" + "00" * 32}, 1, "model digest mismatch"),
        ({"tee": "none"}, 1, "nothing can produce evidence"),
        ({"tee": "sev-snp"}, 1, "no TEE guest device"),
        ({"backend_url": "http://192.0.2.1:8000"}, 2, "loopback"),
    ],
)
def test_console_script_refusals_are_one_line_without_traceback(
    model: ModelDir, tmp_path: Path, overrides: dict[str, Any], code: int, message: str
) -> None:
    if overrides.get("tee") == "sev-snp" and _has_real_tee():
        pytest.skip("this machine has a TEE guest device")
    result = _run_cli(*_cli_args(_config(model, tmp_path, **overrides)))
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    refusals = [line for line in result.stderr.splitlines() if line.startswith("cube-agent:")]
    assert len(refusals) == 1 and message in refusals[0]
    # Everything else on stderr is a structured log line.
    for line in result.stderr.splitlines():
        if not line.startswith("cube-agent:"):
            json.loads(line)


def test_console_script_serves_until_a_hangup(model: ModelDir, tmp_path: Path) -> None:
    """`cube-agent` by hand: flags and environment, the simulator, a JWKS file."""
    config = _config(model, tmp_path, tee="sim-sev-snp")
    env = environment_without_agent_vars()
    env["CUBE_AGENT_EVIDENCE_BURST"] = "7"  # from the environment
    args = _cli_args(config)
    printed = json.loads(_run_cli(*args, "--print-config", env=env).stdout)
    assert printed["config"]["evidence_burst"] == 7
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                conn = http.client.HTTPSConnection(
                    config.host, config.port, context=unverified_context(), timeout=5
                )
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    conn.close()
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client = AttestingClient(config.host, config.port)
        try:
            verified = client.attest(ALLOW_SIMULATED)
        finally:
            client.close()
        # The evidence names the configuration --print-config measured.
        assert verified.claims.config_digest == printed["digest"]
        # SIGHUP (a closed terminal) stops it cleanly, as SIGTERM does (it used to kill it).
        proc.send_signal(signal.SIGHUP)
        _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    logs = [json.loads(line) for line in stderr.splitlines()]
    assert any("SIMULATED" in entry["msg"] and entry["level"] == "warning" for entry in logs)
    assert any(entry["msg"] == "serving HTTPS" for entry in logs)
    assert any(entry["msg"] == "shutting down" for entry in logs)
    assert "PRIVATE KEY" not in stderr


# -- the private key never touches disk -----------------------------------------------------------


_SKIP_DIRS = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".hypothesis", "node_modules"}


def _files(root: Path, since: float) -> Iterator[Path]:
    for directory, dirs, names in os.walk(root, onerror=lambda _e: None):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        for name in names:
            path = Path(directory, name)
            try:
                st = path.lstat()
            except OSError:
                continue
            if path.is_symlink() or st.st_size > 64 * 1024 * 1024 or st.st_mtime < since:
                continue
            yield path


def test_private_keys_are_never_written(start_agent: StartAgent, tmp_path: Path) -> None:
    started = time.time() - 1
    agent = start_agent()
    agent.get("/attestation?nonce=" + "11" * 32)
    agent.get("/v1/models", token=agent.token())
    identity = agent.prepared.identity
    tls_key = identity._tls_key  # the test needs the secret to search for it
    hpke_key = identity._hpke_key
    der = tls_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    pem_body = tls_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).splitlines()[1]  # the first base64 line of the key
    scalar = tls_key.private_numbers().private_value.to_bytes(32, "big")
    hpke_raw = hpke_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    needles = [der, pem_body, scalar, hpke_raw]
    scanned = 0
    roots = {tmp_path, Path(tempfile.gettempdir()), Path.cwd(), ROOT}
    for root in roots:
        # Everything under the test's own directory; elsewhere, what changed during the test.
        for path in _files(root, 0 if root == tmp_path else started):
            try:
                data = path.read_bytes()
            except OSError:
                continue
            scanned += 1
            for needle in needles:
                assert needle not in data, f"key material found in {path}"
            if root == tmp_path:
                assert b"PRIVATE KEY" not in data, path
    assert scanned > 0
    # No descriptor of the process still points at the memory file that held the key.
    for fd in os.listdir("/proc/self/fd"):
        try:
            assert "cube-agent-tls" not in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue


def test_running_agent_fixture_exposes_what_b_needs(start_agent: StartAgent) -> None:
    agent: RunningAgent = start_agent({"evidence_burst": 5})
    assert agent.url == f"https://127.0.0.1:{agent.port}"
    assert agent.config.evidence_burst == 5
    assert agent.cert_pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert agent.get("/health").status == 200
    assert agent.config.jwt_issuer == ISSUER and agent.config.jwt_audience == AUDIENCE


def test_a_connection_that_sends_no_request_head_is_closed(
    start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the TLS handshake a peer that stays silent, or trickles a head it never ends, is
    closed; one that finished a request is left to the keep-alive timer. (aiohttp's own timer
    never closes a connection that sent no request: idle peers held every descriptor.)"""
    import agent.server as server_module

    monkeypatch.setattr(server_module, "REQUEST_HEAD_SECONDS", 1.0)
    monkeypatch.setattr(server_module, "IDLE_SECONDS", 6.0)
    monkeypatch.setattr(server_module, "_SWEEP_SECONDS", 0.5)
    agent = start_agent()

    def connect() -> ssl.SSLSocket:
        raw = socket.create_connection((agent.host, agent.port), timeout=10)
        return unverified_context().wrap_socket(raw, server_hostname=agent.host)

    def closed_by_the_agent(sock: ssl.SSLSocket) -> bool:
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):  # (closed, either way)
            return sock.recv(1) == b""
        return True

    silent, trickling, served, second = connect(), connect(), connect(), connect()
    trickling.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n")  # never ends its head
    for sock in (served, second):
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: a\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    started = time.monotonic()
    time.sleep(2.5)  # past the head deadline (1 s) and a few sweeps, within the idle time
    served.settimeout(0.2)
    with pytest.raises(TimeoutError):
        served.recv(1)  # still open: it finished a request, and is idle for less than 6 s
    assert closed_by_the_agent(silent) and closed_by_the_agent(trickling)
    assert time.monotonic() - started < 8
    # A second head trickled a line at a time (aiohttp's keep-alive timer never fired).
    second.sendall(b"GET /health HTTP/1.1\r\n")
    for _ in range(30):
        try:
            second.sendall(b"X-Slow: 1\r\n")
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
            break
        time.sleep(0.5)
    assert closed_by_the_agent(second)
    assert time.monotonic() - started < 16
    for sock in (silent, trickling, served, second):
        sock.close()


def test_a_body_that_stops_arriving_is_a_408(
    start_agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    import agent.forward as forward

    monkeypatch.setattr(forward, "BODY_READ_SECONDS", 1.0)
    agent = start_agent()
    raw = socket.create_connection((agent.host, agent.port), timeout=10)
    sock = unverified_context().wrap_socket(raw, server_hostname=agent.host)
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {agent.token()}\r\nContent-Length: 100\r\n\r\n".encode()
        + b'{"model":'
    )
    answer = sock.recv(65536)
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer[:80]
    assert b'"code": "timeout"' in answer or b'"code":"timeout"' in answer
