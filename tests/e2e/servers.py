"""Real processes for the end-to-end tests and ``scripts/bench-agent``: vLLM's OpenAI server on
the tiny model, the ``cube-agent`` executable in front of it, and an attesting client.

Nothing here is a stand-in. vLLM runs from the venv ``scripts/setup-vllm`` makes (outside the
checkout, ``${CUBE_CACHE:-~/.cache/cube}/vllm-venv``) on the model ``scripts/make-tiny-model``
writes (``${CUBE_CACHE}/models/cube-tiny``); both scripts are idempotent and take well under a
second when their caches are current. Every server listens on 127.0.0.1 only, on a free port, logs
to a file, and is stopped with SIGTERM, then SIGKILL of its own process group.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
MODEL_NAME = "cube-tiny"
#: vLLM needs 65-100 s to start here (three processes import vllm, then torch.compile).
VLLM_START_TIMEOUT = 400.0
AGENT_START_TIMEOUT = 60.0


def cache_dir() -> Path:
    return Path(os.environ.get("CUBE_CACHE") or Path.home() / ".cache" / "cube")


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _run_script(args: Sequence[str]) -> str:
    """Run one of the project's idempotent setup scripts; its last stdout line."""
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-2000:]}"
            f"\n{proc.stderr[-4000:]}"
        )
    lines = proc.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"{' '.join(args)} printed nothing")
    return lines[-1].strip()


def ensure_vllm() -> Path:
    """The vLLM venv (``scripts/setup-vllm``: ~4 min the first time, 0.2 s after)."""
    venv = Path(_run_script([str(ROOT / "scripts/setup-vllm")]))
    if not (venv / "bin" / "python").exists():
        raise RuntimeError(f"scripts/setup-vllm named {venv}, which has no bin/python")
    return venv


@dataclass(frozen=True)
class TinyModel:
    path: Path
    digest: str  # "sha256:<hex>", from cube-model.json


def ensure_tiny_model(directory: Path | None = None) -> TinyModel:
    """The tiny model (``scripts/make-tiny-model``), its digest cross-checked with its manifest."""
    directory = directory or cache_dir() / "models" / MODEL_NAME
    printed = _run_script([str(ROOT / "scripts/make-tiny-model"), str(directory)])
    digest = printed.split()[-1].strip("()")
    manifest = json.loads((directory / "cube-model.json").read_text())
    if manifest["digest"] != digest or not digest.startswith("sha256:"):
        raise RuntimeError(f"make-tiny-model printed {printed!r}; the manifest says {manifest}")
    return TinyModel(directory, digest)


def log_tail(path: Path, size: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-size:]
    except OSError:
        return "(no log)"


def die_with_parent(cmd: Sequence[str]) -> list[str]:
    """``cmd`` under ``setpriv --pdeathsig TERM`` (util-linux), so the server is sent SIGTERM if
    the process that started it dies, even by SIGKILL: no vLLM outlives its test session."""
    setpriv = shutil.which("setpriv")
    if setpriv is None:  # pragma: no cover - util-linux is on every Debian
        return list(cmd)
    return [setpriv, "--pdeathsig", "TERM", "--", *cmd]


def _stop_group(proc: subprocess.Popen[bytes], grace: float) -> int | None:
    """SIGTERM the leader, wait, then SIGKILL whatever is left of ITS process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    rc: int | None
    try:
        rc = proc.wait(grace)
    except subprocess.TimeoutExpired:
        rc = None
    # vLLM's engine core and worker wind down after the API server: give them a moment.
    deadline = time.monotonic() + (10 if rc is not None else 0)
    while True:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    if rc is None:
        proc.wait(10)  # reap the killed leader
    return rc  # None: it had to be killed


def plain_request(
    port: int,
    method: str,
    path: str,
    body: Any = None,
    *,
    timeout: float = 120,
) -> tuple[int, Any]:
    """One HTTP request to a loopback server; (status, parsed JSON or text)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, data, {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        parsed: Any = json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()
        return response.status, parsed
    finally:
        conn.close()


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` exactly as docs/backends.md starts it."""

    def __init__(
        self,
        venv: Path,
        model: TinyModel,
        log: Path,
        *,
        extra_args: Sequence[str] = (),
        port: int | None = None,
    ) -> None:
        self.model = model
        self.log = log
        self.port = port or free_port()
        self.cmd = [
            str(venv / "bin" / "python"),
            "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model.path),
            "--served-model-name", MODEL_NAME,
            "--host", HOST,
            "--port", str(self.port),
            "--dtype", "float32",
            *extra_args,
        ]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self.exit_code: int | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @staticmethod
    def environment() -> dict[str, str]:
        env = dict(os.environ)
        # Without a KV cache size vLLM's CPU build refuses to start; nothing leaves the box.
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            HF_HUB_OFFLINE="1",
        )
        return env

    def start(self) -> VllmServer:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(
                die_with_parent(self.cmd),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                start_new_session=True,  # its own group: the engine core and worker with it
            )
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float, timeout: float = VLLM_START_TIMEOUT) -> None:
        assert self.proc is not None
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"vLLM exited with {self.proc.returncode} while starting; "
                    f"log {self.log}:\n{log_tail(self.log)}"
                )
            try:
                status, body = plain_request(self.port, "GET", "/v1/models", timeout=5)
                if status == 200 and body["data"][0]["id"] == MODEL_NAME:
                    return
            except (OSError, http.client.HTTPException, KeyError, IndexError, ValueError):
                pass
            time.sleep(0.5)
        raise RuntimeError(
            f"vLLM was not ready after {timeout:.0f} s; log {self.log}:\n{log_tail(self.log)}"
        )

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.exit_code = _stop_group(self.proc, grace=60)
        return self.exit_code

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def agent_executable() -> Path:
    """``cube-agent`` next to the interpreter running the tests (the project's .venv)."""
    for candidate in (Path(sys.executable).parent / "cube-agent", ROOT / ".venv/bin/cube-agent"):
        if candidate.exists():
            return candidate
    raise RuntimeError("cube-agent is not installed: run scripts/bootstrap")


def agent_environment() -> dict[str, str]:
    """The caller's environment minus CUBE_AGENT_* (the flags alone configure the agent)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CUBE_AGENT_")}


class AgentProcess:
    """The real ``cube-agent`` executable, configured by flags, serving HTTPS on loopback."""

    def __init__(
        self,
        *,
        backend_url: str,
        model: TinyModel,
        jwks_file: Path,
        issuer: str,
        audience: str,
        log: Path,
        tee: str = "sim-sev-snp",
        tpm: str | None = None,
        model_digest: str | None = None,
        model_dir: Path | None = None,
        extra: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.log = log
        options: dict[str, str] = {
            "host": HOST,
            "port": str(self.port),
            "backend": "vllm",
            "backend-url": backend_url,
            "model-name": MODEL_NAME,
            "model-dir": str(model_dir or model.path),
            "model-digest": model_digest or model.digest,
            "jwt-issuer": issuer,
            "jwt-audience": audience,
            "jwks-file": str(jwks_file),
            "tee": tee,
            **(extra or {}),
        }
        if tpm is not None:
            options["tpm"] = tpm
        self.args = [str(agent_executable())]
        for name, value in options.items():
            self.args += [f"--{name}", value]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://{HOST}:{self.port}"

    def print_config(self) -> dict[str, Any]:
        """``cube-agent --print-config`` with the same flags: the measured config and digest."""
        out = subprocess.run(
            [*self.args, "--print-config"],
            capture_output=True,
            env=agent_environment(),
            check=True,
            timeout=60,
        )
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def run_to_exit(self, timeout: float = AGENT_START_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run the agent expecting it to refuse to start (it must exit by itself)."""
        return subprocess.run(
            self.args,
            capture_output=True,
            text=True,
            env=agent_environment(),
            timeout=timeout,
            check=False,
        )

    def start(self) -> AgentProcess:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("wb") as f:
            self.proc = subprocess.Popen(
                die_with_parent(self.args),
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                env=agent_environment(),
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float = AGENT_START_TIMEOUT) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"cube-agent exited with {self.proc.returncode} while starting:\n"
                    f"{log_tail(self.log)}"
                )
            try:
                conn = http.client.HTTPSConnection(
                    HOST, self.port, context=unverified_context(), timeout=5
                )
                try:
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        return
                finally:
                    conn.close()
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.1)
        raise RuntimeError(f"cube-agent not serving after {timeout:.0f} s:\n{log_tail(self.log)}")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        return _stop_group(self.proc, grace=20)

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- the attesting client -----------------------------------------------------------------------


def unverified_context() -> ssl.SSLContext:
    """For the first connection only: the client verifies the certificate through evidence."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def pinned_context(cert_pem_file: Path) -> ssl.SSLContext:
    """Trusts exactly the attested certificate (and checks the host name 127.0.0.1 against it)."""
    return ssl.create_default_context(cafile=str(cert_pem_file))


def fetch_evidence(port: int, nonce: bytes) -> tuple[int, bytes, bytes]:
    """``GET /attestation?nonce=`` on ONE TLS connection; (status, body, that connection's
    server certificate, DER). The certificate is read from the very socket the answer came on."""
    raw = socket.create_connection((HOST, port), timeout=30)
    tls = unverified_context().wrap_socket(raw, server_hostname=HOST)
    try:
        der = tls.getpeercert(binary_form=True)
        if der is None:
            raise RuntimeError("the server sent no certificate")
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        conn.sock = tls  # the request goes over this already-established TLS connection
        conn.request("GET", f"/attestation?nonce={nonce.hex()}")
        response = conn.getresponse()
        return response.status, response.read(), der
    finally:
        tls.close()


def cert_sha256(der: bytes) -> bytes:
    return hashlib.sha256(der).digest()


def der_to_pem(der: bytes) -> str:
    return ssl.DER_cert_to_PEM_cert(der)


def sse_events(lines: Iterator[bytes]) -> Iterator[str]:
    """The ``data:`` payloads of a server-sent event stream, ``[DONE]`` included."""
    for raw in lines:
        line = raw.rstrip(b"\r\n")
        if line.startswith(b"data:"):
            yield line[5:].strip().decode()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class PinnedClient:
    """HTTPS to the agent, trusting only the certificate its evidence named."""

    def __init__(self, port: int, cert_pem_file: Path) -> None:
        self.port = port
        self.cert_pem_file = cert_pem_file
        self.context = pinned_context(cert_pem_file)

    def connection(self, timeout: float = 120) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection(HOST, self.port, context=self.context, timeout=timeout)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        conn = self.connection()
        try:
            all_headers = dict(headers or {})
            if token is not None:
                all_headers["Authorization"] = f"Bearer {token}"
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                all_headers["Content-Type"] = "application/json"
            conn.request(method, path, data, all_headers)
            response = conn.getresponse()
            return Reply(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()


def read_stream(
    client: PinnedClient | None, port: int, path: str, body: dict[str, Any], token: str | None
) -> list[tuple[float, str]]:
    """POST a streaming request; (arrival time, data payload) of every SSE event."""
    conn: http.client.HTTPConnection
    conn = client.connection() if client else http.client.HTTPConnection("127.0.0.1", port)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    try:
        conn.request("POST", path, json.dumps(body), headers)
        response = conn.getresponse()
        assert response.status == 200, response.read()[:500]
        assert response.getheader("Content-Type", "").startswith("text/event-stream")
        return [(time.monotonic(), data) for data in sse_events(response)]
    finally:
        conn.close()


def stream_text(events: list[tuple[float, str]]) -> tuple[str, dict[str, Any], list[float]]:
    """(joined content, usage, arrival times of content events); asserts [DONE] ends it."""
    assert events and events[-1][1] == "[DONE]"
    text: list[str] = []
    usage: dict[str, Any] = {}
    times: list[float] = []
    for t, data in events[:-1]:
        chunk = json.loads(data)
        usage = chunk.get("usage") or usage
        for choice in chunk["choices"]:
            piece = choice.get("delta", {}).get("content") or choice.get("text") or ""
            if piece:
                text.append(piece)
                times.append(t)
    return "".join(text), usage, times
