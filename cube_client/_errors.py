"""Errors of the client package: all of them :class:`attestation.errors.AttestationError`s, so a
caller (``cube verify``, an application) handles one hierarchy with one set of exit codes."""

from __future__ import annotations

from attestation.errors import AttestationError, PolicyError, VerificationError

__all__ = ["ClientError", "EncryptionError", "PlaintextRefusedError"]


class ClientError(AttestationError):
    """The endpoint could not be reached or did not answer the evidence request (network
    failure, HTTP error, oversized or missing answer). Not a verdict on the evidence."""

    failure_class = "unreachable"
    exit_code = 7


class EncryptionError(VerificationError):
    """An end-to-end encrypted exchange failed: a response that does not authenticate, a
    truncated stream, or a plaintext answer where a sealed one was required."""


class PlaintextRefusedError(PolicyError):
    """A request body would have left the process in plaintext through a proxy (the TLS there
    ends outside the TEE); encryption must be on."""
