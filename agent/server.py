"""Start-up and serving: configuration -> weights -> platform -> measurement -> keys -> HTTPS.

The sequence (:func:`prepare`, then :class:`AgentServer`):

1. validate the configuration (refusal: exit 2);
2. verify the model weights against ``model_digest`` in a worker thread (refusal: exit 1);
3. detect the evidence sources: ``tee`` ``auto`` asks :func:`attestation.guest.detect_tee`;
   ``sev-snp``/``tdx`` require that real device; ``sim-sev-snp``/``sim-tdx`` run the simulator
   through the production configfs-tsm path (logged loudly as SIMULATED); ``none`` means vTPM
   only. ``tpm`` (a TCTI) adds a vTPM. With neither, the agent refuses to start;
4. extend the model and configuration digests into ``runtime_pcr`` where a vTPM exists;
5. generate the TLS and HPKE keys (in memory) and collect one trial evidence document, so a
   platform that cannot produce evidence refuses to start instead of failing every client;
6. build the application and serve it over TLS only.

Refusals are :class:`StartupError` (one clear line, an exit code), never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from agent.app import create_app
from agent.auth import JwksError, KeySet
from agent.config import AgentConfig, ConfigError
from agent.e2e import E2E
from agent.evidence_endpoint import EvidenceService
from agent.identity import AGENT_VERSION, AgentIdentity, IdentityError
from agent.measure import (
    MeasurementError,
    ModelMeasurement,
    RuntimeLog,
    measure_runtime,
    rtmr_note,
    verify_model_dir,
)
from agent.metrics import AgentMetrics
from agent.rotation import KEY_ROTATION, KeyRotation, validity_for
from attestation.errors import AttestationError, CollectionError
from attestation.evidence import EvidenceCollector
from attestation.guest import ConfigfsTsm, TeeDevice, detect_tee
from attestation.tpm.device import DEFAULT_EVENT_LOG, TpmQuoter
from cube._signals import stop_signals

__all__ = [
    "EXIT_CONFIG",
    "EXIT_ENVIRONMENT",
    "AgentServer",
    "Platform",
    "PreparedAgent",
    "StartupError",
    "detect_platform",
    "prepare",
    "run",
]

log = logging.getLogger("cube.agent")

EXIT_CONFIG = 2
EXIT_ENVIRONMENT = 1
SHUTDOWN_TIMEOUT = 10.0
#: A connection that has not sent a whole request head this long after it opened is closed:
#: aiohttp's keep-alive timer leaves a connection that never sent one open for ever, so idle
#: or trickling peers could hold every file descriptor (the agent then stopped answering).
REQUEST_HEAD_SECONDS = 30.0
#: ... and one that sends no further whole head this long after its last request (a head
#: trickled a line every few seconds would keep aiohttp's keep-alive timer from firing).
#: Longer than the proxy keeps an idle connection (30 s), so it never races a reuse.
IDLE_SECONDS = 60.0
_SWEEP_SECONDS = 5.0
#: The longest header (name or value) a request may carry: room for the longest bearer token
#: auth accepts (16 KiB, refused above that with a JSON error) and its "Bearer " prefix.
MAX_HEADER_BYTES = 17 * 1024
#: At most this many headers (aiohttp allows 128). Together with MAX_HEADER_BYTES this bounds
#: what an unauthenticated peer's unfinished request head can hold in memory (about 0.5 MiB;
#: 128 headers of 32 KiB each held some 8.5 MiB per connection).
MAX_HEADERS = 32


class StartupError(Exception):
    """The agent refuses to start. ``str()`` is the one line printed; ``exit_code`` 2 for
    configuration errors, 1 for the environment (weights, devices, ports)."""

    def __init__(self, message: str, *, exit_code: int = EXIT_ENVIRONMENT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class Platform:
    """Where evidence comes from."""

    tee: TeeDevice | None
    tpm: TpmQuoter | None
    simulated: bool = False

    def describe(self) -> str:
        parts = []
        if self.tee is not None:
            parts.append(
                f"{self.tee.platform} via {getattr(self.tee, 'source', type(self.tee).__name__)}"
            )
        if self.tpm is not None:
            parts.append(f"vTPM via {self.tpm.tcti}")
        return " + ".join(parts) or "nothing"


_WANTED_TEE = {"sev-snp": "SEV-SNP", "tdx": "TDX"}


def _simulated_tee(choice: str) -> TeeDevice:
    from attestation.sim import EmulatedConfigfsTsm

    emulation = EmulatedConfigfsTsm.snp() if choice == "sim-sev-snp" else EmulatedConfigfsTsm.tdx()
    return ConfigfsTsm(emulation.root, fs=emulation)


def detect_platform(
    config: AgentConfig,
    *,
    detect: Callable[[], TeeDevice | None] = detect_tee,
) -> Platform:
    """The evidence sources ``config`` asks for, or :class:`StartupError`. Blocking."""
    tee: TeeDevice | None = None
    simulated = False
    try:
        if config.tee in ("sim-sev-snp", "sim-tdx"):
            tee = _simulated_tee(config.tee)
            simulated = True
        elif config.tee in ("auto", "sev-snp", "tdx"):
            tee = detect()
            if config.tee in _WANTED_TEE:
                base = None if tee is None else tee.platform
                if base != config.tee:
                    found = "no TEE guest device" if base is None else f"a {base} device"
                    raise StartupError(
                        f"tee {config.tee!r} was requested but {found} was found (looked for "
                        f"configfs-tsm at /sys/kernel/config/tsm/report and "
                        f"{'/dev/sev-guest' if config.tee == 'sev-snp' else '/dev/tdx_guest'}); "
                        f"is this a {_WANTED_TEE[config.tee]} confidential VM?"
                    )
    except CollectionError as exc:
        raise StartupError(f"cannot use the TEE: {exc}") from exc
    quoter = None
    if config.tpm is not None:
        # A local TPM device comes with the firmware's event log (measured boot), which a
        # verifier replays against the quoted PCRs; a TCP/socket TPM (swtpm in tests) has none.
        event_log = (
            DEFAULT_EVENT_LOG
            if config.tpm.startswith("device:") and DEFAULT_EVENT_LOG.exists()
            else None
        )
        quoter = TpmQuoter(config.tpm, event_log=event_log)
        try:
            quoter.ak_public()  # opens the TPM and creates the AK: fail now, not per request
        except AttestationError as exc:
            quoter.close()
            raise StartupError(f"cannot use the vTPM {config.tpm!r}: {exc}") from exc
    if tee is None and quoter is None:
        raise StartupError(
            "no TEE was found and no vTPM is configured (--tpm): nothing can produce evidence; "
            "outside a confidential VM, --tee sim-sev-snp or sim-tdx runs the simulator"
        )
    return Platform(tee, quoter, simulated)


@dataclass
class PreparedAgent:
    """Everything the start-up sequence established, ready to serve."""

    config: AgentConfig
    identity: AgentIdentity
    collector: EvidenceCollector
    evidence: EvidenceService
    model: ModelMeasurement
    runtime_log: RuntimeLog
    platform: Platform | None
    metrics: AgentMetrics
    keys: KeySet | None = None
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for closer in self.closers:
            with contextlib.suppress(Exception):
                closer()
        self.closers.clear()


async def prepare(
    config: AgentConfig,
    *,
    collector: EvidenceCollector | None = None,
    keys: KeySet | None = None,
    detect: Callable[[], TeeDevice | None] = detect_tee,
) -> PreparedAgent:
    """Run the start-up sequence up to (not including) listening. ``collector`` replaces
    platform detection (tests inject faulty devices with it)."""
    try:
        config = config.validate()
        if keys is None and config.jwks_file is not None:
            keys = KeySet.from_file(config.jwks_file)
    except (ConfigError, JwksError) as exc:
        raise StartupError(f"invalid configuration: {exc}", exit_code=EXIT_CONFIG) from exc
    assert config.model_dir is not None and config.model_digest is not None  # validate() says so
    log.info(
        "cube-agent starting",
        extra={
            "fields": {
                "version": AGENT_VERSION,
                "config_digest": config.digest(),
                "config_source": config.source or None,
            }
        },
    )

    try:
        model = await asyncio.to_thread(verify_model_dir, config.model_dir, config.model_digest)
    except MeasurementError as exc:
        raise StartupError(f"refusing to serve: {exc}") from exc

    closers: list[Callable[[], None]] = []
    platform: Platform | None = None
    if collector is None:
        platform = await asyncio.to_thread(detect_platform, config, detect=detect)
        if platform.tpm is not None:
            closers.append(platform.tpm.close)
        if platform.simulated:
            log.warning(
                "SIMULATED TEE: evidence comes from the simulator, not from hardware; verifiers "
                "refuse it unless their policy explicitly allows simulated evidence",
                extra={"fields": {"tee": config.tee}},
            )
        try:
            collector = EvidenceCollector(
                tee=platform.tee,
                tpm_quoter=platform.tpm,
                tpm_selection={"sha256": config.tpm_pcrs},
            )
        except CollectionError as exc:
            raise StartupError(str(exc)) from exc
        log.info("evidence sources", extra={"fields": {"platform": platform.describe()}})

    try:
        runtime_log = RuntimeLog()
        if platform is not None and platform.tpm is not None:
            try:
                runtime_log = await asyncio.to_thread(
                    measure_runtime,
                    platform.tpm,
                    config.runtime_pcr,
                    model_digest=model.digest,
                    config_digest=config.digest(),
                )
            except MeasurementError as exc:
                # Unmeasured, the agent would attest a TPM state that does not name its model
                # and configuration: it does not serve.
                raise StartupError(f"refusing to serve: {exc}") from exc
        note = rtmr_note(collector.platform)
        if note is not None:
            log.info(note)

        try:
            identity = AgentIdentity.generate(
                config.tls_names, validity=validity_for(config.key_rotate_seconds)
            )
        except IdentityError as exc:
            raise StartupError(f"invalid configuration: {exc}", exit_code=EXIT_CONFIG) from exc
        log.info(
            "identity generated",
            extra={
                "fields": {
                    "tls_cert_sha256": identity.cert_sha256.hex(),
                    "hpke_public_key": identity.hpke_public_key.hex(),
                }
            },
        )
        try:
            tpm_ak_sha256 = await asyncio.to_thread(collector.tpm_ak_sha256)
        except AttestationError as exc:
            raise StartupError(f"cannot read the vTPM attestation key: {exc}") from exc
        metrics = AgentMetrics()
        evidence = EvidenceService(
            config=config,
            identity=identity,
            collector=collector,
            metrics=metrics,
            model_digest=model.digest,
            tpm_ak_sha256=tpm_ak_sha256,
        )
        try:
            await evidence.collect(secrets.token_bytes(32))
        except AttestationError as exc:
            raise StartupError(f"cannot produce evidence on this platform: {exc}") from exc
    except BaseException:
        for closer in closers:
            with contextlib.suppress(Exception):
                closer()
        raise
    return PreparedAgent(
        config=config,
        identity=identity,
        collector=collector,
        evidence=evidence,
        model=model,
        runtime_log=runtime_log,
        platform=platform,
        metrics=metrics,
        keys=keys,
        closers=closers,
    )


class AgentServer:
    """The application of a :class:`PreparedAgent`, served over TLS."""

    def __init__(self, prepared: PreparedAgent, *, app: web.Application | None = None) -> None:
        self.prepared = prepared
        self.app = app or create_app(
            prepared.config,
            evidence=prepared.evidence,
            keys=prepared.keys,
            runtime_log=prepared.runtime_log,
        )
        evidence = prepared.evidence
        sealed = self.app.get(E2E)

        def rotated(identity: AgentIdentity) -> None:
            evidence.identity = identity  # the current HPKE key, named by every claims
            if sealed is not None:
                sealed.add(identity)  # opens sealed requests (with the key before it)

        self.rotation = KeyRotation(
            prepared.identity,
            names=prepared.config.tls_names,
            rotate_seconds=prepared.config.key_rotate_seconds,
            on_rotate=rotated,
        )
        self.app[KEY_ROTATION] = self.rotation
        self._runner: web.AppRunner | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        host = self.prepared.config.host
        host = "127.0.0.1" if host in ("0.0.0.0", "") else host  # noqa: S104
        return f"https://{'[' + host + ']' if ':' in host else host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        return self.rotation.server_context()

    async def start(self) -> None:
        config = self.prepared.config
        runner = web.AppRunner(
            self.app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            # Room for large bearer tokens (auth refuses those over 16 KiB with a JSON error),
            # but few headers: a head is held in memory until it is whole.
            max_field_size=MAX_HEADER_BYTES,
            max_headers=MAX_HEADERS,
            # Bodies stay as sent: forward.read_body refuses an encoded one (415, JSON) whatever
            # the encoding; aiohttp's decoder answered those it lacks (br, zstd) itself.
            auto_decompress=False,
        )
        await runner.setup()
        site = web.TCPSite(runner, config.host, config.port, ssl_context=self.ssl_context())
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise StartupError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from exc
        self._runner = runner
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep(runner))
        self.rotation.start()
        sockets = [s for s in (runner.addresses or [])]
        self.port = int(sockets[0][1]) if sockets else config.port
        log.info(
            "serving HTTPS",
            extra={
                "fields": {
                    "host": config.host,
                    "port": self.port,
                    "platform": self.prepared.collector.platform,
                    "model": config.model_name,
                    "model_digest": self.prepared.model.digest,
                }
            },
        )

    async def _sweep(self, runner: web.AppRunner) -> None:
        """Close connections that make no progress: no whole request head REQUEST_HEAD_SECONDS
        after opening, or none IDLE_SECONDS after the last one, while nothing is answered."""
        seen: dict[object, tuple[int, float]] = {}  # handler -> (requests, since when)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(_SWEEP_SECONDS)
            server = runner.server
            if server is None:
                continue
            now = loop.time()
            current: dict[object, tuple[int, float]] = {}
            for handler in server.connections:
                # (aiohttp counts a request once its head is parsed; private, pinned by a test)
                count = handler._request_count
                previous = seen.get(handler)
                busy = handler._request_in_progress  # (a long answer is progress too)
                since = now
                if previous is not None and previous[0] == count and not busy:
                    since = previous[1]
                current[handler] = (count, since)
                limit = REQUEST_HEAD_SECONDS if count == 0 else IDLE_SECONDS
                if now - since > limit:
                    handler.force_close()
            seen = current  # (closed connections are forgotten)

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.rotation.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await asyncio.to_thread(self.prepared.close)


async def serve(config: AgentConfig, *, stop: asyncio.Event | None = None) -> None:
    """Prepare, serve until ``stop`` is set (or SIGTERM/SIGINT/SIGHUP), then shut down."""
    stop = stop or asyncio.Event()
    prepared = await prepare(config)
    server = AgentServer(prepared)
    try:
        await server.start()
    except BaseException:
        prepared.close()
        raise
    loop = asyncio.get_running_loop()
    for sig in stop_signals():
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("shutting down")
    finally:
        await server.stop()


def run(config: AgentConfig) -> int:
    """Run the agent; returns the process exit code. Refusals print one line to stderr."""
    from cube._loop import LoopUnavailable, run_on

    try:
        run_on(serve(config), config.event_loop)
    except LoopUnavailable as exc:
        print(f"cube-agent: {exc}", file=sys.stderr)
        return 1
    except StartupError as exc:
        print(f"cube-agent: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 0
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port free on ``host`` right now (tests and the demo pick ports with it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
