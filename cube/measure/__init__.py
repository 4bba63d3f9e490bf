"""``cube measure``: reference values of an image build, computed ahead from its bytes.

PE/Authenticode hashing (:func:`authenticode_digest`), UKI sections and PCR 11
(:func:`load_uki`), the firmware/kernel/agent event rules for PCRs 4, 7, 9, 11 and 15, SEV-SNP
launch measurements through sev-snp-measure, and the ``cube-policy/1`` written from them
(:func:`measure_build`). docs/measure.md describes the trust chain and every rule.
"""

from cube.measure._compute import (
    DEFAULT_PCRS,
    MEASUREMENTS_FORMAT,
    MeasureError,
    Measurements,
    MeasureOptions,
    measure_build,
)
from cube.measure._pe import PeError, authenticode_digest, parse_pe
from cube.measure._snp import SnpError, check_snp_firmware, ovmf_sev_tables
from cube.measure._uki import MEASURED_SECTIONS, Uki, UkiError, load_uki

__all__ = [
    "DEFAULT_PCRS",
    "MEASURED_SECTIONS",
    "MEASUREMENTS_FORMAT",
    "MeasureError",
    "MeasureOptions",
    "Measurements",
    "PeError",
    "SnpError",
    "Uki",
    "UkiError",
    "authenticode_digest",
    "check_snp_firmware",
    "load_uki",
    "measure_build",
    "ovmf_sev_tables",
    "parse_pe",
]
