"""``cube-proxy --workers N``: N processes on one port (SO_REUSEPORT), a change made through one
worker seen at once by the others, one verification of an agent serving them all, and the
parent supervising its workers."""

from __future__ import annotations

import http.client
import os
import signal
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from proxy.gateway.ops import METRICS_TOKEN_ENV
from tests.agent.backends import FakeOpenAI, serving
from tests.agent.conftest import write_model
from tests.e2e.servers import AgentProcess, TinyModel
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


def test_a_hangup_stops_the_proxy_and_its_workers_cleanly(tmp_path: Path) -> None:
    """SIGHUP (a closed terminal or SSH session, sent to the whole process group) stops it as
    SIGTERM does: every worker drains and writes its queued audit rows, exit 0. It used to
    kill them outright, losing rows of answers already given."""
    proxy = ProxyProcess(
        f"sqlite:///{tmp_path}/p.db", tmp_path / "proxy.log", extra={"workers": "2"}
    )
    with proxy:
        assert proxy.proc is not None
        workers = _children(proxy.proc.pid)
        admin = proxy.login()
        proxy.admin("POST", "/admin/domains", {"alias": "acme"}, token=admin)
        os.killpg(proxy.proc.pid, signal.SIGHUP)
        assert proxy.proc.wait(60) == 0, proxy.tail()
        assert _wait_gone(workers)
        assert proxy.tail().count('"shutting down"') == 2, proxy.tail()

    # Under nohup a hangup is ignored, as whoever started it asked.
    ignoring = ProxyProcess(
        f"sqlite:///{tmp_path}/p.db", tmp_path / "proxy2.log", extra={"workers": "2"}
    )
    ignoring.args = ["nohup", *ignoring.args]
    with ignoring:
        assert ignoring.proc is not None
        os.killpg(ignoring.proc.pid, signal.SIGHUP)
        time.sleep(2)
        assert ignoring.proc.poll() is None, ignoring.tail()
        assert ignoring.request("GET", "/health").status == 200
        assert len(_children(ignoring.proc.pid)) == 2
        assert ignoring.stop() == 0


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


def _metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def test_metrics_report_every_worker_together(tmp_path: Path) -> None:
    """Whichever worker answers ``/metrics``, it reports the requests of all of them."""
    proxy = ProxyProcess(
        f"sqlite:///{tmp_path}/p.db", tmp_path / "proxy.log", extra={"workers": "2"}
    )
    proxy.env[METRICS_TOKEN_ENV] = _METRICS_TOKEN
    with proxy:
        assert proxy.proc is not None
        # Every worker keeps /metrics behind the token (it is read from the environment).
        for _ in range(4):
            assert _scrape(proxy, token=None).startswith('{"error"')
            assert _scrape(proxy, token="wrong-" + _METRICS_TOKEN).startswith('{"error"')
        workers = _children(proxy.proc.pid)
        admin = proxy.login()
        proxy.admin("POST", "/admin/domains", {"alias": "acme"}, token=admin)
        pat = proxy.admin("POST", "/admin/tokens", {"domain": "acme", "name": "t"}, token=admin)
        assert set(_statuses(proxy, "/acme/v1/models", pat["token"], 30)) == {503}
        # Each worker counted some of them (the kernel spread the 30 connections)...
        directory = Path(
            dict(
                entry.split("=", 1)
                for entry in Path(f"/proc/{workers[0]}/environ").read_text().split("\0")
                if "=" in entry
            )["PROMETHEUS_MULTIPROC_DIR"]
        )
        per_worker = []
        for pid in workers:
            registry = CollectorRegistry()
            collector = MultiProcessCollector(registry, path=str(directory))
            files = [str(directory / f"counter_{pid}.db")]
            samples = {
                (s.name, tuple(sorted(s.labels.items()))): s.value
                for metric in collector.merge(files, accumulate=True)
                for s in metric.samples
            }
            per_worker.append(
                samples.get(
                    ("cube_proxy_requests_total", (("route", "/v1/models"), ("status", "503"))),
                    0.0,
                )
            )
        assert sum(per_worker) == 30 and all(n > 0 for n in per_worker), per_worker
        # ...and every scrape, whichever worker takes it, reports all 30.
        for _ in range(6):
            text = _scrape(proxy)
            total = _metric(text, "cube_proxy_requests_total", route="/v1/models", status="503")
            assert total == 30, text
            assert _metric(text, "cube_proxy_in_flight") == 0
        assert proxy.stop() == 0


_METRICS_TOKEN = "scrape-" + "x" * 24


def _scrape(proxy: ProxyProcess, token: str | None = _METRICS_TOKEN) -> str:
    """``/metrics`` as text (its JSON error without the right token)."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=30)
    try:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        conn.request("GET", "/metrics", headers=headers)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def test_workers_verify_an_agent_once_together(tmp_path: Path) -> None:
    """The first worker to need an agent verifies it; the other adopts that verification
    instead of asking the agent for evidence again (proxy.gateway.sharedtrust)."""
    fake = FakeOpenAI()
    proxy = ProxyProcess(
        f"sqlite:///{tmp_path}/p.db", tmp_path / "proxy.log", extra={"workers": "2"}
    )
    with serving(fake), proxy:
        admin = proxy.login()
        jwks = tmp_path / "jwks.json"
        jwks.write_bytes(proxy.request("GET", "/.well-known/jwks.json").body)
        model = write_model(tmp_path / "model")
        agent = AgentProcess(
            backend_url=fake.url,
            model=TinyModel(model.path, model.digest),
            jwks_file=jwks,
            issuer=proxy.url,
            audience="acme",
            log=tmp_path / "agent.log",
        ).start()
        try:
            proxy.admin("POST", "/admin/domains", {"alias": "acme"}, token=admin)
            policy = {"format": "cube-policy/1", "allow_simulated": True}
            proxy.admin("PUT", "/admin/domains/acme/policy", policy, token=admin)
            proxy.admin(
                "POST",
                "/admin/domains/acme/backends",
                {"url": agent.url, "kind": "vllm", "models": ["cube-tiny"]},
                token=admin,
            )
            pat = proxy.admin("POST", "/admin/tokens", {"domain": "acme", "name": "t"}, token=admin)
            # 24 connections: the kernel gives each worker some of them.
            assert _statuses(proxy, "/acme/v1/models", pat["token"], 24) == [200] * 24
            text = _scrape(proxy)
            served = _metric(text, "cube_proxy_requests_total", route="/v1/models", status="200")
            assert served == 24
            # One evidence fetch and verification in all; the other worker adopted it (each
            # worker verifying on its own would show verified 2, shared 0).
            assert _metric(text, "cube_proxy_attestations_total", outcome="verified") == 1, text
            assert _metric(text, "cube_proxy_attestations_total", outcome="shared") == 1, text
            assert proxy.stop() == 0
        finally:
            agent.stop()
