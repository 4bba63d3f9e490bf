"""Model weights verification (the make-tiny-model manifest) and runtime measurement."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.measure import (
    MANIFEST,
    MeasurementError,
    RuntimeLog,
    combined_digest,
    event_data,
    measure_runtime,
    rtmr_note,
    verify_model_dir,
)
from attestation.errors import CollectionError
from tests.agent.conftest import ModelDir, tiny_model_module, write_model

TINY = tiny_model_module()


def test_verifies_a_model_and_agrees_with_make_tiny_model(model: ModelDir) -> None:
    measured = verify_model_dir(model.path, model.digest)
    assert measured.digest == model.digest
    # The generator's own verifier accepts the same directory with the same digest.
    assert TINY.verify(model.path)["digest"] == measured.digest
    assert set(measured.files) == {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "sub/extra.bin",
    }
    assert measured.total_bytes == sum(
        (model.path / name).stat().st_size for name in measured.files
    )
    expected = hashlib.sha256(
        "".join(f"{n}\0{measured.files[n]}\n" for n in sorted(measured.files)).encode()
    ).hexdigest()
    assert measured.digest == "sha256:" + expected


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.binary(min_size=32, max_size=32)))
def test_combined_digest_matches_the_generator(files: dict[str, bytes]) -> None:
    hexes = {name: value.hex() for name, value in files.items()}
    assert combined_digest(hexes) == TINY.combined_digest(hexes)


def test_pinned_digest_mismatch_is_refused(model: ModelDir) -> None:
    with pytest.raises(MeasurementError, match="model digest mismatch"):
        verify_model_dir(model.path, "sha256:" + "00" * 32)


def test_a_changed_weight_file_is_refused(model: ModelDir) -> None:
    weights = model.path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(MeasurementError, match=r"model\.safetensors .*does not match"):
        verify_model_dir(model.path, model.digest)


def test_an_extra_file_is_refused(model: ModelDir) -> None:
    (model.path / "modeling_evil.py").write_text("import os")
    with pytest.raises(MeasurementError, match=r"modeling_evil\.py"):
        verify_model_dir(model.path, model.digest)


@pytest.mark.parametrize("target", ["dir", "file", "dangling"])
def test_a_link_in_the_model_directory_is_refused(
    model: ModelDir, tmp_path: Path, target: str
) -> None:
    # A link to a directory is invisible to a walk that does not follow links, and a backend
    # would load what is behind it: the directory holds regular files only.
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "evil_plugin.py").write_text("import os")
    link = model.path / "custom_code"
    if target == "dir":
        link.symlink_to(outside, target_is_directory=True)
    elif target == "file":
        link.symlink_to(outside / "evil_plugin.py")
    else:
        link.symlink_to(tmp_path / "nothing-here")
    with pytest.raises(MeasurementError, match=r"custom_code.*not a regular file"):
        verify_model_dir(model.path, model.digest)


def test_a_missing_file_is_refused(model: ModelDir) -> None:
    (model.path / "sub" / "extra.bin").unlink()
    with pytest.raises(MeasurementError, match="missing"):
        verify_model_dir(model.path, model.digest)


def test_a_manifest_whose_digest_does_not_match_its_files_is_refused(model: ModelDir) -> None:
    path = model.path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["files"]["config.json"] = "00" * 32
    path.write_text(json.dumps(manifest))
    with pytest.raises(MeasurementError, match="inconsistent"):
        verify_model_dir(model.path, model.digest)


def test_a_rewritten_manifest_is_caught_by_the_pinned_digest(model: ModelDir) -> None:
    # Someone swaps a weight file and rewrites a self-consistent manifest: the pin catches it.
    (model.path / "model.safetensors").write_bytes(b"other weights")
    rewritten = write_model(model.path, {"model.safetensors": b"other weights"})
    assert rewritten.digest != model.digest
    with pytest.raises(MeasurementError, match="model digest mismatch"):
        verify_model_dir(model.path, model.digest)


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "a/./b", "a//b", MANIFEST])
def test_manifest_file_names_must_stay_inside(tmp_path: Path, name: str) -> None:
    files = {name: "00" * 32}
    manifest = {"format": "cube-model/1", "files": files, "digest": combined_digest(files)}
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MeasurementError, match="not allowed"):
        verify_model_dir(tmp_path, combined_digest(files))


@pytest.mark.parametrize(
    "manifest",
    [
        {"format": "cube-model/2", "files": {"a": "00" * 32}, "digest": "x"},
        {"format": "cube-model/1", "files": {}, "digest": "x"},
        {"format": "cube-model/1", "files": {"a": "XY"}, "digest": "x"},
        {"format": "cube-model/1", "files": {"a": "00" * 32}},
        {"format": "cube-model/1", "files": ["a"], "digest": "x"},
    ],
)
def test_malformed_manifests_are_refused(tmp_path: Path, manifest: dict[str, object]) -> None:
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(MeasurementError):
        verify_model_dir(tmp_path, "sha256:" + "00" * 32)


def test_missing_directory_or_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MeasurementError, match="does not exist"):
        verify_model_dir(tmp_path / "nope", "sha256:" + "00" * 32)
    with pytest.raises(MeasurementError, match="cannot read the model manifest"):
        verify_model_dir(tmp_path, "sha256:" + "00" * 32)


# -- runtime measurement ---------------------------------------------------------------------


class RecordingTpm:
    """Stands in for TpmQuoter.measure (the swtpm test in test_server does it for real)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[int, bytes]] = []
        self.fail = fail

    def measure(self, pcr: int, data: bytes) -> dict[str, bytes]:
        if self.fail:
            raise CollectionError("TPM PCR_Extend failed: TPM_RC_LOCALITY")
        self.calls.append((pcr, data))
        return {"sha256": hashlib.sha256(data).digest(), "sha1": hashlib.sha1(data).digest()}


def test_runtime_measurement_extends_model_then_config() -> None:
    tpm = RecordingTpm()
    model_digest, config_digest = "sha256:" + "11" * 32, "sha256:" + "22" * 32
    log = measure_runtime(tpm, 15, model_digest=model_digest, config_digest=config_digest)
    assert tpm.calls == [
        (15, f"cube-agent/1 model {model_digest}".encode()),
        (15, f"cube-agent/1 config {config_digest}".encode()),
    ]
    assert isinstance(log, RuntimeLog)
    assert [e.kind for e in log.events] == ["model", "config"]
    assert log.events[0].data == event_data("model", model_digest)
    assert log.to_json()[1]["digests"]["sha256"] == hashlib.sha256(tpm.calls[1][1]).hexdigest()


def test_runtime_measurement_failure_is_a_measurement_error() -> None:
    with pytest.raises(MeasurementError, match="PCR 15"):
        measure_runtime(RecordingTpm(fail=True), 15, model_digest="m", config_digest="c")


def test_rtmr_note_only_for_tdx() -> None:
    assert rtmr_note("tdx") is not None and "RTMR" in (rtmr_note("sim-tdx") or "")
    assert rtmr_note("sev-snp") is None and rtmr_note("vtpm") is None
