# ruff: noqa: F811 - fixtures imported from tests.proxy.harness are test parameters
"""Model listings of a domain with several agents: each agent's list filtered to the models
the proxy routes to it, merged, in the same order every time (it used to be one agent's list,
the next agent's at the next call, naming models the proxy then refused)."""

from __future__ import annotations

import json

import pytest

from proxy.gateway.listing import merge
from tests.agent.backends import FakeOpenAI, OllamaStandIn, serving
from tests.proxy.fakes import FakeDirectory
from tests.proxy.harness import (  # noqa: F401 - fixtures
    Agents,
    ProxyFactory,
    agents,
    directory,
    fake_openai,
    ollama,
    ollama_domain,
    one_domain,
    proxy,
)

# "%73" is "s": a "%" in the request line sends the request to aiohttp's handlers rather than
# the fast path, so both front ends are covered.
PATHS = ["/acme/v1/models", "/acme/v1/model%73"]


@pytest.mark.parametrize("path", PATHS, ids=["fast-path", "aiohttp"])
def test_a_listing_merges_every_agents_models(
    directory: FakeDirectory,
    agents: Agents,
    proxy: ProxyFactory,
    fake_openai: FakeOpenAI,
    path: str,
) -> None:
    other = FakeOpenAI(models=("big-model", "unrouted-model"))
    with serving(other):
        dom = one_domain(directory, agents)
        second = agents.start(dom.alias, backend_url=other.url, model_name="big-model")
        directory.add_backend(
            dom.alias, second.url, backend_id="acme-agent-2", models=("big-model",)
        )
        server = proxy()
        seen = set()
        for _ in range(4):
            reply = server.get(path, token=dom.pat)
            assert reply.status == 200, reply.body
            seen.add(tuple(m["id"] for m in reply.json()["data"]))
            assert reply.header("X-Cube-Agent") == "acme-agent-1, acme-agent-2"
        # Both agents' models, never one the proxy would not route ("unrouted-model"), and
        # the same answer every time.
        assert seen == {("cube-tiny", "big-model")}
        # One agent down: the other's models are still listed.
        second.stop()
        reply = server.get(path, token=dom.pat)
        assert reply.status == 200
        assert [m["id"] for m in reply.json()["data"]] == ["cube-tiny"]


def test_merge_keeps_one_full_answer_byte_for_byte() -> None:
    body = b'{"object": "list",  "data": [{"id": "a"}, {"id": "b"}], "extra": 1}'
    assert merge("/v1/models", [(body, lambda name: True)]) == body
    filtered = merge("/v1/models", [(body, lambda name: name == "b")])
    assert filtered is not None
    assert json.loads(filtered) == {"object": "list", "data": [{"id": "b"}], "extra": 1}
    # Not a listing: relayed as it is (None), whatever else answered.
    assert merge("/api/tags", [(b"<html>", lambda name: True)]) is None
    both = merge(
        "/api/tags",
        [
            (b'{"models": [{"name": "x:latest"}, {"name": 7}]}', lambda name: True),
            (b'{"models": [{"name": "x:latest"}, {"name": "y:1b"}]}', lambda name: True),
        ],
    )
    assert both is not None
    assert [m["name"] for m in json.loads(both)["models"]] == ["x:latest", "y:1b"]


def test_ollama_tags_list_only_the_models_routed_to_the_agent(
    directory: FakeDirectory, agents: Agents, proxy: ProxyFactory, ollama: OllamaStandIn
) -> None:
    dom = ollama_domain(directory, agents, ollama, models=("llama3.2",))
    server = proxy()
    tags = server.get(f"/{dom.alias}/api/tags", token=dom.pat)
    assert tags.status == 200
    assert [m["name"] for m in json.loads(tags.body)["models"]] == ["llama3.2:latest"]
