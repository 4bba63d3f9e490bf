"""The agent's checks on sealed requests (agent.e2e) that test_agent_e2e.py leaves open: the sealed
method is bound like the path, a ``Cube-E2E-Model`` header is refused when the sealed body names no
model, the HTTP status of a sealed error is the sealed one, and the replay cache remembers a
request for as long as its issue time stays inside the window — also when the client's clock is
ahead of the agent's."""

from __future__ import annotations

import json

import pytest

from agent.e2e import ReplayCache
from cube_client import e2e
from cube_client.e2e import EnvelopeError
from tests.agent.backends import FakeOpenAI
from tests.agent.tokens import TokenIssuer
from tests.client.conftest import PROMPT
from tests.client.servers import InProcessAgent
from tests.client.test_agent_e2e import CHAT, body, expect_refusal, headers, hpke_key, post


@pytest.mark.parametrize("method", ["GET", "PUT"])
def test_a_request_sealed_for_another_method_is_400(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI, method: str
) -> None:
    envelope, _ = e2e.seal_request(
        body(), hpke_key(agent), method=method, path=CHAT, model="cube-tiny"
    )
    expect_refusal(
        agent, fake_openai, post(agent, envelope, headers(issuer)), 400, "e2e_wrong_target"
    )


def test_a_model_header_for_a_body_without_model_is_400(
    agent: InProcessAgent, issuer: TokenIssuer, fake_openai: FakeOpenAI
) -> None:
    # The proxy routes, scopes and meters by the header: it must not name a model the sealed
    # body does not ask for (the backend would pick its own default).
    plain = json.dumps({"messages": [{"role": "user", "content": PROMPT}]}).encode()
    envelope, _ = e2e.seal_request(plain, hpke_key(agent), method="POST", path=CHAT, model=None)
    expect_refusal(
        agent,
        fake_openai,
        post(agent, envelope, headers(issuer, "cube-tiny")),
        400,
        "e2e_model_mismatch",
    )


def test_a_sealed_errors_status_is_sealed_with_it(
    agent: InProcessAgent, issuer: TokenIssuer
) -> None:
    envelope, meta = e2e.seal_request(
        body(model="no-such-model"),
        hpke_key(agent),
        method="POST",
        path=CHAT,
        model="no-such-model",
    )
    reply = post(agent, envelope, headers(issuer, "no-such-model"))
    assert reply.status == 404
    plain, _ = e2e.open_whole(meta, reply.data, reply.status)  # the status the agent sealed
    assert json.loads(plain)["error"]
    with pytest.raises(EnvelopeError) as info:
        e2e.open_whole(meta, reply.data, 200)
    assert info.value.code == "e2e_status_mismatch"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("skew", [300, 150, 0, -150])
def test_a_replay_is_refused_while_its_issue_time_is_in_the_window(skew: int) -> None:
    """The client's clock may be up to the window ahead: a request issued "in the future" stays
    replayable until ``issued_at + window``, so the cache must remember it that long (the
    documented ``2 * window`` after arrival), not just ``window`` after arrival."""
    clock = Clock()
    cache = ReplayCache(window=300, clock=clock)
    issued = int(clock.now) + skew
    cache.admit(b"s" * 32, issued)
    for i, step in enumerate((100, 100, 100, 100, 100, 99)):
        clock.now += step
        if abs(clock.now - issued) > 300:
            break
        cache.admit(f"other-{i}".encode().ljust(32, b"."), int(clock.now))  # runs the eviction
        with pytest.raises(EnvelopeError) as info:
            cache.admit(b"s" * 32, issued)
        assert info.value.code == "e2e_replay"


def test_the_window_is_inclusive() -> None:
    clock = Clock()
    cache = ReplayCache(window=300, clock=clock)
    cache.admit(b"p" * 32, int(clock.now) - 300)
    cache.admit(b"f" * 32, int(clock.now) + 300)
