"""Benchmark: one warm-cache SEV-SNP verification (parse + verify), best of ``repeat`` runs.

Run ``python -m tests.snp.bench`` for a figure per vector.
"""

from __future__ import annotations

import time
import timeit
from collections.abc import Callable

from attestation.snp import parse_report, verify_report
from tests import vectors
from tests.snp._util import report_bytes, vcek_and_chain

DEFAULT_VECTOR = "snp-milan-v5-gcp-teekit"


def bench_verify(
    vector_id: str = DEFAULT_VECTOR,
    *,
    number: int = 500,
    repeat: int = 5,
    clock: Callable[[], float] = time.perf_counter,
) -> float:
    """Seconds per ``verify_report(parse_report(...))`` with warm caches (best of ``repeat``).

    ``clock=time.process_time`` measures CPU time, which other processes on a busy machine do
    not inflate (the test uses it; wall-clock figures are for reports).
    """
    v = vectors.vector(vector_id)
    data = report_bytes(v)
    vcek, chain = vcek_and_chain(v)
    now = vectors.time_inside(v)

    def once() -> None:
        verify_report(parse_report(data), vcek=vcek, cert_chain=chain, now=now)

    once()  # warm the certificate caches
    timer = timeit.Timer(once, timer=clock)
    return min(timer.repeat(number=number, repeat=repeat)) / number


def main() -> None:
    for v in vectors.vectors(kind="sev-snp"):
        wall = bench_verify(v["id"]) * 1e3
        cpu = bench_verify(v["id"], clock=time.process_time) * 1e3
        print(f"{v['id']:40s} {wall:.3f} ms wall, {cpu:.3f} ms CPU")


if __name__ == "__main__":
    main()
