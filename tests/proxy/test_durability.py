"""No acknowledged write is lost when the proxy is killed (SIGKILL) under load, on SQLite and
on PostgreSQL.

The admin API runs as its own process (``python -m proxy.admin_api``) on a SQLite file or a
database of the test session's PostgreSQL server; many clients create domains and users
concurrently; the process is killed with SIGKILL while requests are in flight; a new process on
the same database must hold every object whose creation was answered 2xx (with the audit row
written in the same request), and a SQLite file must pass SQLite's integrity check.

A process kill leaves the OS page cache intact, so this proves the application's side: an
answer is sent only after COMMIT returned (no write-behind buffering, group commit included).
Surviving power loss additionally needs the commit on disk, which ``synchronous=FULL`` in WAL
mode gives; tests/proxy/test_db.py checks it is set on every connection.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.proxy.conftest import ADMIN_EMAIL, ADMIN_PASSWORD, free_port

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _call(port: int, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = conn.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        conn.close()


@contextmanager
def _server(database: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    port = free_port()
    env = {
        **os.environ,
        "CUBE_PROXY_ADMIN_EMAIL": ADMIN_EMAIL,
        "CUBE_PROXY_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "PYTHONPATH": str(ROOT),
    }
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "proxy.admin_api",
            "--database",
            database,
            "--port",
            str(port),
            "--argon2-memory-kib",
            "8192",
            "--argon2-time-cost",
            "1",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if _call(port, "GET", "/.well-known/jwks.json")[0] == 200:
                    break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the admin API did not start: {process.stderr!r}")
            time.sleep(0.05)
        yield process, port
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process.stderr is not None:
            process.stderr.close()


def _login(port: int) -> str:
    status, body = _call(
        port, "POST", "/auth/login", {"email": ADMIN_EMAIL, "password": ADMIN_PASSWORD}
    )
    assert status == 200, body
    return str(body["access_token"])


def test_every_acknowledged_write_survives_sigkill(database: str) -> None:
    acknowledged: list[tuple[str, str]] = []  # (kind, id)
    failures: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    with _server(database) as (process, port):
        token = _login(port)

        def writer(worker: int) -> None:
            n = 0
            while not stop.is_set():
                n += 1
                if n % 2:
                    kind, path = "domain", "/admin/domains"
                    body: dict[str, Any] = {"alias": f"d-{worker}-{n}", "name": f"Domain {n}"}
                else:
                    kind, path = "user", "/admin/users"
                    body = {"email": f"u{worker}-{n}@example.com", "name": f"User {n}"}
                try:
                    status, answer = _call(port, "POST", path, body, token)
                except (OSError, http.client.HTTPException, ValueError) as exc:
                    with lock:
                        failures.append(type(exc).__name__)
                    return
                if 200 <= status < 300:
                    with lock:
                        acknowledged.append((kind, answer["id"]))

        threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(16)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)  # mid-load: requests are in flight
        process.wait(10)
        stop.set()
        for thread in threads:
            thread.join(30)
        assert process.returncode == -signal.SIGKILL

    assert len(acknowledged) >= 300
    assert failures, "the kill should have cut requests in flight"

    if not database.startswith("postgresql://"):
        with sqlite3.connect(database) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    with _server(database) as (_, port):
        token = _login(port)
        missing = []
        for kind, object_id in acknowledged:
            path = f"/admin/{'domains' if kind == 'domain' else 'users'}/{object_id}"
            status, _ = _call(port, "GET", path, token=token)
            if status != 200:
                missing.append((kind, object_id, status))
        assert missing == []
        # The audit row of each acknowledged domain creation was committed before the answer.
        for kind, object_id in acknowledged:
            if kind != "domain":
                continue
            status, body = _call(port, "GET", f"/admin/domains/{object_id}/audit", token=token)
            assert status == 200
            assert [row["detail"].split(";")[0] for row in body["audit"]] == ["domain created"]
        # And the restarted server takes writes again.
        status, _ = _call(port, "POST", "/admin/domains", {"alias": "after-restart"}, token)
        assert status == 201
