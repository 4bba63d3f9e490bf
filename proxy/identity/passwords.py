"""Password hashing with argon2id (memory-hard), always off the event loop.

Hashes are PHC strings (``$argon2id$v=19$m=...,t=...,p=...$salt$hash``) so parameters can be
raised later: a hash made with weaker parameters is re-hashed at the next successful login.
At most a few hashes run at once (each takes ``memory_kib`` of memory), so a burst of logins
cannot exhaust the machine's memory.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import unicodedata

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from proxy.identity.errors import Invalid

__all__ = ["MAX_PASSWORD_LENGTH", "MIN_PASSWORD_LENGTH", "PasswordHashing", "check_password_rules"]

MIN_PASSWORD_LENGTH = 12
MAX_PASSWORD_LENGTH = 1024


def check_password_rules(password: object) -> str:
    if not isinstance(password, str):
        raise Invalid("password must be a string")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise Invalid(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise Invalid(f"password must have at most {MAX_PASSWORD_LENGTH} characters")
    if not password.strip() or len(set(password)) == 1:
        raise Invalid("password must not be blank or one character repeated")
    return password


def normal_password(password: str) -> str:
    """NFKC: "é" typed composed or decomposed (input methods differ) is the same password."""
    return unicodedata.normalize("NFKC", password)


class PasswordHashing:
    """argon2id parameters. The defaults are OWASP's (64 MiB, 3 passes, 4 lanes)."""

    def __init__(
        self,
        *,
        memory_kib: int = 64 * 1024,
        time_cost: int = 3,
        parallelism: int = 4,
        concurrency: int = 4,
    ) -> None:
        if memory_kib < 8 * 1024 or time_cost < 1 or parallelism < 1:
            raise ValueError("argon2id parameters below the minimum (8 MiB, 1 pass, 1 lane)")
        self.memory_kib = memory_kib
        self.time_cost = time_cost
        self.parallelism = parallelism
        self._hasher = PasswordHasher(
            time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism, type=Type.ID
        )
        # A thread semaphore (taken inside the worker thread): bounds memory whatever the loop.
        self._slots = threading.BoundedSemaphore(concurrency)
        # Verified against when the user does not exist, so that answering "no such user"
        # costs the same time as "wrong password".
        self._dummy = self._hasher.hash(secrets.token_urlsafe(16))

    async def hash(self, password: str) -> str:
        return await asyncio.to_thread(self._hash_sync, password)

    async def verify(self, encoded: str | None, password: str) -> tuple[bool, bool]:
        """(matches, needs_rehash). ``encoded`` None = no such user: burns the same time."""
        return await asyncio.to_thread(self._verify_sync, encoded, password)

    def _hash_sync(self, password: str) -> str:
        with self._slots:
            return self._hasher.hash(normal_password(password))

    def _verify_sync(self, encoded: str | None, password: str) -> tuple[bool, bool]:
        target = encoded if encoded is not None else self._dummy
        normal = normal_password(password)
        # Hashes made before passwords were normalised hold the password as typed then: such a
        # match is re-hashed (normalised) at once.
        for candidate in (normal, password) if normal != password else (normal,):
            with self._slots:
                try:
                    self._hasher.verify(target, candidate)
                except (VerifyMismatchError, VerificationError, InvalidHashError):
                    continue
            if encoded is None:
                return False, False
            return True, candidate != normal or self._hasher.check_needs_rehash(encoded)
        return False, False
