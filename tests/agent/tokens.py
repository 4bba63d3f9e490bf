"""A test token issuer: keys, a JWKS document, and JWTs shaped like the proxy's.

Token contract (what the agent verifies): ``iss``, ``aud`` (the domain), ``sub``, ``exp``,
``iat`` required, ``nbf`` honoured, ``kid`` header required and known, asymmetric algorithms
only (EdDSA, ES256, RS256). ``scope`` is space-separated: ``inference`` is required for any
inference; ``model:<name>`` entries restrict models; ``endpoint:<name>`` entries restrict
endpoints (models, chat, completions, embeddings, ollama).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

ISSUER = "https://issuer.cube.test"
AUDIENCE = "domain-a"


class TokenIssuer:
    def __init__(self, *, issuer: str = ISSUER, audience: str = AUDIENCE) -> None:
        self.issuer = issuer
        self.audience = audience
        self.keys: dict[str, tuple[str, Any]] = {
            "ed-1": ("EdDSA", ed25519.Ed25519PrivateKey.generate()),
            "es-1": ("ES256", ec.generate_private_key(ec.SECP256R1())),
            "rs-1": ("RS256", rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        }

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, (alg, key) in self.keys.items():
            public = key.public_key()
            if alg == "EdDSA":
                jwk = json.loads(OKPAlgorithm.to_jwk(public))
            elif alg == "ES256":
                jwk = json.loads(ECAlgorithm.to_jwk(public))
            else:
                jwk = json.loads(RSAAlgorithm.to_jwk(public))
            jwk.update({"kid": kid, "alg": alg, "use": "sig"})
            out.append(jwk)
        return {"keys": out}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": "user-1",
            "iat": now,
            "nbf": now - 5,
            "exp": now + 300,
            "jti": uuid.uuid4().hex,
            "scope": "inference",
        }
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(
        self, *, kid: str = "ed-1", headers: dict[str, Any] | None = None, **claims: Any
    ) -> str:
        alg, key = self.keys[kid]
        return jwt.encode(
            self.claims(**claims), key, algorithm=alg, headers={"kid": kid, **(headers or {})}
        )

    def bearer(self, **kwargs: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(**kwargs)}"}
