"""``cube-proxy --workers N``: N processes on one port (SO_REUSEPORT), a change made through one
worker seen at once by the others, and the parent supervising its workers."""

from __future__ import annotations

import http.client
import os
import signal
import time
from pathlib import Path

import pytest

from tests.proxy.processes import ProxyProcess

pytestmark = pytest.mark.slow


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _statuses(
    proxy: ProxyProcess, path: str, token: str, count: int, *, keep_alive: bool = False
) -> list[int]:
    """``count`` requests, each on a new connection (the kernel spreads connections, not
    requests, over the workers), or all on one kept-alive connection (one worker)."""
    out = []
    conn: http.client.HTTPConnection | None = None
    try:
        for _ in range(count):
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
            conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            out.append(response.status)
            if not keep_alive:
                conn.close()
                conn = None
    finally:
        if conn is not None:
            conn.close()
    return out


def _wait_gone(pids: list[int], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_alive(p) for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_workers_share_the_port_and_see_each_others_changes(tmp_path: Path) -> None:
    proxy = ProxyProcess(
        f"sqlite:///{tmp_path}/p.db", tmp_path / "proxy.log", extra={"workers": "2"}
    )
    with proxy:
        assert proxy.proc is not None
        workers = _children(proxy.proc.pid)
        assert len(workers) == 2, proxy.tail()
        admin = proxy.login()
        proxy.admin("POST", "/admin/domains", {"alias": "acme"}, token=admin)
        pat = proxy.admin("POST", "/admin/tokens", {"domain": "acme", "name": "t"}, token=admin)
        # Authenticated (the domain has no backend yet: 503), and remembered by both workers.
        assert set(_statuses(proxy, "/acme/v1/models", pat["token"], 24)) == {503}
        proxy.admin("DELETE", f"/admin/tokens/{pat['id']}", token=admin)
        # Revoked through one worker: refused at once by every worker (a worker that had not
        # heard of it would still answer 503 from its cache).
        assert set(_statuses(proxy, "/acme/v1/models", pat["token"], 24)) == {401}
        assert proxy.stop() == 0
        assert _wait_gone(workers)


def test_a_dead_worker_stops_the_proxy_and_workers_die_with_their_parent(
    tmp_path: Path,
) -> None:
    proxy = ProxyProcess(
        f"sqlite:///{tmp_path}/p.db", tmp_path / "proxy.log", extra={"workers": "2"}
    )
    with proxy:
        assert proxy.proc is not None
        workers = _children(proxy.proc.pid)
        assert len(workers) == 2
        os.kill(workers[0], signal.SIGKILL)
        assert proxy.proc.wait(30) != 0  # the parent noticed, stopped the other, failed
        assert _wait_gone(workers)

    orphaned = ProxyProcess(
        f"sqlite:///{tmp_path}/p.db", tmp_path / "proxy2.log", extra={"workers": "2"}
    )
    with orphaned:
        assert orphaned.proc is not None
        workers = _children(orphaned.proc.pid)
        assert len(workers) == 2
        orphaned.proc.send_signal(signal.SIGKILL)
        orphaned.proc.wait(10)
        assert _wait_gone(workers), "a worker outlived its parent"


def test_workers_enforce_each_rate_limit_once_together(tmp_path: Path) -> None:
    proxy = ProxyProcess(
        f"sqlite:///{tmp_path}/p.db", tmp_path / "proxy.log", extra={"workers": "2"}
    )
    with proxy:
        admin = proxy.login()
        proxy.admin("POST", "/admin/domains", {"alias": "acme"}, token=admin)
        proxy.admin(
            "PUT", "/admin/domains/acme/limits", {"token_requests_per_minute": 6}, token=admin
        )
        pat = proxy.admin("POST", "/admin/tokens", {"domain": "acme", "name": "t"}, token=admin)
        # One kept-alive client reaches one worker, and gets the whole limit there (admitted:
        # 503, the domain has no backend), not a per-worker share of it...
        statuses = _statuses(proxy, "/acme/v1/models", pat["token"], 7, keep_alive=True)
        assert statuses == [503] * 6 + [429]
        # ...and no worker admits more: every new connection, whichever worker takes it, is
        # refused (a worker with buckets of its own would admit six more).
        assert set(_statuses(proxy, "/acme/v1/models", pat["token"], 16)) == {429}
        assert proxy.stop() == 0
