"""The signals that stop cube-proxy and cube-agent cleanly."""

from __future__ import annotations

import signal

__all__ = ["stop_signals"]


def stop_signals() -> tuple[signal.Signals, ...]:
    """SIGTERM, SIGINT, and SIGHUP (a closed terminal or SSH session) unless this process was
    started ignoring it (``nohup``): then whoever started it asked it to outlive the hangup."""
    found = [signal.SIGTERM, signal.SIGINT]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        found.append(signal.SIGHUP)
    return tuple(found)
