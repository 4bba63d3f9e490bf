"""The real ``cube-proxy`` executable for end-to-end tests, and a small admin API client."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.server import free_port

ROOT = Path(__file__).resolve().parents[2]
ADMIN_EMAIL = "admin@cube.test"
ADMIN_PASSWORD = "e2e-admin-password-7c1d"


def proxy_executable() -> Path:
    for candidate in (Path(sys.executable).parent / "cube-proxy", ROOT / ".venv/bin/cube-proxy"):
        if candidate.exists():
            return candidate
    raise RuntimeError("cube-proxy is not installed: run scripts/bootstrap")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def listening_sockets(port: int) -> int:
    """How many sockets listen on ``port`` (each worker of ``--workers N`` has its own, with
    ``SO_REUSEPORT``), from the kernel's tables."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                count += 1
    return count


class ProxyProcess:
    """``cube-proxy`` on a free loopback port over ``database``; the admin bootstrapped."""

    def __init__(self, database: str, log: Path, *, extra: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        self.args = [str(proxy_executable()), "--host", "127.0.0.1", "--port", str(self.port)]
        # One worker unless a test asks for more: tests count verifications, rate-limit
        # buckets and metrics of one process (several workers: tests/proxy/test_workers.py).
        options = {"workers": "1", **(extra or {})}
        for name, value in options.items():
            self.args += [f"--{name}", value]
        self.workers = int(options["workers"])
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("CUBE_PROXY_")}
        self.env.update(
            {
                "CUBE_PROXY_DATABASE": database,
                "CUBE_PROXY_ADMIN_EMAIL": ADMIN_EMAIL,
                "CUBE_PROXY_ADMIN_PASSWORD": ADMIN_PASSWORD,
            }
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> ProxyProcess:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cube-proxy exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                # Every worker listening, not just the first: tests that spread connections
                # over the workers would otherwise all reach the one that started first.
                if (
                    self.request("GET", "/health").status == 200
                    and listening_sockets(self.port) >= self.workers
                ):
                    return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"cube-proxy did not start:\n{self.tail()}")

    def tail(self, size: int = 4000) -> str:
        return self.log.read_bytes()[-size:].decode(errors="replace")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def request(
        self,
        method: str,
        path: str,
        payload: Any = None,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 120,
    ) -> Answer:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            all_headers = dict(headers or {})
            body = None
            if payload is not None:
                body = json.dumps(payload).encode()
                all_headers["Content-Type"] = "application/json"
            if token is not None:
                all_headers["Authorization"] = f"Bearer {token}"
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return Answer(response.status, dict(response.getheaders()), response.read())
        finally:
            conn.close()

    def admin(self, method: str, path: str, payload: Any = None, *, token: str) -> Any:
        answer = self.request(method, path, payload, token=token)
        assert answer.status < 300, (method, path, answer.status, answer.body)
        return answer.json() if answer.body else None

    def login(self, email: str = ADMIN_EMAIL, password: str = ADMIN_PASSWORD) -> str:
        answer = self.request("POST", "/auth/login", {"email": email, "password": password})
        assert answer.status == 200, answer.body
        token: str = answer.json()["access_token"]
        return token

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
