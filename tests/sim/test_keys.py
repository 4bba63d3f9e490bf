"""Deterministic key derivation: DRBG, RSA prime search and cache, deterministic RSA-PSS, DER."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from attestation import _der
from attestation.sim import _derw, _keys
from attestation.sim._drbg import HmacDrbg, derive_bytes


def test_drbg_is_deterministic_and_label_separated() -> None:
    assert derive_bytes(b"seed", "a", 100) == derive_bytes(b"seed", "a", 100)
    assert derive_bytes(b"seed", "a", 32) != derive_bytes(b"seed", "b", 32)
    assert derive_bytes(b"seed", "a", 32) != derive_bytes(b"seed2", "a", 32)
    drbg = HmacDrbg(b"seed", b"x")
    first, second = drbg.generate(32), drbg.generate(32)
    assert first != second
    values = {HmacDrbg(b"s", bytes([i])).below(10) for i in range(200)}
    assert values == set(range(10))
    with pytest.raises(ValueError):
        drbg.below(0)


def test_small_rsa_keys_are_valid_and_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUBE_SIM_CACHE_DIR", "off")
    key = _keys.rsa_key(b"test", "small", 1024)
    again = _keys.rsa_key(b"test", "small", 1024)
    assert key is again  # process cache
    _keys._RSA_CACHE.clear()
    rebuilt = _keys.rsa_key(b"test", "small", 1024)
    numbers = rebuilt.private_numbers()
    assert numbers == key.private_numbers()
    assert rebuilt.key_size == 1024
    # cryptography's own consistency checks (primality included) accept the key.
    validated = rsa.RSAPrivateNumbers(
        numbers.p,
        numbers.q,
        numbers.d,
        numbers.dmp1,
        numbers.dmq1,
        numbers.iqmp,
        numbers.public_numbers,
    ).private_key()
    assert validated.key_size == 1024
    assert _keys.rsa_key(b"test", "other", 1024).private_numbers() != numbers


def test_disk_cache_is_used_and_damage_is_ignored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUBE_SIM_CACHE_DIR", str(tmp_path))
    key = _keys.rsa_key(b"disk", "k", 1024)
    files = list(tmp_path.glob("rsa1024-*.json"))
    assert len(files) == 1
    offsets = json.loads(files[0].read_text())
    assert offsets["version"] == 1
    _keys._RSA_CACHE.clear()
    assert _keys.rsa_key(b"disk", "k", 1024).private_numbers() == key.private_numbers()
    # A damaged cache entry (offsets pointing at composites) is re-searched, not trusted.
    files[0].write_text(json.dumps({"version": 1, "p": offsets["p"] + 1, "q": offsets["q"]}))
    _keys._RSA_CACHE.clear()
    assert _keys.rsa_key(b"disk", "k", 1024).private_numbers() == key.private_numbers()
    files[0].write_text("not json")
    _keys._RSA_CACHE.clear()
    assert _keys.rsa_key(b"disk", "k", 1024).private_numbers() == key.private_numbers()


def test_cache_dir_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CUBE_SIM_CACHE_DIR", "off")
    assert _keys.cache_dir() is None
    monkeypatch.delenv("CUBE_SIM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _keys.cache_dir() == tmp_path / "cube-sim"


def test_default_seed_keys_need_no_search() -> None:
    assert len(_keys._KNOWN_OFFSETS) == 9  # ARK, ASK, ASVK of Milan, Genoa, Turin


def test_deterministic_rsa_pss() -> None:
    key = _keys.rsa_key(b"test", "small", 1024)
    signature = _keys.rsa_pss_sign(key, b"message", hash_name="sha384", salt_length=48)
    assert signature == _keys.rsa_pss_sign(key, b"message", hash_name="sha384", salt_length=48)
    assert signature != _keys.rsa_pss_sign(key, b"other", hash_name="sha384", salt_length=48)
    key.public_key().verify(
        signature,
        b"message",
        padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48),
        hashes.SHA384(),
    )


def test_ec_keys() -> None:
    a = _keys.ec_key(b"s", "x", ec.SECP384R1())
    assert a is _keys.ec_key(b"s", "x", ec.SECP384R1())
    assert a.private_numbers() != _keys.ec_key(b"s", "y", ec.SECP384R1()).private_numbers()
    assert _keys.ec_key(b"s", "x", ec.SECP256R1()).curve.name == "secp256r1"


@pytest.mark.parametrize("value", [0, 1, 127, 128, 255, 256, 0x10000, 2**64, 2**1024 + 5])
def test_der_integers_read_back(value: int) -> None:
    assert _der.parse(_derw.integer(value)).as_int() == value


@pytest.mark.parametrize("oid", ["1.2.840.113741.1.13.1.2.17", "2.5.29.19", "1.3.6.1.4.1.3704.1.4"])
def test_der_oids_read_back(oid: str) -> None:
    assert _der.parse(_derw.oid(oid)).as_oid() == oid


def test_der_lengths() -> None:
    for size in (0, 127, 128, 255, 256, 70000):
        node = _der.parse(_derw.octet_string(bytes(size)))
        assert len(node.as_octets()) == size
