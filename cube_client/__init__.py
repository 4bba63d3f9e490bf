"""Cube's client side: verify an agent (or an agent behind a proxy) for yourself, and talk to it
over a transport that refuses anything unattested, with request and response bodies sealed
end to end to the attested VM (``cube-e2e/1``, docs/e2e-encryption.md).

>>> import openai
>>> from cube_client import attested_http_client
>>> client = openai.OpenAI(base_url=f"{url}/v1", api_key=token,
...                        http_client=attested_http_client(url, policy))
"""

from cube_client._errors import ClientError, EncryptionError, PlaintextRefusedError
from cube_client._transport import (
    AsyncAttestedClient,
    AsyncAttestedTransport,
    AttestedClient,
    AttestedTransport,
    attested_async_http_client,
    attested_http_client,
)
from cube_client._verify import (
    AttestedEndpoint,
    averify_endpoint,
    parse_endpoint,
    verify_endpoint,
)

__all__ = [
    "AsyncAttestedClient",
    "AsyncAttestedTransport",
    "AttestedClient",
    "AttestedEndpoint",
    "AttestedTransport",
    "ClientError",
    "EncryptionError",
    "PlaintextRefusedError",
    "attested_async_http_client",
    "attested_http_client",
    "averify_endpoint",
    "parse_endpoint",
    "verify_endpoint",
]
