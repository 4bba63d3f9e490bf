"""``cube-policy/1``: strict reading, fail-closed defaults, and a lossless JSON round trip."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from attestation import snp
from attestation.errors import InvalidPolicyError, MalformedError, PolicyError
from attestation.policy import (
    DEFAULT_PLATFORMS,
    POLICY_FORMAT,
    REAL_PLATFORMS,
    SIMULATED_PLATFORMS,
    Policy,
    load_policy,
)
from tests import vectors

D32 = "sha256:" + "ab" * 32
H48 = "cd" * 48

#: Every key of every section, set to something other than its default.
FULL: dict[str, Any] = {
    "format": "cube-policy/1",
    "description": "everything set",
    "platforms": ["sev-snp", "tdx", "vtpm"],
    "allow_simulated": True,
    "max_evidence_age_seconds": 120,
    "max_clock_skew_seconds": 5,
    "model_digests": [D32, "sha256:" + "01" * 32],
    "config_digests": [D32],
    "agent_versions": ["0.1.0", "0.2.0"],
    "revoked_measurements": [H48],
    "require_tpm": True,
    "sev_snp": {
        "measurements": [H48, "ef" * 48],
        "host_data": "12" * 32,
        "min_tcb": {"bootloader": 3, "tee": 0, "snp": 8, "microcode": 115, "fmc": 1},
        "allow_debug": True,
        "allow_migration_agent": True,
        "vmpls": [0, 1],
        "products": ["Milan", "Genoa", "Turin"],
        "chip_ids": ["34" * 64],
        "allow_vlek": False,
        "family_ids": ["56" * 16],
        "image_ids": ["78" * 16],
        "id_key_digests": ["9a" * 48],
        "author_key_digests": ["bc" * 48],
        "min_guest_svn": 2,
        "allow_smt": False,
        "require_single_socket": True,
    },
    "tdx": {
        "mr_td": [H48],
        "mr_seam": [H48],
        "rtmr0": [H48],
        "rtmr1": [H48],
        "rtmr2": [H48],
        "rtmr3": [H48, "00" * 48],
        "td_attributes": "0000001000000000",
        "xfam": "e702060000000000",
        "allow_debug": True,
        "accepted_tcb_statuses": ["UpToDate", "SWHardeningNeeded", "OutOfDate"],
        "require_collateral": False,
    },
    "vtpm": {
        "pcrs": {"sha256": {"0": "11" * 32, "7": ["22" * 32, "33" * 32]}, "sha1": {"4": "44" * 20}},
        "require_event_log": True,
    },
}


def with_change(path: str, value: object) -> dict[str, Any]:
    """FULL with ``path`` (dotted) set to ``value``."""
    doc = copy.deepcopy(FULL)
    *parents, last = path.split(".")
    target = doc
    for key in parents:
        target = target[key]
    target[last] = value
    return doc


def test_full_policy_reads() -> None:
    policy = Policy.from_json(FULL)
    assert policy.platforms == frozenset(REAL_PLATFORMS)
    assert policy.allow_simulated and policy.require_tpm
    assert policy.max_evidence_age_seconds == 120
    assert policy.max_clock_skew_seconds == 5
    assert policy.model_digests == frozenset(FULL["model_digests"])
    assert policy.agent_versions == frozenset({"0.1.0", "0.2.0"})
    assert policy.revoked_measurements == frozenset({bytes.fromhex(H48)})
    assert policy.sev_snp.measurements == (bytes.fromhex(H48), bytes.fromhex("ef" * 48))
    assert policy.sev_snp.min_tcb.microcode == 115
    assert policy.sev_snp.vmpls == (0, 1)
    assert not policy.sev_snp.allow_vlek
    assert policy.tdx.accepted_tcb_statuses == ("UpToDate", "SWHardeningNeeded", "OutOfDate")
    assert not policy.tdx.require_collateral
    assert policy.vtpm.pcrs["sha256"][7] == (bytes.fromhex("22" * 32), bytes.fromhex("33" * 32))
    assert policy.vtpm.require_event_log
    assert policy.description == "everything set"


# -- strictness ----------------------------------------------------------------------------------

UNKNOWN_KEYS = [
    "surprise",
    "sev_snp.surprise",
    "sev_snp.min_tcb.surprise",
    "tdx.surprise",
    "vtpm.surprise",
]


@pytest.mark.parametrize("path", UNKNOWN_KEYS)
def test_unknown_keys_everywhere(path: str) -> None:
    with pytest.raises(InvalidPolicyError, match="surprise"):
        Policy.from_json(with_change(path, True))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        # format
        ("format", "cube-policy/2"),
        ("format", "cube-policy/1 "),
        ("format", "CUBE-POLICY/1"),
        ("format", 1),
        # platforms
        ("platforms", ["sev-snp", "sgx"]),
        ("platforms", "sev-snp"),
        ("platforms", [1]),
        # digests
        ("model_digests", ["ab" * 32]),
        ("model_digests", ["sha256:" + "ab" * 31]),
        ("model_digests", ["sha256:" + "ab" * 33]),
        ("model_digests", ["sha256:" + "zz" * 32]),
        ("model_digests", ["sha384:" + "ab" * 48]),
        ("model_digests", ["SHA256:" + "ab" * 32]),
        ("model_digests", "sha256:" + "ab" * 32),
        # 64 characters, but not 64 hex digits: bytes.fromhex would skip the whitespace
        ("model_digests", ["sha256:" + "ab" * 31 + "  "]),
        ("model_digests", ["sha256:" + "ab" * 30 + " ab "]),
        ("config_digests", ["sha256:" + " " + "ab" * 31 + "\t"]),
        ("config_digests", ["sha256:"]),
        ("config_digests", [1]),
        ("agent_versions", "0.1.0"),
        # hex lengths
        ("revoked_measurements", ["ab" * 47]),
        ("revoked_measurements", ["ab" * 49]),
        ("revoked_measurements", ["abc"]),
        ("revoked_measurements", "ab" * 48),
        ("sev_snp.measurements", ["ab" * 32]),
        ("sev_snp.measurements", []),
        ("sev_snp.host_data", "ab" * 48),
        ("sev_snp.chip_ids", ["ab" * 8]),
        ("sev_snp.family_ids", ["ab" * 32]),
        ("sev_snp.id_key_digests", ["ab" * 32]),
        ("tdx.mr_td", ["ab" * 32]),
        ("tdx.rtmr2", ["ab" * 64]),
        ("tdx.td_attributes", "00" * 4),
        ("tdx.xfam", "00" * 16),
        ("vtpm.pcrs", {"sha256": {"0": "ab" * 20}}),
        ("vtpm.pcrs", {"sha1": {"0": "ab" * 32}}),
        ("vtpm.pcrs", {"md5": {"0": "ab" * 16}}),
        ("vtpm.pcrs", {"sha256": {"x": "ab" * 32}}),
        ("vtpm.pcrs", {"sha256": {"32": "ab" * 32}}),
        ("vtpm.pcrs", {"sha256": {"0": []}}),
        ("vtpm.pcrs", ["ab" * 32]),
        # bool where an int is expected, and out-of-range ints
        ("max_evidence_age_seconds", True),
        ("max_evidence_age_seconds", 0),
        ("max_evidence_age_seconds", -5),
        ("max_evidence_age_seconds", 1.5),
        ("max_evidence_age_seconds", "300"),
        ("max_clock_skew_seconds", False),
        ("max_clock_skew_seconds", -1),
        ("sev_snp.min_tcb", {"snp": True}),
        ("sev_snp.min_tcb", {"microcode": 256}),
        ("sev_snp.min_tcb", {"tee": -1}),
        ("sev_snp.vmpls", [True]),
        ("sev_snp.vmpls", [4]),
        ("sev_snp.vmpls", []),
        ("sev_snp.min_guest_svn", True),
        ("sev_snp.products", ["Bergamo"]),
        # times that would not be representable (a datetime or a float overflows)
        ("max_evidence_age_seconds", 10**400),
        ("max_evidence_age_seconds", 366 * 86400 + 1),
        ("max_clock_skew_seconds", 86401),
        # int (or string) where a bool is expected
        ("allow_simulated", 1),
        ("allow_simulated", "false"),
        ("require_tpm", 0),
        ("sev_snp.allow_debug", 1),
        ("sev_snp.allow_vlek", "yes"),
        ("tdx.allow_debug", 0),
        ("tdx.require_collateral", "true"),
        ("vtpm.require_event_log", 1),
        # TDX statuses that can never be accepted
        ("tdx.accepted_tcb_statuses", ["TcbNotSupported"]),
        ("tdx.accepted_tcb_statuses", ["Revoked"]),
        ("tdx.accepted_tcb_statuses", ["uptodate"]),
        ("tdx.accepted_tcb_statuses", []),
        # sections of the wrong type
        ("sev_snp", []),
        ("tdx", "strict"),
        ("vtpm", 1),
        ("description", 1),
        # null is not "absent": it would silently switch checks off
        ("model_digests", None),
        ("platforms", None),
        ("allow_simulated", None),
        ("tdx", None),
        ("sev_snp.host_data", None),
        ("tdx.mr_td", None),
        ("tdx.rtmr1", None),
        ("tdx.accepted_tcb_statuses", None),
        ("vtpm.pcrs", None),
    ],
)
def test_invalid_values(path: str, value: object) -> None:
    with pytest.raises(InvalidPolicyError):
        Policy.from_json(with_change(path, value))


@pytest.mark.parametrize("obj", [None, [], "cube-policy/1", 1, {}, {"platforms": ["tdx"]}])
def test_not_a_policy_object(obj: object) -> None:
    with pytest.raises(InvalidPolicyError):
        Policy.from_json(obj)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"[]",
        b'{"format": "cube-policy/1", "format": "cube-policy/1"}',
        b'{"format": "cube-policy/1", "max_evidence_age_seconds": NaN}',
        b'{"format": "cube-policy/1", "max_evidence_age_seconds": Infinity}',
        b'\xff{"format": "cube-policy/1"}',
        b'{"format": "cube-policy/1", "tdx": {"allow_debug": false, "allow_debug": true}}',
    ],
)
def test_load_policy_refuses_bad_json(data: bytes) -> None:
    with pytest.raises(InvalidPolicyError):
        load_policy(data)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("description", "policy \ud800"),
        ("agent_versions", ["0.1.0", "\udfff"]),
        ("sev_snp.products", ["Milan\ud800"]),
    ],
)
def test_lone_surrogates_are_refused_and_named(path: str, value: object) -> None:
    # Valid JSON ("\ud800" escaped) but no text: storing or printing the policy would fail.
    doc = with_change(path, value)
    data = json.dumps(doc).encode()  # ASCII, with the surrogate escaped
    for read in (lambda: load_policy(data), lambda: Policy.from_json(doc)):
        with pytest.raises(InvalidPolicyError, match=f"{path}.*lone UTF-16 surrogate"):
            read()


def test_load_policy_from_files(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(FULL))
    assert load_policy(path) == load_policy(str(path)) == Policy.from_json(FULL)
    with pytest.raises(InvalidPolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.json")
    with pytest.raises(InvalidPolicyError):
        load_policy(tmp_path)  # a directory


def test_invalid_policy_is_a_malformed_input() -> None:
    # The CLI maps it to exit 3, like any malformed input.
    assert issubclass(InvalidPolicyError, MalformedError)
    assert InvalidPolicyError("x").exit_code == 3


def test_digests_are_normalised_to_lowercase() -> None:
    policy = Policy.from_json(with_change("model_digests", ["sha256:" + "AB" * 32]))
    assert policy.model_digests == frozenset({"sha256:" + "ab" * 32})


# -- defaults ------------------------------------------------------------------------------------


def test_defaults_are_the_minimal_document() -> None:
    assert Policy() == Policy.from_json({"format": POLICY_FORMAT})
    assert Policy() == load_policy(b'{"format": "cube-policy/1"}')


def test_default_refuses_simulated_and_vtpm_only() -> None:
    policy = Policy()
    assert not policy.allow_simulated
    assert policy.platforms == frozenset(DEFAULT_PLATFORMS) == frozenset({"sev-snp", "tdx"})
    for platform in SIMULATED_PLATFORMS:
        assert not policy.accepts_platform(platform)
        # Listing a simulated platform is not enough: allow_simulated decides.
        listed = Policy.from_json({"format": POLICY_FORMAT, "platforms": [platform]})
        assert not listed.accepts_platform(platform)
    assert policy.accepts_platform("sev-snp") and policy.accepts_platform("tdx")
    assert not policy.accepts_platform("vtpm")
    assert not policy.accepts_platform("sgx")
    assert not policy.accepts_platform("")
    simulated = policy.with_simulated()
    assert simulated.allow_simulated and simulated.accepts_platform("sim-tdx")
    assert not simulated.with_simulated(False).accepts_platform("sim-tdx")


def test_default_sections_fail_closed() -> None:
    policy = Policy()
    assert policy.tdx.accepted_tcb_statuses == ("UpToDate",)
    assert policy.tdx.require_collateral
    assert not policy.tdx.allow_debug
    assert not policy.sev_snp.allow_debug
    assert not policy.sev_snp.allow_migration_agent
    assert not policy.require_tpm
    assert policy.max_evidence_age_seconds == 300
    assert policy.max_clock_skew_seconds == 60
    # Reference values are "not checked" only while absent.
    assert policy.model_digests is None and policy.config_digests is None
    assert policy.sev_snp.measurements is None and policy.tdx.mr_td is None
    assert policy.revoked_measurements == frozenset()


def test_default_snp_policy_refuses_a_debug_guest() -> None:
    v = vectors.vector("snp-milan-v2-go-sev-guest")  # guest policy 0xb0000: DEBUG set
    verified = snp.verify_report(
        snp.parse_report(vectors.file_of(v, "report")),
        vcek=vectors.file_of(v, "vcek"),
        now=vectors.time_inside(v),
    )
    with pytest.raises(PolicyError):
        snp.validate_report(verified, Policy().sev_snp)
    snp.validate_report(verified, snp.SnpPolicy(allow_debug=True))


def test_explicit_values_equal_to_defaults_are_accepted() -> None:
    explicit = {
        "format": POLICY_FORMAT,
        "platforms": ["sev-snp", "tdx"],
        "allow_simulated": False,
        "max_evidence_age_seconds": 300,
        "max_clock_skew_seconds": 60,
        "require_tpm": False,
        "revoked_measurements": [],
        "sev_snp": {},
        "tdx": {},
        "vtpm": {},
    }
    assert Policy.from_json(explicit) == Policy()


# -- round trip ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "doc",
    [
        {"format": POLICY_FORMAT},
        FULL,
        with_change("platforms", ["tdx"]),
        with_change("max_clock_skew_seconds", 0),
        with_change("vtpm", {}),
    ],
    ids=["default", "full", "tdx-only", "no-skew", "empty-vtpm"],
)
def test_round_trip(doc: dict[str, Any]) -> None:
    policy = Policy.from_json(doc)
    encoded = policy.to_json()
    assert json.loads(json.dumps(encoded)) == encoded  # plain JSON
    assert Policy.from_json(encoded) == policy
    assert Policy.from_json(encoded).to_json() == encoded
    assert load_policy(policy.dumps().encode()) == policy


def test_to_json_writes_every_general_field() -> None:
    encoded = Policy.from_json(FULL).to_json()
    for key, value in FULL.items():
        if key in ("sev_snp", "tdx", "vtpm"):
            continue
        if isinstance(value, list):
            written = encoded[key]
            assert isinstance(written, list)
            assert sorted(written) == sorted(value), key
        else:
            assert encoded[key] == value, key


# -- property ------------------------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
KEYS = [k for k in FULL if k != "format"]


@settings(max_examples=300, deadline=None)
@given(key=st.sampled_from(KEYS), value=JSON)
def test_any_value_is_read_or_refused_cleanly(key: str, value: object) -> None:
    try:
        policy = Policy.from_json(with_change(key, value))
    except InvalidPolicyError:
        return
    assert Policy.from_json(policy.to_json()) == policy


@settings(max_examples=200, deadline=None)
@given(
    section=st.sampled_from(["sev_snp", "tdx", "vtpm"]),
    key=st.text(min_size=1, max_size=20),
    value=JSON,
)
def test_section_values_are_read_or_refused_cleanly(section: str, key: str, value: object) -> None:
    doc = copy.deepcopy(FULL)
    doc[section][key] = value
    try:
        policy = Policy.from_json(doc)
    except InvalidPolicyError:
        return
    assert Policy.from_json(policy.to_json()) == policy
