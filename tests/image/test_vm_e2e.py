"""The appliance end to end: the real image, booted under QEMU with a swtpm vTPM, verified by a
real cube-proxy against the policy `cube measure` computed from the build alone.

1. A cube-proxy (SQLite) with a domain ``vm``; its issuer keys go inline into the agent
   configuration, whose SHA-256 the UKI's measured command line then carries.
2. scripts/build-image (the root is cached; only the UKI and disk are re-assembled) and
   `cube measure` → policy.json. Nothing is learned from a running VM.
3. The domain's policy is that file; its backend is the VM's agent (scripts/run-vm).
4. Through the proxy: the evidence is verified (vTPM quote, measured-boot PCRs 4/7/9/11 replayed
   from the event log, PCR 15 runtime events) and a chat completion reaches the VM's
   llama-server and comes back.
5. The same image with one more word on its kernel command line (a re-assembled UKI) boots as a
   second domain's backend with the same policy: the proxy refuses it (503 naming the PCR).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest

from agent.server import free_port
from tests.image.vm import ROOT, VirtualMachine, build_image
from tests.proxy.processes import ProxyProcess

pytestmark = pytest.mark.slow
T = TypeVar("T")

CACHE = Path.home() / ".cache" / "cube"
MODEL_MANIFEST = "cube-model.json"
PASSWORD = "vm-owner-password-5d1e"


def model_manifest() -> dict[str, Any]:
    cache = Path(os.environ.get("CUBE_CACHE") or CACHE)
    model_dir = cache / "models" / "cube-tiny-gguf"
    subprocess.run(
        [str(ROOT / "scripts" / "make-tiny-gguf"), str(model_dir)],
        check=True,
        capture_output=True,
        timeout=1800,
    )
    manifest: dict[str, Any] = json.loads((model_dir / MODEL_MANIFEST).read_text())
    return manifest


def agent_config(proxy: ProxyProcess, domain: str, model: dict[str, Any]) -> dict[str, Any]:
    jwks = proxy.request("GET", "/.well-known/jwks.json").json()
    return {
        "format": "cube-agent-config/1",
        "backend": "openai",
        "backend_url": "http://127.0.0.1:8000",
        "model_name": model["name"],
        "model_dir": "/srv/model",
        "model_digest": model["digest"],
        "jwt_issuer": proxy.url,
        "jwt_audience": domain,
        "jwks": jwks,
        "tee": "none",
        "tpm": "device:/dev/tpmrm0",
    }


def eventually(probe: Callable[[], list[T]], timeout: float = 15) -> list[T]:
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value or time.monotonic() > deadline:
            assert value, "timed out waiting"
            return value
        time.sleep(0.2)


def cube_verify(url: str, policy: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cube.cli", "verify", url, "--policy", str(policy)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
    )


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[ProxyProcess]:
    with ProxyProcess(str(tmp_path / "proxy.db"), tmp_path / "proxy.log") as running:
        yield running


def serve_from(proxy: ProxyProcess, admin: str, alias: str, vm: VirtualMachine, model: str) -> str:
    """Register the VM's agent as the domain's backend; return the owner's session token."""
    proxy.admin(
        "POST",
        f"/admin/domains/{alias}/backends",
        {"url": vm.url, "kind": "openai", "models": [model]},
        token=admin,
    )
    return proxy.login("owner@cube.test", PASSWORD)


def add_domain(proxy: ProxyProcess, admin: str, alias: str, owner: str, policy: Any) -> None:
    proxy.admin("POST", "/admin/domains", {"alias": alias}, token=admin)
    proxy.admin(
        "POST", f"/admin/domains/{alias}/members", {"user_id": owner, "role": "admin"}, token=admin
    )
    proxy.admin("PUT", f"/admin/domains/{alias}/policy", policy, token=admin)


def test_the_image_boots_attests_and_serves_through_the_proxy(
    proxy: ProxyProcess, tmp_path: Path
) -> None:
    started = time.monotonic()
    figures: dict[str, float] = {}
    admin = proxy.login()
    owner = proxy.admin(
        "POST", "/admin/users", {"email": "owner@cube.test", "password": PASSWORD}, token=admin
    )["id"]
    model = model_manifest()

    # The configuration binds the proxy's issuer keys; the build binds the configuration.
    config_path = tmp_path / "agent-config.json"
    config_path.write_text(json.dumps(agent_config(proxy, "vm", model), indent=2) + "\n")
    build = tmp_path / "build"
    figures["build_s"] = build_image(build, config_path, log=tmp_path / "build.log")
    policy = json.loads((build / "policy.json").read_text())
    measurements = json.loads((build / "measurements.json").read_text())
    assert "vtpm" in policy["platforms"]
    pinned = policy["vtpm"]["pcrs"]["sha256"]
    assert {"4", "11"} <= set(pinned), pinned
    sums = (build / "SHA256SUMS").read_text()
    assert "cube.efi" in sums and "measurements.json" in sums
    assert measurements  # written by `cube measure` from the build outputs

    add_domain(proxy, admin, "vm", owner, policy)
    port = free_port()
    vm = VirtualMachine(build, port, tmp_path / "serial.log", tmp_path / "run-vm.log").start()
    try:
        figures["boot_s"] = vm.wait_for_agent()
        session = serve_from(proxy, admin, "vm", vm, model["name"])
        with openai.OpenAI(
            base_url=f"{proxy.url}/vm/v1", api_key=session, max_retries=0, timeout=300
        ) as client:
            t0 = time.monotonic()
            completion = client.chat.completions.create(
                model=model["name"],
                messages=[{"role": "user", "content": "Hello from the host"}],
                max_tokens=8,
                temperature=0,
            )
            figures["first_chat_s"] = time.monotonic() - t0
        assert completion.choices[0].message.content is not None
        assert completion.usage is not None and completion.usage.completion_tokens > 0

        # The proxy verified evidence before forwarding: the audit row names it (audit rows
        # are written in batches, off the request path).
        def chat_rows() -> list[dict[str, Any]]:
            audit = proxy.admin("GET", "/admin/domains/vm/audit?event=request", token=admin)
            return [r for r in audit["audit"] if r["route"] == "/v1/chat/completions"]

        rows = eventually(chat_rows)
        assert rows[0]["status"] == 200
        assert rows[0]["evidence_digest"].startswith("sha256:")
        # The same evidence, verified directly (no proxy) by `cube verify` against the same policy:
        # quote, event log replay, PCRs 4/7/9/11/15, TLS binding.
        verified = cube_verify(vm.url, build / "policy.json")
        assert verified.returncode == 0, verified.stdout + verified.stderr
        console = vm.console(200_000)
        assert "Hello from the host" not in console  # no request content on the console
    finally:
        vm.stop()

    # The same image, one more word on the measured command line: other PCRs, refused.
    changed = tmp_path / "build-changed"
    figures["rebuild_s"] = build_image(
        changed, config_path, extra_cmdline="cube.test=changed", log=tmp_path / "build.log"
    )
    assert (changed / "cube.efi").read_bytes() != (build / "cube.efi").read_bytes()
    add_domain(proxy, admin, "vm2", owner, policy)
    port2 = free_port()
    vm2 = VirtualMachine(changed, port2, tmp_path / "serial2.log", tmp_path / "run-vm2.log")
    vm2.start()
    try:
        figures["boot2_s"] = vm2.wait_for_agent()
        session = serve_from(proxy, admin, "vm2", vm2, model["name"])
        reply = proxy.request(
            "POST",
            "/vm2/v1/chat/completions",
            {"model": model["name"], "messages": [{"role": "user", "content": "hi"}]},
            token=session,
        )
        assert reply.status == 503, reply.body
        error = reply.json()["error"]
        assert error["code"] == "attestation_failed"
        assert "pcr" in error["message"].lower(), error["message"]
        refused = cube_verify(vm2.url, build / "policy.json")
        assert refused.returncode == 5, refused.stdout + refused.stderr  # a policy failure
    finally:
        vm2.stop()
    figures["total_s"] = time.monotonic() - started
    print("vm e2e figures:", json.dumps({k: round(v, 1) for k, v in figures.items()}))
