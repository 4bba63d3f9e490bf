"""``cube chat URL``: a small chat client over the attested transport.

It verifies the endpoint (agent or proxy domain) against a policy, shows what it verified once at
the top (on stderr, so stdout carries only the answers), then sends prompts with the ``openai``
SDK over :func:`cube_client.attested_http_client`: bodies sealed end to end to the attested
agent (``cube-e2e/1``) unless ``--no-encrypt`` (direct to an agent only: through a proxy a
plaintext body would be readable there, and the transport refuses it). Tokens are printed as
they arrive.

The banner describes the very verification the requests then go to (the transport's own). What
the service or its evidence says is shown with control characters escaped (``\x1b`` as the text
``\x1b``; answers keep their line breaks and tabs): it cannot drive the terminal.

Interactive on a terminal (``/quit`` or end of input leaves); otherwise the whole of stdin is
one prompt, answered once: ``echo hi | cube chat URL --policy FILE``. Exit codes: 0, 2 usage,
3-7 as ``cube verify`` when the endpoint is not accepted, 1 when the service answers an error
or fails while answering.
Every flag is also read from ``CUBE_CHAT_<FLAG>``; the credential also from ``CUBE_API_KEY``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from attestation.errors import AttestationError, InvalidPolicyError, MalformedError
from attestation.policy import Policy
from cube.verify_cli import load_reference, reference_source, ssl_context

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletionMessageParam

    from cube_client import AttestedEndpoint

__all__ = ["chat"]

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _shown(text: str, *, keep: str = "") -> str:
    from cube_client._text import printable

    return printable(text, keep=keep)


def _err(message: str) -> None:
    """One line on stderr; it may quote the service or its evidence, so it is made printable."""
    click.echo(_shown(message), err=True)


def _refused(error: AttestationError) -> NoReturn:
    _err(f"cube chat: not accepted ({error.failure_class}): {error.message}")
    sys.exit(error.exit_code)


def _banner(found: AttestedEndpoint, *, encrypt: bool, model: str) -> None:
    evidence = found.evidence
    claims = evidence.claims
    where = "through a proxy domain" if found.via_proxy else "direct to the agent"
    _err(f"cube chat: {found.url} ({where})")
    platform = evidence.platform
    if evidence.simulated:
        platform += "  !! SIMULATED: Cube's simulator, NOT a real TEE (development only)"
    _err(f"  verified   {platform}")
    _err(f"  model      {claims.model_name} {claims.model_digest}")
    _err(f"  config     {claims.config_digest}")
    if encrypt:
        e2e = "ON: bodies sealed to the attested HPKE key"
        e2e += " (the proxy forwards ciphertext)" if found.via_proxy else ""
    else:
        e2e = "OFF: plaintext over TLS pinned to the attested certificate"
    _err(f"  E2E        {e2e}")
    if model != claims.model_name:
        _err(f"  note       asking for {model!r}; the attested agent serves {claims.model_name!r}")
    _err("")


def _stream(
    client: openai.OpenAI, model: str, messages: list[ChatCompletionMessageParam], **extra: Any
) -> Iterator[str]:
    stream = client.chat.completions.create(model=model, messages=messages, stream=True, **extra)
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                yield choice.delta.content


def _answer(
    client: openai.OpenAI, model: str, messages: list[ChatCompletionMessageParam], **extra: Any
) -> str:
    import openai

    pieces: list[str] = []
    try:
        for piece in _stream(client, model, messages, **extra):
            pieces.append(piece)
            sys.stdout.write(_shown(piece, keep="\n\t"))
            sys.stdout.flush()
    except openai.APIConnectionError as exc:
        sys.stdout.write("\n")
        cause = exc.__cause__
        if isinstance(cause, AttestationError):
            _refused(cause)
        _err(f"cube chat: connection failed: {exc}")
        sys.exit(1)
    except openai.APIStatusError as exc:
        _err(f"cube chat: the service answered {exc.status_code}: {exc.message}")
        sys.exit(1)
    except AttestationError as exc:
        # Raised while the stream is read (a sealed answer cut off or tampered with): the SDK
        # passes it through unwrapped. What was printed is not the whole answer.
        sys.stdout.write("\n")
        _refused(exc)
    except openai.APIError as exc:
        # The stream carried an error event (the backend failed mid-answer): the SDK raises
        # the bare APIError. What was printed is not the whole answer.
        sys.stdout.write("\n")
        _err(f"cube chat: the service failed while answering: {exc.message}")
        sys.exit(1)
    except Exception as exc:  # fail closed, never a traceback
        sys.stdout.write("\n")
        _err(f"cube chat: the answer could not be read ({type(exc).__name__})")
        sys.exit(1)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


@click.command("chat")
@click.argument("url", envvar="CUBE_CHAT_URL")
@click.option(
    "--policy",
    "policy_path",
    type=_FILE,
    envvar="CUBE_CHAT_POLICY",
    help="A cube-policy/1 file the endpoint must satisfy.",
)
@click.option(
    "--reference",
    "reference_path",
    type=_FILE,
    envvar="CUBE_CHAT_REFERENCE",
    help="A release's reference values (as cube verify --reference).",
)
@click.option(
    "--api-key",
    "--token",
    "api_key",
    envvar=["CUBE_CHAT_API_KEY", "CUBE_API_KEY"],
    help="A PAT (proxy) or access token (agent).",
)
@click.option("--model", envvar="CUBE_CHAT_MODEL", help="Default: the attested model.")
@click.option(
    "--encrypt/--no-encrypt",
    default=True,
    envvar="CUBE_CHAT_ENCRYPT",
    help="End-to-end encryption to the attested agent (default on).",
)
@click.option(
    "--via-proxy/--direct",
    "via_proxy",
    default=None,
    envvar="CUBE_CHAT_VIA_PROXY",
    help="The URL is a proxy domain / the agent (default: by its path).",
)
@click.option("--ca", type=_FILE, envvar="CUBE_CHAT_CA", help="CA bundle for a proxy's TLS.")
@click.option("--system", envvar="CUBE_CHAT_SYSTEM", help="A system message.")
@click.option("--max-tokens", type=click.IntRange(min=1), envvar="CUBE_CHAT_MAX_TOKENS")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=600.0,
    show_default=True,
    envvar="CUBE_CHAT_TIMEOUT",
    help="Seconds per request.",
)
def chat(
    *,
    url: str,
    policy_path: Path | None,
    reference_path: Path | None,
    api_key: str | None,
    model: str | None,
    encrypt: bool,
    via_proxy: bool | None,
    ca: Path | None,
    system: str | None,
    max_tokens: int | None,
    timeout: float,
) -> None:
    """Chat with a verified agent (directly or through a proxy domain), streaming the answer.

    \b
    echo "hello" | CUBE_API_KEY="$PAT" cube chat https://proxy.example/acme --policy policy.json
    CUBE_API_KEY="$JWT" cube chat https://127.0.0.1:8443 --policy policy.json --no-encrypt

    (The key in the environment, not as --api-key: arguments are visible to every user in ps.)
    """
    source = reference_source(policy_path, reference_path)
    if not api_key:
        raise click.UsageError("give --api-key (a PAT, or an access token), or set CUBE_API_KEY")
    interactive = sys.stdin.isatty()
    one_prompt = None if interactive else sys.stdin.read().strip()
    if one_prompt == "":
        raise click.UsageError("nothing to send: stdin was empty")

    import openai

    from cube_client import AttestedClient, AttestedTransport, parse_endpoint
    from cube_client._verify import check_api_key

    try:
        check_api_key(api_key, check="chat.api_key")
    except MalformedError as exc:
        raise click.UsageError(exc.message) from None
    context = ssl_context(ca)
    try:
        policy: Policy = load_reference(source)
        proxied = parse_endpoint(url, via_proxy).via_proxy
        if proxied and not encrypt:
            raise click.UsageError(
                "--no-encrypt through a proxy would let the proxy read every prompt and answer "
                "(TLS ends there): the attested transport refuses plaintext bodies via a proxy"
            )
        transport = AttestedTransport(
            url,
            policy,
            encrypt=encrypt,
            via_proxy=via_proxy,
            ca=context,
            api_key=api_key,
            verify_timeout=min(timeout, 60),
        )
        # Verified through the transport itself: the banner shows the verification the
        # requests go to (a second, separate one could reach another agent behind a proxy).
        found = transport.verify()
    except InvalidPolicyError as exc:
        _refused(exc)
    except AttestationError as exc:
        _refused(exc)
    except click.ClickException:
        raise
    except Exception as exc:  # fail closed, never a traceback
        _refused(MalformedError(f"verification failed ({type(exc).__name__})"))
    chosen = model or found.evidence.claims.model_name
    _banner(found, encrypt=encrypt, model=chosen)
    http = AttestedClient(transport, timeout=timeout)
    extra: dict[str, Any] = {} if max_tokens is None else {"max_tokens": max_tokens}
    messages: list[ChatCompletionMessageParam] = []
    if system:
        messages.append({"role": "system", "content": system})
    base_url = f"{parse_endpoint(url, via_proxy).url}/v1"
    with openai.OpenAI(
        base_url=base_url, api_key=api_key, http_client=http, max_retries=0
    ) as client:
        if one_prompt is not None:
            messages.append({"role": "user", "content": one_prompt})
            _answer(client, chosen, messages, **extra)
            return
        _err("Type a message; /quit or Ctrl-D to leave.")
        while True:
            try:
                line = input("you> ").strip()
            except (EOFError, KeyboardInterrupt):
                _err("")
                return
            if not line:
                continue
            if line in ("/quit", "/exit"):
                return
            messages.append({"role": "user", "content": line})
            reply = _answer(client, chosen, messages, **extra)
            messages.append({"role": "assistant", "content": reply})
