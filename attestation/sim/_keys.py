"""Deterministic keys for the simulator: EC from a DRBG scalar, RSA from DRBG-searched primes.

``cryptography`` cannot seed RSA key generation, so RSA primes are found here: a DRBG draws a
starting point (top two bits set, odd), a sieve of the small primes skips obvious composites,
and a base-2 Fermat test plus Miller-Rabin rounds with DRBG-chosen bases accept a prime. Pure
Python needs a few seconds per RSA-4096 key, so generated keys are cached:

- per process (a dict keyed by seed and label), and
- on disk, unless disabled: ``$CUBE_SIM_CACHE_DIR`` or ``$XDG_CACHE_HOME/cube-sim`` or
  ``~/.cache/cube-sim``; ``CUBE_SIM_CACHE_DIR=off`` disables it. A cache file stores only how
  far the prime search went from its DRBG starting point (no key material beyond what the public
  seed gives anyway). Loading recomputes the starting point from the seed and re-tests the
  result for primality, so a damaged file cannot yield a non-prime or a foreign key.

RSA-PSS signatures are computed here too, with a salt derived from the key and the message,
so that certificates (and the roots a verifier re-derives) are byte-identical across processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import tempfile
import threading
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from attestation.sim._drbg import HmacDrbg

__all__ = [
    "cache_dir",
    "ec_key",
    "rsa_key",
    "rsa_pss_sign",
]

_E = 65537
_SMALL_PRIMES_LIMIT = 1 << 16
_WINDOW = 8192
_MR_ROUNDS = 5
_CACHE_VERSION = 1


def _small_primes(limit: int) -> list[int]:
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\0\0"
    for n in range(2, int(limit**0.5) + 1):
        if sieve[n]:
            sieve[n * n :: n] = bytes(len(range(n * n, limit, n)))
    return [n for n in range(3, limit) if sieve[n]]


_PRIMES = _small_primes(_SMALL_PRIMES_LIMIT)


def _miller_rabin(n: int, drbg: HmacDrbg, rounds: int) -> bool:
    d, r = n - 1, 0
    while d % 2 == 0:
        d //= 2
        r += 1
    for _ in range(rounds):
        a = 2 + drbg.below(n - 3)
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def _start(drbg: HmacDrbg, bits: int) -> int:
    # Top two bits set so that p*q has exactly 2*bits bits; odd.
    return drbg.integer(bits) | (3 << (bits - 2)) | 1


def _recheck_prime(n: int, drbg: HmacDrbg) -> bool:
    """Re-test a prime found earlier (a cache hit): cheaper than the search's full test, which
    already ran; this only guards against a damaged cache file."""
    if any(n % p == 0 for p in _PRIMES[:200]):
        return False
    if pow(2, n - 1, n) != 1:
        return False
    return (n - 1) % _E != 0 and _miller_rabin(n, drbg, 1)


def _search_prime(start: int, drbg: HmacDrbg) -> int:
    """The offset ``k`` of the first probable prime ``start + 2k`` (with gcd(e, p-1) = 1)."""
    base = 0
    while True:
        window = bytearray([1]) * _WINDOW
        first = start + 2 * base
        for p in _PRIMES:
            # first + 2k = 0 (mod p)  <=>  k = -first * 2^-1 (mod p)
            k = (-first * ((p + 1) // 2)) % p
            window[k::p] = bytes(len(range(k, _WINDOW, p)))
        for k in range(_WINDOW):
            if window[k]:
                candidate = first + 2 * k
                if (
                    pow(2, candidate - 1, candidate) == 1
                    and (candidate - 1) % _E != 0
                    and _miller_rabin(candidate, drbg, _MR_ROUNDS)
                ):
                    return base + k
        base += _WINDOW


def cache_dir() -> Path | None:
    """Where generated RSA keys are cached on disk (None: disabled)."""
    configured = os.environ.get("CUBE_SIM_CACHE_DIR")
    if configured is not None:
        if configured.strip().lower() in ("", "off", "0", "none", "false"):
            return None
        return Path(configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cube-sim"


def _cache_key(seed: bytes, label: str) -> str:
    return hashlib.sha256(b"cube-sim-rsa\0" + seed + b"\0" + label.encode()).hexdigest()[:40]


def _cache_file(seed: bytes, label: str, bits: int) -> Path | None:
    directory = cache_dir()
    if directory is None:
        return None
    return directory / f"rsa{bits}-{_cache_key(seed, label)}.json"


def _load_offsets(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("version") != _CACHE_VERSION:
            return None
        p_off, q_off = data["p"], data["q"]
        if not (isinstance(p_off, int) and isinstance(q_off, int)):
            return None
        if not (0 <= p_off < 1 << 24 and 0 <= q_off < 1 << 24):
            return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return p_off, q_off


def _store_offsets(path: Path | None, p_off: int, q_off: int) -> None:
    if path is None:
        return
    # The cache is an optimisation only: a read-only or full disk must not break the simulator.
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w") as handle:
            json.dump({"version": _CACHE_VERSION, "p": p_off, "q": q_off}, handle)
        os.replace(tmp, path)


# Prime-search offsets for the keys of DEFAULT_SEED (attestation.sim.DEFAULT_SEED), computed
# once with this module's own search, so that a fresh machine does not spend half a minute in
# pure-Python prime search for the simulator's default roots. Entries are re-tested like cache
# files; a wrong entry would be ignored and the search run.
_KNOWN_OFFSETS: dict[str, tuple[int, int]] = {
    "0d633f5425bc596870e1c0618dd7530c2aa2a210": (257, 2234),  # snp/Milan/ark
    "699bf9b912b5a9be45c35b3d8b613453399b3083": (1268, 1605),  # snp/Milan/ask
    "ac8aa5a0600d49f007b90a6707304a22a3c00018": (48, 911),  # snp/Milan/asvk
    "b680d21e2ef9e62c59e2b0ccc594ec004bafee3a": (1256, 919),  # snp/Genoa/ark
    "bd445f1320aaad2bfc5917844b9080c66911ddc8": (235, 1795),  # snp/Genoa/ask
    "7ec4443733f5085aa65e92a88d9a955c63e658a5": (380, 6),  # snp/Genoa/asvk
    "196146e052c007254e26f4c68240f20731a13b27": (106, 391),  # snp/Turin/ark
    "576b558659fe6c7c03a1bc7649d6e8b40f8d906d": (44, 520),  # snp/Turin/ask
    "bbc7382ce5c3e8338f7189e0e732393baa31e1d0": (1143, 539),  # snp/Turin/asvk
}

_RSA_CACHE: dict[tuple[bytes, str, int], rsa.RSAPrivateKey] = {}
_EC_CACHE: dict[tuple[bytes, str, str], ec.EllipticCurvePrivateKey] = {}
_LOCK = threading.Lock()


def rsa_key(seed: bytes, label: str, bits: int = 4096) -> rsa.RSAPrivateKey:
    """The RSA key (e = 65537) that ``seed`` and ``label`` determine."""
    key = (bytes(seed), label, bits)
    with _LOCK:
        cached = _RSA_CACHE.get(key)
        if cached is not None:
            return cached
        half = bits // 2
        drbg = HmacDrbg(seed, f"rsa{bits}/{label}".encode())
        p_start = _start(drbg, half)
        q_start = _start(drbg, half)
        test_drbg = HmacDrbg(seed, f"rsa{bits}/{label}/mr".encode())
        path = _cache_file(seed, label, bits)
        known = _KNOWN_OFFSETS.get(_cache_key(seed, label)) if bits == 4096 else None
        offsets = known if known is not None else _load_offsets(path)
        p = q = 0
        if offsets is not None:
            p, q = p_start + 2 * offsets[0], q_start + 2 * offsets[1]
            if not (_recheck_prime(p, test_drbg) and _recheck_prime(q, test_drbg)):
                offsets = None
        if offsets is None:
            p_off = _search_prime(p_start, test_drbg)
            q_off = _search_prime(q_start, test_drbg)
            p, q = p_start + 2 * p_off, q_start + 2 * q_off
            _store_offsets(path, p_off, q_off)
        if p == q or abs(p - q).bit_length() < half - 100:
            raise RuntimeError(f"simulator: degenerate RSA primes for {label}")  # 2^-1900
        phi = (p - 1) * (q - 1)
        d = pow(_E, -1, phi)
        private = rsa.RSAPrivateNumbers(
            p=p,
            q=q,
            d=d,
            dmp1=d % (p - 1),
            dmq1=d % (q - 1),
            iqmp=pow(q, -1, p),
            public_numbers=rsa.RSAPublicNumbers(_E, p * q),
        ).private_key(unsafe_skip_rsa_key_validation=True)
        _RSA_CACHE[key] = private
        return private


def ec_key(seed: bytes, label: str, curve: ec.EllipticCurve) -> ec.EllipticCurvePrivateKey:
    """The EC key that ``seed`` and ``label`` determine (scalar uniform in [1, n-1])."""
    orders = {
        "secp256r1": 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551,
        "secp384r1": int(
            "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf"
            "581a0db248b0a77aecec196accc52973",
            16,
        ),
    }
    key = (bytes(seed), label, curve.name)
    with _LOCK:
        cached = _EC_CACHE.get(key)
        if cached is None:
            order = orders[curve.name]
            scalar = 1 + HmacDrbg(seed, f"ec/{curve.name}/{label}".encode()).below(order - 1)
            cached = ec.derive_private_key(scalar, curve)
            _EC_CACHE[key] = cached
        return cached


def _mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return bytes(out[:length])


def rsa_pss_sign(
    key: rsa.RSAPrivateKey, message: bytes, *, hash_name: str = "sha384", salt_length: int = 48
) -> bytes:
    """RSASSA-PSS (RFC 8017 8.1.1, MGF1 with the same hash) with a deterministic salt."""
    numbers = key.private_numbers()
    n = numbers.public_numbers.n
    mod_bits = n.bit_length()
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    m_hash = hashlib.new(hash_name, message).digest()
    h_len = len(m_hash)
    if em_len < h_len + salt_length + 2:
        raise ValueError("RSA-PSS: key too small")
    salt_key = hashlib.sha384(
        b"cube-sim-pss-salt\0" + numbers.d.to_bytes(mod_bits // 8 + 1)
    ).digest()
    salt = hmac.new(salt_key, message, hashlib.sha384).digest()[:salt_length]
    digest = hashlib.new(hash_name, bytes(8) + m_hash + salt).digest()
    db = bytes(em_len - salt_length - h_len - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, _mgf1(digest, len(db), hash_name), strict=True))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    encoded = int.from_bytes(bytes(masked) + digest + b"\xbc", "big")
    # RSA private operation with the CRT.
    p, q = numbers.p, numbers.q
    s1 = pow(encoded, numbers.dmp1, p)
    s2 = pow(encoded, numbers.dmq1, q)
    h = (numbers.iqmp * (s1 - s2)) % p
    signature = s2 + h * q
    if pow(signature, numbers.public_numbers.e, n) != encoded:
        raise RuntimeError("RSA-PSS: CRT self-check failed")
    return signature.to_bytes((mod_bits + 7) // 8, "big")
