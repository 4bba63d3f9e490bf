"""The agent's aiohttp application: typed state, routes, and the resources it owns.

State lives under ``web.AppKey``s; every resource that must be closed (the backend client
session, the TPM, the JWKS refresher) is owned by a ``cleanup_ctx`` so shutdown is orderly.
Modules, one concern each:

- :mod:`agent.config`   the measured configuration
- :mod:`agent.identity` TLS and HPKE keys born in memory at start; the claims
- :mod:`agent.evidence_endpoint`  ``GET /attestation?nonce=``
- :mod:`agent.auth`     JWT verification middleware and scopes
- :mod:`agent.forward`  OpenAI-compatible forwarding (and :mod:`agent.ollama` for Ollama)
- :mod:`agent.e2e`      end-to-end encrypted bodies (``cube-e2e/1``)
- :mod:`agent.ops`      ``/health``, ``/ready``, ``/metrics``, JSON logs
- :mod:`agent.measure`  model weights verification and runtime measurement

Middleware order (outermost first): access log, JSON errors, authentication.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging

from aiohttp import web

from agent import auth, e2e, evidence_endpoint, ops
from agent.config import AgentConfig
from agent.evidence_endpoint import EvidenceService
from agent.identity import AgentIdentity
from agent.measure import RuntimeLog
from agent.metrics import METRICS, AgentMetrics
from attestation.evidence import EvidenceCollector

__all__ = ["CONFIG", "IDENTITY", "RUNTIME_LOG", "create_app"]

log = logging.getLogger("cube.agent")

CONFIG = web.AppKey("config", AgentConfig)
IDENTITY = web.AppKey("identity", AgentIdentity)
RUNTIME_LOG = web.AppKey("runtime_log", RuntimeLog)


def create_app(
    config: AgentConfig,
    *,
    identity: AgentIdentity | None = None,
    collector: EvidenceCollector | None = None,
    evidence: EvidenceService | None = None,
    keys: auth.KeySet | None = None,
    metrics: AgentMetrics | None = None,
    model_digest: str | None = None,
    tpm_ak_sha256: bytes | None = None,
    runtime_log: RuntimeLog | None = None,
) -> web.Application:
    """Build the application.

    ``evidence`` (or ``identity`` with ``collector``) enables ``/attestation`` and the evidence
    readiness check; without them (unit tests of forwarding) the route is absent. ``keys``
    overrides the configured JWKS source.
    """
    app = web.Application(client_max_size=config.max_body_bytes)
    app[CONFIG] = config
    if evidence is not None:
        metrics = evidence.metrics
    app[METRICS] = metrics if metrics is not None else AgentMetrics()
    if runtime_log is not None:
        app[RUNTIME_LOG] = runtime_log

    ops.setup(app, config)
    auth.setup(app, config, keys=keys)

    if evidence is None and identity is not None and collector is not None:
        evidence = EvidenceService(
            config=config,
            identity=identity,
            collector=collector,
            metrics=app[METRICS],
            model_digest=model_digest,
            tpm_ak_sha256=tpm_ak_sha256,
        )
    if evidence is not None:
        app[IDENTITY] = evidence.identity
        evidence_endpoint.setup(app, evidence)
        service = evidence

        async def evidence_check(app: web.Application) -> tuple[bool, str]:
            del app
            return await service.obtainable()

        app[ops.READY_CHECKS]["evidence"] = evidence_check
    elif identity is not None:
        app[IDENTITY] = identity
    if IDENTITY in app:
        e2e.setup(app, app[IDENTITY])  # sealed bodies (cube-e2e/1) open with the HPKE key

    if importlib.util.find_spec("agent.forward") is not None:
        forward = importlib.import_module("agent.forward")
        forward.setup(app)
    else:  # pragma: no cover - only while the forwarding module is being written
        log.warning("agent.forward is missing: no inference routes")
    return app
