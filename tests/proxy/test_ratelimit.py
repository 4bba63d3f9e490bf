# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""Rate limits: requests and tokens per minute, per domain and per token, with 429 and
Retry-After. Unit tests on a fake clock, then through the proxy."""

from __future__ import annotations

import pytest

from proxy.directory import Caller, DomainLimits
from proxy.gateway.ratelimit import LimitExceeded, RateLimiter
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
