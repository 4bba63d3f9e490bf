"""Helpers for the appliance image tests: build (scripts/build-image) and boot (scripts/run-vm)."""

from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"


def build_image(out: Path, agent_config: Path, *, extra_cmdline: str = "", log: Path) -> float:
    """Run scripts/build-image (the root is cached between runs); return its wall time."""
    args = [str(SCRIPTS / "build-image"), "--agent-config", str(agent_config), "--out", str(out)]
    if extra_cmdline:
        args += ["--extra-cmdline", extra_cmdline]
    start = time.monotonic()
    with log.open("ab") as sink:
        result = subprocess.run(
            args, stdout=sink, stderr=subprocess.STDOUT, check=False, timeout=3600
        )
    if result.returncode != 0:
        tail = log.read_bytes()[-4000:].decode(errors="replace")
        raise RuntimeError(f"scripts/build-image failed ({result.returncode}):\n{tail}")
    return time.monotonic() - start


class VirtualMachine:
    """scripts/run-vm in its own process group; ``stop()`` sends SIGTERM (clean stop)."""

    def __init__(self, build: Path, port: int, serial: Path, log: Path) -> None:
        self.build = build
        self.port = port
        self.serial = serial
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> VirtualMachine:
        with self.log.open("ab") as sink:
            self.proc = subprocess.Popen(
                [
                    str(SCRIPTS / "run-vm"),
                    str(self.build),
                    "--port",
                    str(self.port),
                    "--serial",
                    str(self.serial),
                ],
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def console(self, size: int = 6000) -> str:
        try:
            return self.serial.read_bytes()[-size:].decode(errors="replace")
        except OSError:
            return ""

    def wait_for_agent(self, timeout: float = 900) -> float:
        """Seconds until the agent inside answers /health over HTTPS."""
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # the agent's certificate is pinned by evidence
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(
                    f"the VM stopped ({self.proc.returncode}); console:\n{self.console()}"
                )
            try:
                with urllib.request.urlopen(
                    f"{self.url}/health", timeout=5, context=context
                ) as response:
                    if response.status == 200:
                        return time.monotonic() - start
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(2)
        raise RuntimeError(f"the agent did not come up in {timeout} s; console:\n{self.console()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)
