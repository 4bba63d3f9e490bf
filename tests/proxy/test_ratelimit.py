# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""Rate limits: requests and tokens per minute, per domain and per token, with 429 and
Retry-After. Unit tests on a fake clock, then through the proxy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from proxy.directory import Caller, DomainLimits
from proxy.gateway.ratelimit import LimitExceeded, RateLimiter, SharedBuckets
from tests.agent.backends import FakeOpenAI
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    Agents,
    ProxyFactory,
    agents,
    directory,
    fake_openai,
    one_domain,
    proxy,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def caller(user: str = "u1", token_id: str | None = "pat-1", domain: str = "d1") -> Caller:
    return Caller(
        user_id=user,
        domain_id=domain,
        domain_alias=domain,
        actions=frozenset({"inference"}),
        token_kind="pat" if token_id else "access",
        token_id=token_id,
        models=None,
    )


def _shared(path: Path, clock: Clock) -> RateLimiter:
    return RateLimiter(clock, store=SharedBuckets(path))


def test_limiters_sharing_a_file_enforce_each_limit_once(tmp_path: Path) -> None:
    """The workers of ``cube-proxy --workers N``: together exactly the limit, and any one of
    them alone the whole limit (not a share)."""
    SharedBuckets.create(tmp_path / "limits")
    clock = Clock()
    first, second = _shared(tmp_path / "limits", clock), _shared(tmp_path / "limits", clock)
    limits = DomainLimits(requests_per_minute=6, token_requests_per_minute=4)
    for limiter in (first, second, first, second):
        limiter.admit(caller(), limits)
    for limiter in (first, second):  # the token's four are taken
        with pytest.raises(LimitExceeded) as refused:
            limiter.admit(caller(), limits)
        assert refused.value.which == "token_requests" and refused.value.retry_after == 15
    # Another token of the domain: the domain's last two, through either limiter.
    second.admit(caller(token_id="pat-2"), limits)
    first.admit(caller(token_id="pat-2"), limits)
    with pytest.raises(LimitExceeded) as refused:
        second.admit(caller(token_id="pat-3"), limits)
    assert refused.value.which == "domain_requests"
    # A file of its own: one limiter takes the whole limit.
    SharedBuckets.create(tmp_path / "alone")
    alone = _shared(tmp_path / "alone", clock)
    for _ in range(4):
        alone.admit(caller(), limits)
    with pytest.raises(LimitExceeded):
        alone.admit(caller(), limits)


def test_tokens_charged_through_one_worker_hold_back_the_others(tmp_path: Path) -> None:
    SharedBuckets.create(tmp_path / "limits")
    clock = Clock()
    first, second = _shared(tmp_path / "limits", clock), _shared(tmp_path / "limits", clock)
    limits = DomainLimits(tokens_per_minute=600)  # 10 a second
    second.admit(caller(), limits)
    first.charge(caller(), limits, 650)  # 50 into debt
    with pytest.raises(LimitExceeded) as refused:
        second.admit(caller(user="u2", token_id="pat-2"), limits)
    assert refused.value.which == "domain_tokens" and refused.value.retry_after == 5
    clock.now += 5
    second.admit(caller(user="u2", token_id="pat-2"), limits)


def test_a_full_shared_table_reuses_the_slots_of_refilled_buckets(tmp_path: Path) -> None:
    SharedBuckets.create(tmp_path / "limits", slots=64)  # the smallest table: one probe run
    clock = Clock()
    limiter = _shared(tmp_path / "limits", clock)
    limits = DomainLimits(token_requests_per_minute=1)
    tokens = [f"pat-{i}" for i in range(64)]
    for token in tokens:
        limiter.admit(caller(token_id=token), limits)
    refused = 0
    for token in tokens:
        try:
            limiter.admit(caller(token_id=token), limits)
        except LimitExceeded:
            refused += 1
    assert refused == 64  # every token's bucket is kept while it refills
    # A 65th token while all 64 are refilling takes over one (that one's debt is forgiven:
    # the documented leniency) rather than failing.
    limiter.admit(caller(token_id="pat-new"), limits)
    with pytest.raises(LimitExceeded):
        limiter.admit(caller(token_id="pat-new"), limits)
    # Once refilled, buckets are as good as absent: 64 new tokens fit, each limited.
    clock.now += 60
    for i in range(64):
        limiter.admit(caller(token_id=f"later-{i}"), limits)
        with pytest.raises(LimitExceeded):
            limiter.admit(caller(token_id=f"later-{i}"), limits)


_HAMMER = """
import sys, time
from proxy.directory import Caller, DomainLimits
from proxy.gateway.ratelimit import LimitExceeded, RateLimiter, SharedBuckets
limiter = RateLimiter(lambda: 1000.0, store=SharedBuckets(sys.argv[1]))  # no refill
who = Caller(user_id="u", domain_id="d", domain_alias="d", actions=frozenset({"inference"}),
             token_kind="pat", token_id="t", models=None)
limits = DomainLimits(requests_per_minute=int(sys.argv[2]))
admitted = 0
time.sleep(max(0.0, float(sys.argv[4]) - time.time()))  # start together
for _ in range(int(sys.argv[3])):
    try:
        limiter.admit(who, limits)
        admitted += 1
    except LimitExceeded:
        pass
print(admitted)
"""


def test_processes_sharing_the_file_never_admit_more_than_the_limit(tmp_path: Path) -> None:
    """Real processes at once: the file lock keeps read-modify-write whole (lost updates
    would admit more)."""
    SharedBuckets.create(tmp_path / "limits")
    limit, attempts = 30_000, 20_000
    root = Path(__file__).resolve().parents[2]
    start_at = time.time() + 2  # after every interpreter has started
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                _HAMMER,
                str(tmp_path / "limits"),
                str(limit),
                str(attempts),
                str(start_at),
            ],
            cwd=root,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    admitted = [int(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    # Their clocks stand still (no refill): exactly the limit, whoever took it.
    assert sum(admitted) == limit, admitted


def test_a_file_that_is_not_a_limits_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "short").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match="not a rate-limit file"):
        SharedBuckets(tmp_path / "short")


def test_requests_per_minute_refill_over_time() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = DomainLimits(requests_per_minute=6)  # one every 10 s
    for _ in range(6):
        limiter.admit(caller(), limits)
    with pytest.raises(LimitExceeded) as refused:
        limiter.admit(caller(), limits)
    assert refused.value.which == "domain_requests" and refused.value.retry_after == 10
    clock.now += 9.5
    with pytest.raises(LimitExceeded) as refused:
        limiter.admit(caller(), limits)
    assert refused.value.retry_after == 1
    clock.now += 0.5
    limiter.admit(caller(), limits)


def test_token_limits_are_per_token_and_domain_limits_shared() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = DomainLimits(requests_per_minute=5, token_requests_per_minute=2)
    limiter.admit(caller(token_id="a"), limits)
    limiter.admit(caller(token_id="a"), limits)
    with pytest.raises(LimitExceeded) as refused:
        limiter.admit(caller(token_id="a"), limits)
    assert refused.value.which == "token_requests"
    limiter.admit(caller(token_id="b"), limits)  # another PAT has its own budget
    limiter.admit(caller(user="u2", token_id=None), limits)  # a session token: per user
    limiter.admit(caller(user="u3", token_id=None), limits)
    with pytest.raises(LimitExceeded) as refused:
        limiter.admit(caller(user="u4", token_id=None), limits)
    assert refused.value.which == "domain_requests"  # 5 used in the domain
    limiter.admit(caller(token_id="c", domain="d2"), limits)  # another domain


def test_a_refused_request_takes_nothing() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = DomainLimits(requests_per_minute=10, token_requests_per_minute=1)
    limiter.admit(caller(token_id="a"), limits)
    for _ in range(5):
        with pytest.raises(LimitExceeded):
            limiter.admit(caller(token_id="a"), limits)
    for i in range(9):  # the domain still has its nine
        limiter.admit(caller(token_id=f"t{i}"), limits)


def test_tokens_per_minute_charge_after_the_fact() -> None:
    clock = Clock()
    limiter = RateLimiter(clock)
    limits = DomainLimits(tokens_per_minute=60, token_tokens_per_minute=1000)
    limiter.admit(caller(), limits)
    limiter.charge(caller(), limits, 90)  # over budget: the balance goes negative
    with pytest.raises(LimitExceeded) as refused:
        limiter.admit(caller(), limits)
    assert refused.value.which == "domain_tokens"
    assert refused.value.retry_after == 30  # 30 tokens owed at 1 per second
    clock.now += 30
    limiter.admit(caller(), limits)


def test_zero_means_nothing_is_allowed() -> None:
    with pytest.raises(LimitExceeded):
        RateLimiter(Clock()).admit(caller(), DomainLimits(requests_per_minute=0))


def test_limits_through_the_proxy(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, fake_openai: FakeOpenAI
) -> None:
    dom = one_domain(directory, agents)
    directory.set_limits(
        dom.alias, DomainLimits(requests_per_minute=100, token_requests_per_minute=2)
    )
    other_pat = directory.pat(dom.alias, "user-acme")
    server = proxy()
    assert server.chat(dom.alias, dom.pat).status == 200
    assert server.chat(dom.alias, dom.pat).status == 200
    refused = server.chat(dom.alias, dom.pat)
    assert refused.status == 429
    assert refused.json()["error"]["type"] == "rate_limit_error"
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.header("Retry-After") or "0") <= 30
    assert server.chat(dom.alias, other_pat).status == 200  # its own budget
    assert len(fake_openai.requests_to("/v1/chat/completions")) == 3
    server.flush()
    assert [r.status for r in directory.audits if r.event == "request"] == [200, 200, 429, 200]


def test_token_budget_through_the_proxy(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory
) -> None:
    dom = one_domain(directory, agents)
    # Each answer of the fake backend reports 11 + 4 = 15 tokens.
    directory.set_limits(dom.alias, DomainLimits(tokens_per_minute=20))
    server = proxy()
    assert server.chat(dom.alias, dom.pat).status == 200  # 20 -> 5
    assert server.chat(dom.alias, dom.pat).status == 200  # 5 -> -10
    refused = server.chat(dom.alias, dom.pat)
    assert refused.status == 429
    assert int(refused.header("Retry-After") or "0") == 30  # 10 tokens owed at 1/3 per second
