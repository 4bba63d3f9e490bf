"""scripts/build-model-volume: deterministic EROFS + dm-verity, verified by veritysetup."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.measure import combined_digest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "build-model-volume"
VERITYSETUP = shutil.which("veritysetup") or "/usr/sbin/veritysetup"

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.erofs") is None or not Path(VERITYSETUP).exists(),
    reason="erofs-utils / cryptsetup-bin not installed (scripts/setup-image-tools installs them)",
)


def make_model(directory: Path, weights: bytes) -> str:
    directory.mkdir(parents=True)
    (directory / "model.gguf").write_bytes(weights)
    (directory / "sub").mkdir()
    (directory / "sub" / "tokenizer.json").write_text('{"v": 1}')
    files = {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        for name in ("model.gguf", "sub/tokenizer.json")
    }
    digest = combined_digest(files)
    manifest = {"format": "cube-model/1", "files": files, "digest": digest}
    (directory / "cube-model.json").write_text(json.dumps(manifest))
    return digest


def build(model: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(model), str(out)],
        capture_output=True,
        text=True,
        check=False,
    )


def test_volume_is_deterministic_and_verifies(tmp_path: Path) -> None:
    weights = bytes(range(256)) * 1000
    digest = make_model(tmp_path / "a", weights)
    make_model(tmp_path / "b", weights)  # a second copy, created at another time
    first, second = (
        build(tmp_path / "a", tmp_path / "out1"),
        build(tmp_path / "b", tmp_path / "out2"),
    )
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    for name in ("model.img", "model.verity", "model-volume.json"):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    info = json.loads((tmp_path / "out1" / "model-volume.json").read_text())
    assert info["model_digest"] == digest
    assert info["format"] == "erofs" and info["hash_algorithm"] == "sha256"
    assert first.stdout.strip() == info["root_hash"]
    img, tree = tmp_path / "out1" / "model.img", tmp_path / "out1" / "model.verity"
    assert info["data_blocks"] * 4096 == img.stat().st_size
    ok = subprocess.run(
        [VERITYSETUP, "verify", str(img), str(tree), info["root_hash"]], check=False
    )
    assert ok.returncode == 0
    # One flipped byte in the data: verification fails.
    corrupt = tmp_path / "corrupt.img"
    data = bytearray(img.read_bytes())
    data[len(data) // 2] ^= 0x01
    corrupt.write_bytes(bytes(data))
    bad = subprocess.run(
        [VERITYSETUP, "verify", str(corrupt), str(tree), info["root_hash"]],
        capture_output=True,
        check=False,
    )
    assert bad.returncode != 0


def test_model_that_does_not_verify_is_refused(tmp_path: Path) -> None:
    make_model(tmp_path / "m", b"weights")
    (tmp_path / "m" / "model.gguf").write_bytes(b"other weights")
    result = build(tmp_path / "m", tmp_path / "out")
    assert result.returncode != 0
    assert "does not verify" in result.stderr
    assert not (tmp_path / "out" / "model.img").exists()
