"""Property tests: parsers and verifiers fed arbitrary bytes raise only AttestationError."""

from __future__ import annotations

import contextlib
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation._x509 import load_certificate
from attestation.azure import parse_hcl_report
from attestation.errors import AttestationError, MalformedError
from attestation.snp import REPORT_SIZE, SnpPolicy, parse_report, parse_vcek_extensions
from attestation.snp import verify_report as verify
from tests import vectors
from tests.snp._util import vcek_and_chain

_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
REPORTS = [
    vectors.file_of(vectors.vector(i), "report")
    for i in ("snp-milan-v2-go-sev-guest", "snp-milan-v3-oak", "snp-turin-v5-oak")
]
HCL = vectors.read("sev-snp/milan-v2-azure-trustee/hcl-report.bin")
GO_SEV = vectors.vector("snp-milan-v2-go-sev-guest")
VCEK, CHAIN = vcek_and_chain(GO_SEV)


def _mutate(base: bytes, edits: list[tuple[int, int]]) -> bytes:
    data = bytearray(base)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data)


_edits = st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=8)


@_SETTINGS
@given(st.binary(max_size=2 * REPORT_SIZE))
def test_parse_report_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        parse_report(data)


@_SETTINGS
@given(st.binary(min_size=REPORT_SIZE, max_size=REPORT_SIZE))
def test_parse_report_arbitrary_full_length(data: bytes) -> None:
    try:
        report = parse_report(data)
    except MalformedError:
        return
    # Whatever parses renders and re-serialises consistently.
    assert report.raw == data
    assert report.fields()["version"] in (2, 3, 5)


@_SETTINGS
@given(st.sampled_from(REPORTS), _edits)
def test_parse_report_mutated(base: bytes, edits: list[tuple[int, int]]) -> None:
    data = _mutate(base, edits)
    try:
        report = parse_report(data)
    except MalformedError:
        return
    report.fields()
    for tcb in report.tcbs().values():
        assert 0 <= tcb.raw < 1 << 64


@settings(max_examples=60, deadline=None)
@given(_edits)
def test_verify_mutated_report_only_attestation_errors(edits: list[tuple[int, int]]) -> None:
    data = _mutate(REPORTS[0], edits)
    try:
        verify(data, vcek=VCEK, cert_chain=CHAIN, now=vectors.time_inside(GO_SEV))
    except AttestationError:
        return
    assert data == REPORTS[0]  # any change to a signed or reserved byte is refused


@_SETTINGS
@given(st.binary(max_size=4096))
def test_parse_hcl_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        parse_hcl_report(data)


@_SETTINGS
@given(_edits)
def test_parse_hcl_mutated(edits: list[tuple[int, int]]) -> None:
    with contextlib.suppress(AttestationError):
        parse_hcl_report(_mutate(HCL, edits))


@_SETTINGS
@given(st.binary(max_size=1400))
def test_parse_hcl_arbitrary_runtime_data(runtime: bytes) -> None:
    head = bytearray(HCL[:0x4D4])
    struct.pack_into("<I", head, 8, 0x4D4 + len(runtime))
    struct.pack_into("<I", head, 0x4C0, 20 + len(runtime))
    struct.pack_into("<I", head, 0x4D0, len(runtime))
    with contextlib.suppress(AttestationError):
        parse_hcl_report(bytes(head) + runtime)


@_SETTINGS
@given(st.integers(0, len(VCEK) - 1), st.integers(1, 255))
def test_vcek_extensions_of_mutated_certificates(pos: int, xor: int) -> None:
    data = VCEK[:pos] + bytes([VCEK[pos] ^ xor]) + VCEK[pos + 1 :]
    try:
        parse_vcek_extensions(load_certificate(data))
        verify(REPORTS[0], vcek=data, now=vectors.time_inside(GO_SEV))
    except AttestationError:
        pass


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=12), inner),
        max_leaves=10,
    )
)
def test_policy_from_json_arbitrary(obj: object) -> None:
    with contextlib.suppress(AttestationError):
        SnpPolicy.from_json(obj)
