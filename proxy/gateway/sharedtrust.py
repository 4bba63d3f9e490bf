"""The attestation gate's outcomes, shared by the workers of one ``cube-proxy --workers N``.

Without this, each worker verified each agent itself: N evidence requests per agent at start
and at every refresh, enough to meet an agent's own evidence rate limit (HTTP 429) with many
workers. Now the workers take turns per agent and the first one's outcome serves the others:

- a worker about to verify an agent first takes that agent's lock (an ``flock`` on a file in
  the supervisor's private directory; the kernel releases it if the worker dies), then reads
  the agent's record: a verification another worker made that is not yet due for refresh is
  adopted (same pin, same evidence digest, same expiry), and so is a refusal or an outage not
  yet due for a retry. Only when there is none does the worker fetch and verify evidence
  itself, and it writes the outcome before it lets go of the lock;
- a record counts only under the policy it was made with (its SHA-256 is in the record): a
  policy change is verified afresh;
- a worker whose pinned connection was refused (the agent's certificate changed) removes a
  record naming that certificate, and never adopts one naming it, so the next verification,
  in any worker, asks the agent again.

What is shared is what the worker itself would hold in memory after a verification; the
directory is the supervisor's own (mode 0700) and lives as long as it does. Times are
``time.monotonic()`` values, which Linux keeps system-wide (``CLOCK_MONOTONIC``), so they
compare across the workers of one host. Records are written to a temporary file and renamed
into place: a reader sees a whole record or none. A record that cannot be read or parsed is
ignored (the worker verifies itself): sharing only ever saves work, it never replaces a check
the worker would otherwise make.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import aiohttp

from proxy.gateway.agents import Agent, AgentFailure, Trust

__all__ = ["SharedOutcome", "SharedTrust"]

_FORMAT: Final = 1
_POLL: Final = 0.01  # seconds between tries for a lock another worker holds


@dataclass(frozen=True)
class SharedOutcome:
    """What another worker found: a verification (``trust``) or a failure and until when it
    stands (``until``: the retry time of a refusal, the end of an outage)."""

    trust: Trust | None = None
    failure: AgentFailure | None = None
    until: float = 0.0


class SharedTrust:
    """Per-agent locks and records in ``directory`` (created by the supervisor)."""

    def __init__(
        self, directory: str | os.PathLike[str], *, lock_timeout: float, clock: Callable[[], float]
    ) -> None:
        self.directory = Path(directory)
        self.lock_timeout = lock_timeout
        self._clock = clock

    @staticmethod
    def create(directory: str | os.PathLike[str]) -> None:
        Path(directory).mkdir(mode=0o700, exist_ok=True)

    def _stem(self, agent: Agent) -> Path:
        # The agent of one domain (two domains naming one URL verify under two policies).
        key = "\0".join((agent.domain_id, agent.id, agent.spec.url)).encode()
        return self.directory / hashlib.sha256(key).hexdigest()

    # -- the lock ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def turn(self, agent: Agent) -> AsyncIterator[bool]:
        """Hold the agent's lock for the body; yields False (and no lock) when another worker
        kept it longer than ``lock_timeout`` (the caller then verifies on its own: a hung
        worker must not stop the others)."""
        try:
            fd = os.open(self._stem(agent).with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError:
            # The directory is gone or unwritable: verify on our own, as without sharing.
            yield False
            return
        try:
            deadline = self._clock() + self.lock_timeout
            held = False
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise
                    if self._clock() >= deadline:
                        break
                    await asyncio.sleep(_POLL)
                else:
                    held = True
                    break
            yield held
        finally:
            os.close(fd)  # releases the lock

    # -- records ----------------------------------------------------------------------------

    def read(
        self, agent: Agent, policy_sha256: bytes, *, refused_pin: bytes | None
    ) -> SharedOutcome | None:
        """The outcome another worker recorded for this agent under this policy, if it still
        stands now; None otherwise (verify)."""
        try:
            raw = json.loads(self._stem(agent).with_suffix(".json").read_bytes())
            if raw.get("format") != _FORMAT or raw.get("policy_sha256") != policy_sha256.hex():
                return None
            now = self._clock()
            state = raw["state"]
            if state == "verified":
                cert = bytes.fromhex(raw["cert_sha256"])
                if now >= float(raw["refresh_at"]) or cert == refused_pin:
                    return None
                return SharedOutcome(
                    trust=Trust(
                        cert_sha256=cert,
                        fingerprint=aiohttp.Fingerprint(cert),
                        evidence_digest=str(raw["evidence_digest"]),
                        policy_sha256=policy_sha256,
                        platform=str(raw["platform"]),
                        model=str(raw["model"]),
                        verified_at=float(raw["verified_at"]),
                        refresh_at=float(raw["refresh_at"]),
                        expires_at=float(raw["expires_at"]),
                    )
                )
            if state in ("refused", "down"):
                until = float(raw["until"])
                if now >= until:
                    return None
                return SharedOutcome(
                    failure=AgentFailure(
                        str(raw["message"]),
                        code=str(raw["code"]),
                        attestation=state == "refused",
                        policy_sha256=policy_sha256 if state == "refused" else None,
                    ),
                    until=until,
                )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass  # none, or not ours to trust: verify
        return None

    def record_trust(self, agent: Agent, trust: Trust) -> None:
        self._write(
            agent,
            {
                "policy_sha256": trust.policy_sha256.hex(),
                "state": "verified",
                "cert_sha256": trust.cert_sha256.hex(),
                "evidence_digest": trust.evidence_digest,
                "platform": trust.platform,
                "model": trust.model,
                "verified_at": trust.verified_at,
                "refresh_at": trust.refresh_at,
                "expires_at": trust.expires_at,
            },
        )

    def record_failure(
        self, agent: Agent, failure: AgentFailure, policy_sha256: bytes, until: float
    ) -> None:
        self._write(
            agent,
            {
                "policy_sha256": policy_sha256.hex(),
                "state": "refused" if failure.attestation else "down",
                "code": failure.code,
                "message": failure.message,
                "until": until,
            },
        )

    def discard(self, agent: Agent, cert_sha256: bytes) -> None:
        """Remove the agent's record if it names ``cert_sha256`` (that pin was refused)."""
        path = self._stem(agent).with_suffix(".json")
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            if json.loads(path.read_bytes()).get("cert_sha256") == cert_sha256.hex():
                path.unlink()

    def _write(self, agent: Agent, record: dict[str, object]) -> None:
        path = self._stem(agent).with_suffix(".json")
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps({"format": _FORMAT, **record}))
            tmp.replace(path)
        except OSError:
            # Not shared this time: the other workers verify themselves (as before sharing).
            with contextlib.suppress(OSError):
                tmp.unlink()
