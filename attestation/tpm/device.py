"""Guest side: take vTPM quotes through tpm2-pytss.

``TpmQuoter("device:/dev/tpmrm0")`` inside a VM, ``TpmQuoter("swtpm:port=2321")`` against a
software TPM. The attestation key (AK) is an ECC P-256 restricted signing key (ECDSA-SHA256)
created as a *primary* in the endorsement hierarchy: the TPM derives it from its endorsement seed
and the template, so the same TPM yields the same AK every time (no key blobs to keep).

All methods block (each TPM command takes milliseconds); the ``a``-prefixed coroutines run them
in a worker thread. tpm2-pytss is imported when a quoter opens, so the rest of the library works
without it.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, Final, Self

from attestation.errors import (
    AttestationError,
    CollectionError,
    DeviceNotFoundError,
    MalformedError,
)
from attestation.tpm import _wire as w
from attestation.tpm.parse import (
    TpmsAttest,
    parse_attest,
    parse_pcr_selection,
    parse_public,
    parse_signature,
)
from attestation.tpm.verify import pcr_digest

__all__ = [
    "AK_TEMPLATE",
    "DEFAULT_EVENT_LOG",
    "DEFAULT_SELECTION",
    "TpmEvidence",
    "TpmQuoter",
]

#: Where Linux exposes the firmware's TCG event log.
DEFAULT_EVENT_LOG: Final = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
#: tpm2-tools style template: ECC P-256, ECDSA with SHA-256, no symmetric (a signing key).
AK_TEMPLATE: Final = "ecc256:ecdsa-sha256:null"
#: All 24 PC Client PCRs of the SHA-256 bank.
DEFAULT_SELECTION: Final[Mapping[str, tuple[int, ...]]] = MappingProxyType(
    {"sha256": tuple(range(24))}
)
_READ_BATCH: Final = 8  # TPM2_PCR_Read returns at most 8 digests per call
_QUOTE_ATTEMPTS: Final = 3
_PCR_COUNT: Final = 24


@dataclass(frozen=True)
class TpmEvidence:
    """One quote and everything needed to verify it (all TPM structures marshalled)."""

    attest: bytes  # TPMS_ATTEST
    signature: bytes  # TPMT_SIGNATURE
    ak_public: bytes  # TPMT_PUBLIC
    pcrs: Mapping[str, Mapping[int, bytes]]
    event_log: bytes | None


def _pytss() -> Any:
    """tpm2_pytss, imported on first use so the library works without it."""
    try:
        import tpm2_pytss
    except ImportError as exc:
        raise CollectionError("tpm2-pytss is not installed (pip install cube[tpm])") from exc
    return tpm2_pytss


def _selection_string(selection: Mapping[str, Iterable[int]]) -> str:
    parts = []
    for bank, indices in selection.items():
        w.hash_by_name(bank, "PCR selection")
        wanted = sorted(set(indices))
        if not wanted or any(not 0 <= i < _PCR_COUNT for i in wanted):
            raise MalformedError(f"PCR selection {bank}: indices must be 0..{_PCR_COUNT - 1}")
        parts.append(f"{bank}:{','.join(map(str, wanted))}")
    if not parts:
        raise MalformedError("PCR selection: no bank selected")
    return "+".join(parts)


def _parse_digest_list(data: bytes) -> list[bytes]:
    r = w.Reader(data, "TPML_DIGEST")
    count = r.u32("count")
    if count > _READ_BATCH:
        raise MalformedError(f"TPML_DIGEST: {count} digests")
    out = [r.sized(f"digests[{i}]", w.MAX_DIGEST) for i in range(count)]
    r.finish()
    return out


class TpmQuoter:
    """A connection to one TPM, holding the AK loaded between quotes. Thread-safe."""

    def __init__(self, tcti: str = "device:/dev/tpmrm0", *, event_log: Path | None = None) -> None:
        self.tcti = tcti
        self.event_log_path = event_log
        self._lock = threading.Lock()
        self._esapi: Any = None
        self._ak_handle: Any = None
        self._ak_public: bytes | None = None

    @classmethod
    def for_device(cls, device: str | Path = "/dev/tpmrm0") -> Self:
        """The TPM of this machine, with the firmware event log when the kernel exposes it."""
        path = Path(device)
        if not path.exists():
            raise DeviceNotFoundError(f"no TPM device at {path}")
        log = DEFAULT_EVENT_LOG if DEFAULT_EVENT_LOG.exists() else None
        return cls(f"device:{path}", event_log=log)

    # -- connection -----------------------------------------------------------------------

    def _open(self) -> Any:
        if self._esapi is not None:
            return self._esapi
        if self.tcti.startswith("device:") and not Path(self.tcti[len("device:") :]).exists():
            raise DeviceNotFoundError(f"no TPM device at {self.tcti[len('device:') :]}")
        esapi_class = _pytss().ESAPI
        try:
            self._esapi = esapi_class(self.tcti)
        except Exception as exc:
            raise CollectionError(f"cannot open the TPM through {self.tcti!r}: {exc}") from exc
        return self._esapi

    def close(self) -> None:
        """Flush the AK and release the TPM connection (safe to call twice)."""
        with self._lock:
            esapi, handle = self._esapi, self._ak_handle
            self._esapi = self._ak_handle = None
            if esapi is None:
                return
            try:
                if handle is not None:
                    esapi.flush_context(handle)
            except Exception:  # noqa: S110 - closing anyway; the TPM drops transient objects
                pass
            finally:
                esapi.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except AttestationError:
            raise
        except Exception as exc:
            raise CollectionError(f"TPM {what} failed: {exc}") from exc

    def _ak(self) -> Any:
        if self._ak_handle is not None:
            return self._ak_handle
        t = _pytss()
        esapi = self._open()
        a = t.TPMA_OBJECT
        attributes = (
            a.RESTRICTED
            | a.SIGN_ENCRYPT
            | a.FIXEDTPM
            | a.FIXEDPARENT
            | a.SENSITIVEDATAORIGIN
            | a.USERWITHAUTH
        )
        template = t.TPM2B_PUBLIC.parse(AK_TEMPLATE, objectAttributes=attributes)
        handle, public, _, _, _ = self._call(
            "AK creation (CreatePrimary, endorsement hierarchy)",
            esapi.create_primary,
            None,
            template,
            primary_handle=t.ESYS_TR.ENDORSEMENT,
        )
        raw = bytes(public.publicArea.marshal())
        parse_public(raw)  # what we hand out must be what verifiers parse
        self._ak_handle, self._ak_public = handle, raw
        return handle

    # -- blocking API ---------------------------------------------------------------------

    def ak_public(self) -> bytes:
        """The AK's TPMT_PUBLIC (creating the AK on first use)."""
        with self._lock:
            self._ak()
            assert self._ak_public is not None
            return self._ak_public

    def _read(self, selection: Mapping[str, Iterable[int]]) -> dict[str, dict[int, bytes]]:
        selection_type = _pytss().TPML_PCR_SELECTION
        esapi = self._open()
        out: dict[str, dict[int, bytes]] = {}
        for bank, indices in selection.items():
            size = w.hash_by_name(bank, "PCR bank").size
            pending = sorted(set(indices))
            values: dict[int, bytes] = {}
            while pending:
                batch = pending[:_READ_BATCH]
                wanted = selection_type.parse(_selection_string({bank: batch}))
                _, selected, digests = self._call("PCR_Read", esapi.pcr_read, wanted)
                got = [i for s in parse_pcr_selection(bytes(selected.marshal())) for i in s.pcrs]
                read = _parse_digest_list(bytes(digests.marshal()))
                if not got or len(got) != len(read) or not set(got) <= set(batch):
                    raise CollectionError(f"TPM PCR_Read: bank {bank} is not active on this TPM")
                for index, value in zip(got, read, strict=True):
                    if len(value) != size:
                        raise CollectionError(
                            f"TPM PCR_Read: {bank} PCR {index} has {len(value)} B"
                        )
                    values[index] = value
                pending = [i for i in pending if i not in values]
            out[bank] = dict(sorted(values.items()))
        return out

    def pcr_read(
        self, selection: Mapping[str, Iterable[int]] = DEFAULT_SELECTION
    ) -> dict[str, dict[int, bytes]]:
        """Current PCR values per bank (read 8 at a time, as TPM2_PCR_Read allows)."""
        with self._lock:
            return self._read(selection)

    def quote(
        self,
        qualifying_data: bytes,
        selection: Mapping[str, Iterable[int]] = DEFAULT_SELECTION,
    ) -> TpmEvidence:
        """Quote ``selection`` with ``qualifying_data`` as extraData.

        PCRs are read before the quote and checked against its pcrDigest; if something extended
        a PCR in between, the quote is taken again.
        """
        if not isinstance(qualifying_data, bytes) or len(qualifying_data) > 64:
            raise MalformedError("qualifying data: expected at most 64 bytes")
        selection_type = _pytss().TPML_PCR_SELECTION
        text = _selection_string(selection)
        with self._lock:
            esapi = self._open()
            ak = self._ak()
            assert self._ak_public is not None
            banks = {b: sorted(set(i)) for b, i in selection.items()}
            for _ in range(_QUOTE_ATTEMPTS):
                values = self._read(banks)
                quoted, signature = self._call(
                    "Quote", esapi.quote, ak, selection_type.parse(text), qualifying_data
                )
                attest_bytes = bytes(quoted)
                attest: TpmsAttest = parse_attest(attest_bytes)
                signature_bytes = bytes(signature.marshal())
                sig = parse_signature(signature_bytes)
                if pcr_digest(attest, values, sig.hash) == attest.pcr_digest:
                    break
            else:
                raise CollectionError("PCRs kept changing while quoting; try again")
            log = self._event_log()
            return TpmEvidence(attest_bytes, signature_bytes, self._ak_public, values, log)

    def _event_log(self) -> bytes | None:
        if self.event_log_path is None:
            return None
        try:
            return self.event_log_path.read_bytes()
        except OSError as exc:
            raise CollectionError(
                f"cannot read the event log {self.event_log_path}: {exc}"
            ) from exc

    def extend(self, pcr: int, digest: bytes | Mapping[str, bytes]) -> None:
        """Extend ``pcr`` with a SHA-256 digest, or with one digest per bank (one command)."""
        digests = {"sha256": digest} if isinstance(digest, bytes) else dict(digest)
        if not 0 <= pcr < _PCR_COUNT or not digests:
            raise MalformedError(f"PCR extend: PCR {pcr} or digests out of range")
        blob = struct.pack(">I", len(digests))
        for bank, value in digests.items():
            alg = w.hash_by_name(bank, "PCR extend")
            if len(value) != alg.size:
                raise MalformedError(f"PCR extend: a {bank} digest is {alg.size} bytes")
            blob += struct.pack(">H", alg.alg) + value
        t = _pytss()
        values, _ = t.TPML_DIGEST_VALUES.unmarshal(blob)
        with self._lock:
            esapi = self._open()
            self._call("PCR_Extend", esapi.pcr_extend, t.ESYS_TR(pcr), values)

    def active_banks(self) -> tuple[str, ...]:
        """The PCR banks this TPM has allocated."""
        t = _pytss()
        with self._lock:
            esapi = self._open()
            _, data = self._call("GetCapability(PCRS)", esapi.get_capability, t.TPM2_CAP.PCRS, 0, 1)
            selections = parse_pcr_selection(bytes(data.data.assignedPCR.marshal()))
        return tuple(s.bank for s in selections if s.pcrs)

    def measure(self, pcr: int, data: bytes) -> dict[str, bytes]:
        """Hash ``data`` in every active bank and extend ``pcr`` with it; returns the digests
        (for the runtime measurement log a verifier replays)."""
        digests = {}
        for bank in self.active_banks():
            alg = w.hash_by_name(bank, "PCR bank")
            if alg.hashlib_name is not None:
                digests[bank] = hashlib.new(alg.hashlib_name, data).digest()
        self.extend(pcr, digests)
        return digests

    # -- async wrappers -------------------------------------------------------------------

    async def aak_public(self) -> bytes:
        return await asyncio.to_thread(self.ak_public)

    async def apcr_read(
        self, selection: Mapping[str, Iterable[int]] = DEFAULT_SELECTION
    ) -> dict[str, dict[int, bytes]]:
        return await asyncio.to_thread(self.pcr_read, selection)

    async def aquote(
        self, qualifying_data: bytes, selection: Mapping[str, Iterable[int]] = DEFAULT_SELECTION
    ) -> TpmEvidence:
        return await asyncio.to_thread(self.quote, qualifying_data, selection)

    async def aextend(self, pcr: int, digest: bytes | Mapping[str, bytes]) -> None:
        await asyncio.to_thread(self.extend, pcr, digest)

    async def ameasure(self, pcr: int, data: bytes) -> dict[str, bytes]:
        return await asyncio.to_thread(self.measure, pcr, data)

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)
