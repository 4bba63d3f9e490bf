"""``cube-proxy``: the verifying proxy's command line.

Every option of :class:`proxy.config.ProxyConfig` is a flag (``--database``), an environment
variable (``CUBE_PROXY_DATABASE``) and a key of the ``--config`` file (``cube-proxy-config/1``
JSON, also from ``CUBE_PROXY_CONFIG``); flags win over the environment, which wins over the
file. ``--print-config`` prints the effective configuration (the database password redacted)
and exits.

The first start on an empty database creates the administrator named by ``--admin-email`` /
``CUBE_PROXY_ADMIN_EMAIL`` with the password in ``CUBE_PROXY_ADMIN_PASSWORD`` (environment
only; there is never a default password).

``--workers N`` (default: one per available CPU) runs N worker processes that listen on the
same port with ``SO_REUSEPORT``; the kernel spreads connections over them. The parent prepares
the database first (migrations, signing keys, the bootstrap admin), then starts the workers
(each the same command line with ``--workers 1`` and two internal flags), forwards SIGTERM and
SIGINT to them, and stops them all if one exits. A worker exits when its parent dies. What
the workers share and what they do not is in docs/proxy.md ("Worker processes").

Exit codes: 0 after a clean shutdown (SIGTERM, SIGINT, or SIGHUP — a closed terminal or SSH
session: it drains and writes the audit queue rather than dying; under ``nohup`` a hangup is
ignored), 2 for an invalid
configuration, 1 when the proxy cannot start (database, keys, port) or a worker failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from cube._signals import stop_signals
from proxy.config import CONFIG_ENV, OPTIONS, ConfigError, ProxyConfig, effective_config
from proxy.gateway import EdgeSite
from proxy.gateway.edge import DRAIN_SECONDS

__all__ = ["build_parser", "main", "serve"]

log = logging.getLogger("cube.proxy")

EXIT_CONFIG = 2
EXIT_START = 1
SHUTDOWN_TIMEOUT = 10.0
#: Time a stopping worker is given, after its connections are drained, to write its queue.
AUDIT_FLUSH_SECONDS = 10.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cube-proxy",
        description="Cube's verifying proxy: users, domains, attestation-gated forwarding to "
        "agents. Every option also reads CUBE_PROXY_<NAME> from the environment (flags > "
        "environment > --config file > defaults).",
    )
    parser.add_argument("--config", metavar="FILE", help=f"cube-proxy-config/1 JSON ({CONFIG_ENV})")
    parser.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    for option in OPTIONS:
        parser.add_argument(
            option.flag,
            dest=option.name,
            metavar=option.type.__name__.upper(),
            default=None,
            help=f"(env {option.env})",
        )
    # Internal: set by the parent of ``--workers N`` for each worker it starts.
    parser.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-count", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-shared", default=None, help=argparse.SUPPRESS)
    return parser


@dataclass(frozen=True)
class Worker:
    """This process is worker ``index`` of ``count`` sharing the port."""

    index: int
    count: int
    #: The directory of the files the workers share (see ``_supervise``).
    shared_dir: str

    @property
    def shared_cache_file(self) -> str:
        return os.path.join(self.shared_dir, "generation")

    @property
    def shared_limits_file(self) -> str:
        return os.path.join(self.shared_dir, "limits")

    @property
    def shared_trust_dir(self) -> str:
        return os.path.join(self.shared_dir, "trust")


class StartError(Exception):
    """The proxy cannot start (message safe to print)."""


def _server_tls(config: ProxyConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None or config.tls_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise StartError(f"cannot load the TLS certificate or key: {exc}") from None
    return ctx


async def serve(
    config: ProxyConfig,
    *,
    stop: asyncio.Event | None = None,
    environ: Mapping[str, str] | None = None,
    worker: Worker | None = None,
) -> None:
    """Serve until ``stop`` is set (or SIGTERM/SIGINT/SIGHUP), then shut down cleanly."""
    from proxy.app import build_app
    from proxy.identity import StartupError

    stop = stop or asyncio.Event()
    app = build_app(
        config,
        environ=environ,
        shared_cache_file=worker.shared_cache_file if worker else None,
        shared_limits_file=worker.shared_limits_file if worker else None,
        shared_trust_dir=worker.shared_trust_dir if worker else None,
    )
    runner = web.AppRunner(
        app,
        access_log=None,
        handle_signals=False,
        # A client that goes away cancels its request, so the agent stops generating.
        handler_cancellation=True,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
        # Bodies stay as sent (forward.prepare refuses encoded ones with a JSON 415); aiohttp's
        # decoder answered those it lacks (br, zstd) itself, and inflated the others.
        auto_decompress=False,
    )
    try:
        await runner.setup()
    except StartupError as exc:
        raise StartError(str(exc)) from None
    try:
        site = EdgeSite(
            runner,
            config.host,
            config.port,
            ssl_context=_server_tls(config),
            reuse_port=worker is not None,
        )
        try:
            await site.start()
        except OSError as exc:
            raise StartError(
                f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}"
            ) from None
        log.info(
            "cube-proxy serving",
            extra={
                "fields": {
                    "url": f"{config.scheme}://{config.host}:{config.port}",
                    "issuer": config.effective_issuer,
                    "database": config.to_json()["database"],
                    **({"worker": worker.index, "workers": worker.count} if worker else {}),
                }
            },
        )
        _tune_gc()
        loop = asyncio.get_running_loop()
        for sig in stop_signals():
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()


def _tune_gc() -> None:
    """Keep the garbage collector from stalling the event loop.

    Measured under load (gc.callbacks): a full collection walked every object the proxy
    loaded at start-up (SQLAlchemy, aiohttp, cryptography...) and held the loop 60-160 ms,
    one of the two causes of the p99 at 16 and 64 clients. Start-up objects are frozen
    (never scanned again) and young collections run less often; request garbage is mostly
    freed by reference counting anyway."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


def _run(coro: Coroutine[Any, Any, None], choice: str) -> None:
    from cube._loop import LoopUnavailable, run_on

    try:
        run_on(coro, choice)
    except LoopUnavailable as exc:
        raise StartError(str(exc)) from None


async def _prepare(config: ProxyConfig, environ: Mapping[str, str]) -> None:
    """What must happen once before several workers start: migrations, signing keys, the
    bootstrap admin (the workers then find them done)."""
    from proxy.app import identity_config
    from proxy.identity import Identity, StartupError

    try:
        identity = await Identity.open(identity_config(config, environ))
    except StartupError as exc:
        raise StartError(str(exc)) from None
    await identity.close()


#: The supervisor's pid, as its workers must find it (their parent).
_SUPERVISOR_ENV = "CUBE_SUPERVISOR_PID"


def _die_with_parent() -> None:
    """A worker must not outlive its parent (even one killed with SIGKILL)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _supervise(
    config: ProxyConfig, argv: Sequence[str], environ: Mapping[str, str], count: int
) -> int:
    """Prepare the database, start ``count`` workers, wait; stop them all on a signal or when
    one of them exits."""
    _run(_prepare(config, environ), config.event_loop)
    stopping = False

    def on_signal(signum: int, frame: object) -> None:
        del signum, frame
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in stop_signals()}
    with tempfile.TemporaryDirectory(prefix="cube-proxy-") as tmp:
        from proxy.gateway.metrics import MULTIPROCESS_ENV
        from proxy.gateway.ratelimit import SharedBuckets
        from proxy.gateway.sharedtrust import SharedTrust
        from proxy.identity._cache import SharedGeneration

        shared = Path(tmp)
        SharedGeneration.create(shared / "generation").close()
        SharedBuckets.create(shared / "limits")
        SharedTrust.create(shared / "trust")
        (shared / "metrics").mkdir(mode=0o700)
        # Each worker writes its metrics there; /metrics reports them all (gateway.metrics).
        worker_env = {
            **environ,
            MULTIPROCESS_ENV: str(shared / "metrics"),
            _SUPERVISOR_ENV: str(os.getpid()),
        }
        procs: list[subprocess.Popen[bytes]] = []
        failed = False
        try:
            for index in range(count):
                procs.append(
                    subprocess.Popen(  # noqa: S603 - this same program, our own arguments
                        [
                            sys.executable,
                            "-m",
                            "proxy.cli",
                            *argv,
                            "--workers",
                            "1",
                            "--worker-index",
                            str(index),
                            "--worker-count",
                            str(count),
                            "--worker-shared",
                            str(shared),
                        ],
                        env=worker_env,
                        stdin=subprocess.DEVNULL,
                    )
                )
            while not stopping:
                if any(p.poll() is not None for p in procs):
                    failed = True
                    log.error("a worker exited: stopping the others")
                    break
                time.sleep(0.2)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            # A worker drains the fast path, then aiohttp's connections, one after the other,
            # then writes its queued audit rows: killed sooner, it would lose them.
            deadline = time.monotonic() + DRAIN_SECONDS + SHUTDOWN_TIMEOUT + AUDIT_FLUSH_SECONDS
            for proc in procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    if failed:
        codes = [p.returncode for p in procs]
        return EXIT_START if all(c in (0, None) or c < 0 for c in codes) else max(codes)
    return 0


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(args_list)
    env = os.environ if environ is None else environ
    flags = {option.name: getattr(args, option.name) for option in OPTIONS}
    try:
        config = effective_config(flags, env, args.config)
    except ConfigError as exc:
        print(f"cube-proxy: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    from proxy.app import identity_config
    from proxy.gateway.ops import metrics_token

    try:
        metrics_token(env)
        # ProxyConfig.validate checks what the identity layer needs; should the two ever
        # disagree, its refusal is still a configuration error, never a traceback at start.
        identity_config(config, env)
    except ValueError as exc:
        print(f"cube-proxy: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.print_config:
        print(json.dumps(config.to_json(), indent=2, sort_keys=True))
        return 0

    from proxy.gateway.ops import configure_logging

    # The access log is a line per request: written in batches (cube/_logging.py says why).
    configure_logging(config.log_level, batch_seconds=0.2)
    worker = None
    if args.worker_index is not None:
        if not args.worker_count or not args.worker_shared:
            print("cube-proxy: --worker-index is internal to --workers", file=sys.stderr)
            return EXIT_CONFIG
        _die_with_parent()
        if os.environ.get(_SUPERVISOR_ENV) != str(os.getppid()):
            # The supervisor died before the line above took effect (its SIGKILL then sends
            # no signal here): a worker without its supervisor must not serve.
            print("cube-proxy: the supervisor is gone", file=sys.stderr)
            return EXIT_START
        worker = Worker(args.worker_index, args.worker_count, args.worker_shared)
    try:
        count = config.effective_workers
        if worker is None and count > 1:
            return _supervise(config, args_list, env, count)
        _run(serve(config, environ=env, worker=worker), config.event_loop)
    except StartError as exc:
        print(f"cube-proxy: {exc}", file=sys.stderr)
        return EXIT_START
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
