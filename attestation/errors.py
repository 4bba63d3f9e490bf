"""The one error hierarchy of the attestation library.

Every failure the library can detect is an :class:`AttestationError`. Each subclass belongs to
exactly one *failure class*, which decides the exit code of ``cube attest verify``::

    AttestationError                       (1)  root; never raised directly
    ├── MalformedError                     (3)  bytes or JSON that do not parse
    │   └── InvalidPolicyError             (3)  a policy file that breaks cube-policy/1
    ├── VerificationError                  (4)  signature, chain, CRL, collateral, binding
    │   ├── SignatureError
    │   ├── CertificateChainError
    │   ├── RevokedError
    │   ├── CollateralError
    │   └── BindingError                   nonce / claims / report_data / AK binding
    ├── PolicyError                        (5)  verified evidence the policy does not accept
    │   ├── TcbStatusError
    │   └── SimulatedEvidenceError
    ├── ValidityError                      (6)  outside a validity window (certs, CRLs, collateral,
    │   └── StaleEvidenceError                  evidence age)
    └── CollectionError                    (1)  guest side: device missing, busy, or failing
        ├── DeviceNotFoundError
        └── DeviceBusyError

Messages name what was checked and, where it helps, the expected and actual values; they never
contain secrets (the library handles no secrets: reports and certificates are public).
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "AttestationError",
    "BindingError",
    "CertificateChainError",
    "CollateralError",
    "CollectionError",
    "DeviceBusyError",
    "DeviceNotFoundError",
    "InvalidPolicyError",
    "MalformedError",
    "PolicyError",
    "RevokedError",
    "SignatureError",
    "SimulatedEvidenceError",
    "StaleEvidenceError",
    "TcbStatusError",
    "ValidityError",
    "VerificationError",
]


class AttestationError(Exception):
    """Root of every error the attestation library raises."""

    #: Failure class, as printed in ``--json`` output (``error.class``).
    failure_class: ClassVar[str] = "error"
    #: Exit code of ``cube attest verify`` for this failure class.
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, check: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        #: Name of the check that failed (as recorded by :class:`attestation.Checks`), if any.
        self.check = check

    def __str__(self) -> str:
        return self.message


class MalformedError(AttestationError):
    """Input that cannot be parsed: wrong length, bad reserved bytes, bad encoding."""

    failure_class = "malformed"
    exit_code = 3


class InvalidPolicyError(MalformedError):
    """A policy document that is not valid ``cube-policy/1``."""


class VerificationError(AttestationError):
    """Cryptographic verification failed: the evidence is not what it claims to be."""

    failure_class = "signature"
    exit_code = 4


class SignatureError(VerificationError):
    """A signature does not verify."""


class CertificateChainError(VerificationError):
    """A certificate chain does not lead to the trusted root, or a certificate is unsuitable."""


class RevokedError(VerificationError):
    """A certificate is listed in a valid CRL."""


class CollateralError(VerificationError):
    """Collateral (TCB info, QE identity, CRLs) is missing, unsigned, or does not match."""


class BindingError(VerificationError):
    """Evidence is not bound to what it must be bound to (nonce, claims, keys)."""


class PolicyError(AttestationError):
    """Genuine evidence that the policy does not accept."""

    failure_class = "policy"
    exit_code = 5


class TcbStatusError(PolicyError):
    """The platform's TCB status is not one the policy accepts."""


class SimulatedEvidenceError(PolicyError):
    """Simulated evidence, and the policy does not allow simulated evidence."""


class ValidityError(AttestationError):
    """Something is used outside its validity window (certificate, CRL, collateral, evidence)."""

    failure_class = "validity"
    exit_code = 6


class StaleEvidenceError(ValidityError):
    """Evidence older than the policy's maximum age, or issued in the future."""


class CollectionError(AttestationError):
    """Guest-side evidence collection failed."""

    failure_class = "collection"
    exit_code = 1


class DeviceNotFoundError(CollectionError):
    """No TEE or TPM device of the requested kind is present."""


class DeviceBusyError(CollectionError):
    """The device is busy (configfs-tsm allows one report at a time); retry later."""
