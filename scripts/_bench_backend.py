"""A fast fake OpenAI backend for scripts/bench-proxy: answers every request at once.

Serves the same canned answers on two ports:

- plain HTTP, for the direct baseline, nginx and LiteLLM;
- HTTPS with a fresh self-signed certificate *and* ``GET /attestation?nonce=`` serving
  simulated SEV-SNP evidence (``cube-evidence/1``, from the project's simulator) whose claims
  name that certificate, so cube-proxy's attestation gate accepts it as an agent. cube-proxy
  therefore pays for TLS on its upstream hop, which the others do not.

A minimal HTTP/1.1 server on asyncio's protocol API (keep-alive, Content-Length bodies), so
the backend is never what limits the measurement. Not a general HTTP server.

    python scripts/_bench_backend.py --port P --tls-port Q --ready-file F
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import hashlib
import json
import os
import signal
import ssl
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "cube-tiny"
MODEL_DIGEST = "sha256:" + "ab" * 32
CONFIG_DIGEST = "sha256:" + "cd" * 32

_CHAT = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello, world!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
    },
    separators=(",", ":"),
).encode()


def _event(delta: dict[str, object], finish: str | None) -> bytes:
    data = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


_EVENTS = [
    _event({"role": "assistant", "content": ""}, None),
    *(_event({"content": t}, None) for t in ("Hello", ",", " world", "!")),
    _event({}, "stop"),
    b"data: "
    + json.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": MODEL,
            "choices": [],
            "usage": {"prompt_tokens": 11, "completion_tokens": 4, "total_tokens": 15},
        },
        separators=(",", ":"),
    ).encode()
    + b"\n\n",
    b"data: [DONE]\n\n",
]
_STREAM = b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in _EVENTS) + b"0\r\n\r\n"
_MODELS = json.dumps(
    {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "bench"}]}
).encode()


def _response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n"
    ).encode() + body


_CHAT_RESPONSE = _response("200 OK", _CHAT)
_STREAM_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n" + _STREAM
)
_MODELS_RESPONSE = _response("200 OK", _MODELS)
_HEALTH_RESPONSE = _response("200 OK", b'{"status":"ok"}')
_NOT_FOUND = _response("404 Not Found", b'{"error":{"message":"not found"}}')


class Evidence:
    """Simulated SEV-SNP evidence whose claims name this server's certificate."""

    def __init__(self, cert_der: bytes) -> None:
        from attestation.evidence import EvidenceCollector
        from attestation.guest import ConfigfsTsm
        from attestation.sim import EmulatedConfigfsTsm

        emulation = EmulatedConfigfsTsm.snp()
        self.collector = EvidenceCollector(tee=ConfigfsTsm(emulation.root, fs=emulation))
        self.cert_sha256 = hashlib.sha256(cert_der).hexdigest()

    def document(self, nonce_hex: str) -> bytes:
        from attestation.evidence import encode_claims, parse_nonce

        now = dt.datetime.now(dt.UTC).replace(microsecond=0)
        claims = encode_claims(
            {
                "tls_cert_sha256": self.cert_sha256,
                "model": {"name": MODEL, "digest": MODEL_DIGEST},
                "config_digest": CONFIG_DIGEST,
                "agent_version": "bench",
                "issued_at": now.isoformat().replace("+00:00", "Z"),
            }
        )
        return self.collector.collect(parse_nonce(nonce_hex), claims)


class Http(asyncio.Protocol):
    evidence: Evidence | None = None

    def __init__(self) -> None:
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buffer[:end].decode("latin-1")
            lines = head.split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            length = 0
            for line in lines[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            assert self.transport is not None
            self.transport.write(self.answer(method, target, body))

    def answer(self, method: str, target: str, body: bytes) -> bytes:
        path = target.split("?", 1)[0]
        if method == "POST" and path == "/v1/chat/completions":
            if b'"stream":true' in body or b'"stream": true' in body:
                return _STREAM_RESPONSE
            return _CHAT_RESPONSE
        if path == "/v1/models":
            return _MODELS_RESPONSE
        if path == "/health":
            return _HEALTH_RESPONSE
        if path == "/attestation" and self.evidence is not None:
            nonce = parse_qs(urlsplit(target).query).get("nonce", [""])[0]
            try:
                document = self.evidence.document(nonce)
            except Exception as exc:  # the bench's gate refuses what this refuses
                return _response("400 Bad Request", json.dumps({"error": str(exc)}).encode())
            return _response("200 OK", document)
        return _NOT_FOUND


class TlsHttp(Http):
    pass


def _self_signed(directory: Path) -> tuple[Path, Path, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench-agent")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file, cert.public_bytes(serialization.Encoding.DER)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-port", type=int, required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--cert-out", help="write the HTTPS port's certificate (PEM) here")
    args = parser.parse_args()
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file, der = _self_signed(Path(tmp))
        if args.cert_out:
            Path(args.cert_out).write_bytes(cert_file.read_bytes())
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert_file, key_file)
        TlsHttp.evidence = Evidence(der)
        TlsHttp.evidence.document(os.urandom(32).hex())  # warm the simulator's keys
        plain = await loop.create_server(Http, "127.0.0.1", args.port, backlog=1024)
        tls = await loop.create_server(TlsHttp, "127.0.0.1", args.tls_port, ssl=ctx, backlog=1024)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        Path(args.ready_file).write_text(str(time.time()))
        await stop.wait()
        plain.close()
        tls.close()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # the stdlib loop: slower, the table says which ran
        asyncio.run(main())
    else:
        uvloop.run(main())
