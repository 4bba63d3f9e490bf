"""cube._loop: the event loop the agent and the proxy run on (``--event-loop``)."""

from __future__ import annotations

import asyncio
import sys

import pytest
import uvloop

from agent.cli import main as agent_main
from cube._loop import LoopUnavailable, new_event_loop, run_on


async def _loop_class() -> str:
    return type(asyncio.get_running_loop()).__module__


@pytest.mark.parametrize(
    ("choice", "module"), [("asyncio", "asyncio"), ("uvloop", "uvloop"), ("auto", "uvloop")]
)
def test_each_choice_runs_on_its_loop(choice: str, module: str) -> None:
    seen: list[str] = []

    async def main() -> None:
        seen.append(await _loop_class())

    run_on(main(), choice)
    assert seen and seen[0].split(".")[0] == module
    loop = new_event_loop(choice)
    try:
        assert type(loop).__module__.split(".")[0] == module
    finally:
        loop.close()


def test_without_uvloop_auto_falls_back_and_uvloop_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # import uvloop now raises ImportError
    loop = new_event_loop("auto")
    try:
        assert not isinstance(loop, uvloop.Loop)
    finally:
        loop.close()
    ran: list[bool] = []

    async def main() -> None:
        ran.append(True)

    coro = main()
    with pytest.raises(LoopUnavailable, match="uvloop was asked for but is not installed"):
        run_on(coro, "uvloop")
    assert ran == [] and coro.cr_frame is None  # closed, not left un-awaited


def _agent_argv(event_loop: str) -> list[str]:
    return [
        "--model-dir", "/nonexistent", "--model-digest", "sha256:" + "ab" * 32,
        "--jwt-issuer", "https://issuer.test", "--jwt-audience", "d",
        "--jwks-file", "/nonexistent/jwks.json", "--event-loop", event_loop,
    ]  # fmt: skip


def test_the_agent_reports_a_missing_uvloop_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)
    assert agent_main(_agent_argv("uvloop"), environ={}) == 1
    assert "uvloop was asked for but is not installed" in capsys.readouterr().err


def test_an_unknown_event_loop_is_a_configuration_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert agent_main(_agent_argv("trio"), environ={}) == 2
    assert "event_loop must be one of auto, uvloop, asyncio" in capsys.readouterr().err
