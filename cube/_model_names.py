"""Model names as Ollama reads them: shared by the agent (token scopes, the configured model)
and the proxy (credential scopes, a backend's model list), so that both treat ``llama3.2``,
``llama3.2:latest`` and ``library/llama3.2`` as the one model Ollama does."""

from __future__ import annotations

from typing import Final

__all__ = ["OLLAMA_DEFAULT_HOST", "OLLAMA_DEFAULT_NAMESPACE", "ollama_canonical"]

OLLAMA_DEFAULT_HOST: Final = "registry.ollama.ai"
OLLAMA_DEFAULT_NAMESPACE: Final = "library"
_DEFAULT_TAG: Final = "latest"


def ollama_canonical(name: str) -> str:
    """Ollama's fully qualified form of a model name: ``host/namespace/model:tag[@digest]``.

    Ollama fills in ``registry.ollama.ai``, ``library`` and ``latest`` where a name omits them.
    Case is kept: treating two spellings as one model is only safe where Ollama does too.
    A name of more than three path parts is returned unchanged (it then matches only itself).
    """
    digest = ""
    at = name.find("@")
    if at >= 0:
        name, digest = name[:at], name[at:]
    tag = _DEFAULT_TAG
    colon, slash = name.rfind(":"), name.rfind("/")
    if colon > slash:  # a colon before the last slash is a registry port, not a tag
        name, tag = name[:colon], name[colon + 1 :]
    parts = name.split("/")
    if len(parts) == 1:
        host, namespace, model = OLLAMA_DEFAULT_HOST, OLLAMA_DEFAULT_NAMESPACE, parts[0]
    elif len(parts) == 2:
        host, namespace, model = OLLAMA_DEFAULT_HOST, parts[0], parts[1]
    elif len(parts) == 3:
        host, namespace, model = parts
    else:
        return name + (":" + tag if colon > slash else "") + digest
    return f"{host}/{namespace}/{model}:{tag}{digest}"
