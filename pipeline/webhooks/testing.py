"""A platform's webhook endpoint for tests: a real HTTP/1.1 server on a loopback port, answering from a script.

:class:`ScriptedReceiver` imitates what the deliverer meets in the wild (a receiver written to the contract in
:mod:`pipeline.webhooks.signing`): it answers each request with the next action of its script, then with
``default`` once the script is used up: :class:`Respond` (a status), :class:`Hang` (read the request, answer
nothing for a while, then drop the connection: a timeout for the sender) or :class:`Drop` (close at once: a
connection error). Every request is recorded with its headers, body, the parsed delivery and whether its signature
verified. It speaks only what the sender uses (one POST per connection, ``Content-Length`` bodies) and refuses
anything else with 400, as a strict server would.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

from pipeline.schemas import WebhookDelivery
from pipeline.webhooks.signing import DELIVERY_HEADER, SIGNATURE_HEADER, verify

MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class Respond:
    status: int = 200


@dataclass(frozen=True)
class Hang:
    seconds: float


@dataclass(frozen=True)
class Drop:
    pass


Action = Respond | Hang | Drop


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    delivery: WebhookDelivery | None
    signature_ok: bool
    action: Action

    @property
    def accepted(self) -> bool:
        """Answered 2xx: the sender counts it delivered."""
        return isinstance(self.action, Respond) and 200 <= self.action.status < 300


@dataclass
class ScriptedReceiver:
    secret: str | None = None
    script: list[Action] = field(default_factory=list)
    default: Action = field(default_factory=Respond)
    received: list[Received] = field(default_factory=list)
    path: str = "/hooks/modpipe"

    async def start(self) -> str:
        """Listen on a free loopback port; returns the callback URL."""
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self._tasks: set[asyncio.Task[None]] = set()
        return f"http://127.0.0.1:{port}{self.path}"

    async def stop(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()

    def accepted(self) -> list[WebhookDelivery]:
        """Deliveries this receiver answered 2xx, in the order they came."""
        return [r.delivery for r in self.received if r.accepted and r.delivery is not None]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            request = await self._read(reader)
            if request is None:
                await self._answer(writer, 400)
                return
            headers, body = request
            action = self.script.pop(0) if self.script else self.default
            try:
                delivery: WebhookDelivery | None = WebhookDelivery.model_validate_json(body)
            except ValueError:
                delivery = None
            signed = self.secret is not None and verify(self.secret, headers.get(SIGNATURE_HEADER.lower()), body)
            self.received.append(Received(headers, body, delivery, signed, action))
            if isinstance(action, Hang):
                await asyncio.sleep(action.seconds)
            elif isinstance(action, Respond):
                await self._answer(writer, action.status)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            pass  # the receiver is stopping: drop the connection (the sender sees it as a connection error)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            if task is not None:
                self._tasks.discard(task)

    async def _read(self, reader: asyncio.StreamReader) -> tuple[dict[str, str], bytes] | None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = (lines[0].split(" ") + ["", ""])[:3]
        if method != "POST" or target != self.path:
            return None
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        try:
            length = int(headers.get("content-length", ""))
        except ValueError:
            return None
        if not 0 <= length <= MAX_BODY_BYTES or DELIVERY_HEADER.lower() not in headers:
            return None
        return headers, await reader.readexactly(length)

    @staticmethod
    async def _answer(writer: asyncio.StreamWriter, status: int) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
