"""Cube's attestation library: parse, verify and validate SEV-SNP, TDX and vTPM evidence.

Parse (bytes to frozen structures), verify (signatures, chains, collateral) and validate (a
policy against verified evidence) are separate steps in separate modules. Every failure raises
an :class:`attestation.errors.AttestationError`; nothing returns a bool.
"""

from attestation._checks import Check, Checks
from attestation.errors import AttestationError

__all__ = ["AttestationError", "Check", "Checks"]
