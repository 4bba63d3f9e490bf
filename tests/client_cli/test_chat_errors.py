"""``cube chat`` when the answer fails its checks while it streams (a sealed stream cut off or
tampered with on the way): a clear refusal with the failure class's exit code, never a
traceback, and never a silent success with half an answer."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from cube import chat
from cube_client.e2e import EnvelopeError


class _CutStream:
    """What the openai SDK yields over an attested transport whose stream broke off: two
    pieces, then the transport's error (the SDK passes it through unwrapped)."""

    def __iter__(self) -> Iterator[Any]:
        for text in ("Hel", "lo"):
            yield SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=text))])
        raise EnvelopeError(
            "the sealed stream ended without its end marker: the answer was cut off",
            code="e2e_truncated",
        )


def test_a_stream_cut_off_mid_answer_is_refused_with_its_exit_code(
    capsys: pytest.CaptureFixture[str],
) -> None:
    completions = SimpleNamespace(create=lambda **kwargs: _CutStream())
    client: Any = SimpleNamespace(chat=SimpleNamespace(completions=completions))
    with pytest.raises(SystemExit) as exited:
        chat._answer(client, "cube-tiny", [{"role": "user", "content": "hi"}])
    error = EnvelopeError("x", code="e2e_truncated")
    assert exited.value.code == error.exit_code != 0
    out, err = capsys.readouterr()
    assert out == "Hello\n"
    assert f"not accepted ({error.failure_class})" in err and "cut off" in err
