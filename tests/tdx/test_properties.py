"""Property tests: parsers fed arbitrary or mutated input raise only AttestationError."""

from __future__ import annotations

import contextlib
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from attestation import tdx
from attestation.errors import AttestationError, MalformedError
from tests import vectors

PHALA = vectors.vector("tdx-v4-phala-uptodate")
QUOTE = vectors.file_of(PHALA, "quote")
V5_QUOTE = vectors.file_of(vectors.vector("tdx-v5-go-tdx-guest"), "quote")
COLLATERAL_JSON = vectors.read(PHALA["files"]["collateral_phala"]["path"])
PCS = vectors.vector("tdx-v4-trustee-4")["files"]["collateral_pcs"]
TCB_BODY = vectors.read(PCS["tcb_info"]["path"])
QE_BODY = vectors.read(PCS["qe_identity"]["path"])
PCK_CRL = vectors.read(PCS["pck_crl"]["path"])

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _mutate(base: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    data = bytearray(base)
    for pos, value in edits:
        data[pos % len(data)] = value
    return bytes(data[:cut] if cut is not None else data)


_edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)
_cut = st.one_of(st.none(), st.integers(0, 9000))


@SETTINGS
@given(st.binary(max_size=6000))
def test_parse_quote_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        tdx.parse_quote(data)


@SETTINGS
@given(st.sampled_from([QUOTE, V5_QUOTE]), _edits, _cut)
def test_parse_quote_mutated(base: bytes, edits: list[tuple[int, int]], cut: int | None) -> None:
    try:
        quote = tdx.parse_quote(_mutate(base, edits, cut))
    except AttestationError:
        return
    assert len(quote.signed_data) in (632, 702)


@SETTINGS
@given(_edits)
def test_parse_quote_mutated_in_the_pck_chain(edits: list[tuple[int, int]]) -> None:
    start = QUOTE.index(b"-----BEGIN CERTIFICATE-----")
    end = QUOTE.rindex(b"-----END CERTIFICATE-----")
    span = end - start
    data = bytearray(QUOTE)
    for pos, value in edits:
        data[start + pos % span] = value
    with contextlib.suppress(AttestationError):
        tdx.parse_quote(bytes(data))


@SETTINGS
@given(st.binary(max_size=4000))
def test_collateral_from_json_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        tdx.Collateral.from_json(data)


@SETTINGS
@given(_edits, _cut)
def test_collateral_from_json_mutated(edits: list[tuple[int, int]], cut: int | None) -> None:
    with contextlib.suppress(AttestationError):
        tdx.Collateral.from_json(_mutate(COLLATERAL_JSON, edits, cut))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(list(json.loads(COLLATERAL_JSON))), _json_values)
def test_collateral_from_json_with_wrong_values(key: str, value: object) -> None:
    doc = json.loads(COLLATERAL_JSON)
    doc[key] = value
    try:
        tdx.Collateral.from_json(json.dumps(doc).encode())
    except MalformedError:
        return
    raise AssertionError(f"{key}={value!r} accepted")


@SETTINGS
@given(st.binary(max_size=3000), st.binary(max_size=3000))
def test_collateral_from_pcs_arbitrary_bytes(tcb: bytes, qe: bytes) -> None:
    with contextlib.suppress(AttestationError):
        tdx.Collateral.from_pcs(tcb, qe)


@SETTINGS
@given(
    st.sampled_from(["tcb", "qe", "crl"]),
    _edits,
    _cut,
)
def test_collateral_from_pcs_mutated(
    which: str, edits: list[tuple[int, int]], cut: int | None
) -> None:
    tcb, qe, crl = TCB_BODY, QE_BODY, PCK_CRL
    if which == "tcb":
        tcb = _mutate(tcb, edits, cut)
    elif which == "qe":
        qe = _mutate(qe, edits, cut)
    else:
        crl = _mutate(crl, edits, cut)
    with contextlib.suppress(AttestationError):
        tdx.Collateral.from_pcs(tcb, qe, pck_crl=crl)


@SETTINGS
@given(st.binary(max_size=3000))
def test_parse_crl_arbitrary_bytes(data: bytes) -> None:
    with contextlib.suppress(AttestationError):
        tdx.parse_crl(data)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([QUOTE, V5_QUOTE]), _edits)
def test_verify_mutated_quotes(base: bytes, edits: list[tuple[int, int]]) -> None:
    """Whatever parses must verify or fail with an AttestationError (never another exception)."""
    collateral = tdx.Collateral.from_json(COLLATERAL_JSON)
    try:
        quote = tdx.parse_quote(_mutate(base, edits, None))
        tdx.verify_quote(quote, collateral=collateral, now=vectors.time_inside(PHALA))
    except AttestationError:
        pass
