"""A recording TCP relay for tests: what a proxy, a network or a man in the middle would see.

It listens on loopback, connects each client connection to an upstream, pipes the bytes both
ways and records them. With ``server_ssl`` it terminates TLS itself (it then sees plaintext and
presents that context's certificate: a TLS-terminating interceptor, or, with an agent's own
identity, a transparent window onto what the agent receives); with ``upstream_ssl`` it speaks TLS
to the upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


class RecordingRelay:
    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        server_ssl: ssl.SSLContext | None = None,
        upstream_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.server_ssl = server_ssl
        self.upstream_ssl = upstream_ssl
        self.to_upstream = bytearray()
        self.to_client = bytearray()
        #: Applied to what goes to the client (an active man in the middle); None: untouched.
        self.rewrite_to_client: Callable[[bytes], bytes] | None = None
        self.connections = 0
        self.port = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        scheme = "https" if self.server_ssl is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def start(self) -> RecordingRelay:
        self._thread.start()
        self._call(self._listen())
        return self

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, "127.0.0.1", self.port, ssl=self.server_ssl, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def _close_server(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def restart(self, server_ssl: ssl.SSLContext | None) -> None:
        """Listen again on the same port, presenting another certificate (a swap)."""
        self.server_ssl = server_ssl
        self._call(self._close_server())
        self._call(self._listen())

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._close_server())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def clear(self) -> None:
        with self._lock:
            self.to_upstream.clear()
            self.to_client.clear()

    def seen(self) -> bytes:
        """Everything recorded, both directions."""
        with self._lock:
            return bytes(self.to_upstream) + b"\n" + bytes(self.to_client)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        try:
            host, port = self.upstream
            up_reader, up_writer = await asyncio.open_connection(
                host,
                port,
                ssl=self.upstream_ssl,
                server_hostname=None if self.upstream_ssl is None else host,
            )
        except OSError:
            writer.close()
            self._tasks.discard(task)
            return
        try:
            await asyncio.gather(
                self._pipe(reader, up_writer, self.to_upstream),
                self._pipe(up_reader, writer, self.to_client, rewrite=True),
                return_exceptions=True,
            )
        except (asyncio.CancelledError, ConnectionError, ssl.SSLError):
            pass
        finally:
            for w in (writer, up_writer):
                with contextlib.suppress(Exception):
                    w.close()
            self._tasks.discard(task)

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        record: bytearray,
        *,
        rewrite: bool = False,
    ) -> None:
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                with self._lock:
                    record.extend(data)
                if rewrite and self.rewrite_to_client is not None:
                    data = self.rewrite_to_client(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                if writer.can_write_eof():
                    writer.write_eof()
