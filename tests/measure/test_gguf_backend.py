"""The tiny model as GGUF (scripts/make-tiny-gguf) and llama-server answering with it."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from agent.measure import verify_model_dir
from agent.server import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("CUBE_CACHE") or Path.home() / ".cache" / "cube")


@pytest.fixture(scope="module")
def gguf_dir() -> Path:
    vllm_python = CACHE / "vllm-venv" / "bin" / "python"
    if not vllm_python.exists():
        pytest.skip("needs the vLLM venv (scripts/setup-vllm) for torch/transformers")
    out = CACHE / "models" / "cube-tiny-gguf"
    subprocess.run([str(REPO / "scripts" / "make-tiny-gguf"), str(out)], check=True, timeout=1800)
    return out


def test_gguf_directory_is_an_agent_model_dir(gguf_dir: Path) -> None:
    manifest = json.loads((gguf_dir / "cube-model.json").read_text())
    assert sorted(manifest["files"]) == ["model.gguf"]
    measured = verify_model_dir(gguf_dir, manifest["digest"])
    assert measured.digest == manifest["digest"]
    head = (gguf_dir / "model.gguf").read_bytes()[: 1 << 20]
    assert head[:4] == b"GGUF"
    # The pre-tokenizer is named explicitly (the converter cannot identify a local tokenizer).
    assert b"tokenizer.ggml.pre" in head and b"gpt-2" in head


def test_llama_server_answers_a_chat_completion(gguf_dir: Path) -> None:
    binary = CACHE / "llama.cpp" / "0.3.36" / "bin" / "llama-server"
    if not binary.exists():
        pytest.skip("llama-server not built (scripts/build-llama-server)")
    port = free_port()
    args = [str(binary), "-m", str(gguf_dir / "model.gguf"), "--host", "127.0.0.1",
            "--port", str(port), "-t", "1", "--poll", "0", "-c", "512"]  # fmt: skip
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        body = json.dumps(
            {"model": "cube-tiny", "messages": [{"role": "user", "content": "Hello"}],
             "max_tokens": 8, "temperature": 0}
        ).encode()  # fmt: skip
        deadline = time.monotonic() + 60
        while True:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.5)
        assert answer["usage"]["completion_tokens"] == 8
        assert answer["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
