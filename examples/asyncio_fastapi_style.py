"""
The shape of an asyncio web service (FastAPI, Starlette...) that pushes database events to
clients, with pgherald.

None of the tutorials gets this far; services built from them usually end up with one of:

- a listener loop started with ``asyncio.create_task`` and never awaited, so when it dies
  (the first connection drop) nobody notices, and it is never stopped on shutdown;
- ``conn.notifies()`` on a connection taken from the application's pool, which that pool then
  hands to a request handler;
- NOTIFY sent on a separate autocommit connection *before* the request's transaction commits,
  so clients hear about rows that then roll back (or cannot see yet).

Here the listener lives for the lifetime of the app: a `pgherald.AsyncListener` runs in a task
group (anyio's here; ``asyncio.TaskGroup`` on Python 3.11+ works the same) next to the other work (request handlers, client connections) and is stopped with
``listener.stop()`` when the app shuts down. A handler fans each notification out to the
connected clients through bounded in-memory queues; a client that stops reading loses its
place instead of stalling the listener. Request handlers send with
``await pgherald.anotify(aconn, ...)`` inside their own ``async with aconn.transaction():``, so
clients hear about committed work only.

In FastAPI, the body of ``service()`` below is what goes in the ``lifespan`` function, and
``Hub.subscribe`` is what a WebSocket or server-sent-events endpoint iterates.

Run it: ``python examples/asyncio_fastapi_style.py`` (``$PGHERALD_DSN`` picks the database).
"""

from __future__ import annotations

import asyncio
import os
import sys

import anyio
import anyio.abc
import psycopg

import pgherald

DSN = os.environ.get("PGHERALD_DSN", "host=127.0.0.1 user=postgres dbname=postgres")

CHANNEL = "chat"
MESSAGES = [("lobby", "hello"), ("lobby", "it's quiet in here"), ("dev", "deploy at 5")]


class Hub:
    """Fans notifications out to in-process subscribers (WebSocket or SSE connections)."""

    def __init__(self, queue_size: int = 100) -> None:
        self._queue_size = queue_size
        self._subscribers: set[asyncio.Queue[dict[str, str] | None]] = set()

    def publish(self, n: pgherald.Notification) -> None:
        """
        The listener's handler (a plain function: it never waits, so it runs inline).

        It never blocks: a client whose queue is full is dropped, not waited for, so one slow
        client cannot stall the listener or the other clients.
        """
        message = n.json()
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.disconnect(queue)  # too slow: it must reconnect and re-read the state

    def connect(self) -> asyncio.Queue[dict[str, str] | None]:
        queue: asyncio.Queue[dict[str, str] | None] = asyncio.Queue(self._queue_size)
        self._subscribers.add(queue)
        return queue

    def disconnect(self, queue: asyncio.Queue[dict[str, str] | None]) -> None:
        """Forget *queue*; its reader gets what is left, then None."""
        if queue in self._subscribers:
            self._subscribers.discard(queue)
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    def close(self) -> None:
        for queue in list(self._subscribers):
            self.disconnect(queue)


async def post_message(aconn: psycopg.AsyncConnection, room: str, text: str) -> str:
    """A request handler: its writes and its notification share one transaction."""
    try:
        async with aconn.transaction():
            # (the INSERT of the message would go here)
            await pgherald.anotify(aconn, CHANNEL, {"room": room, "text": text})
            if not text.strip():
                # Fails after the notify: the rollback takes the notification with it.
                raise ValueError("empty message")
    except ValueError as exc:
        return f"400 {exc} (rolled back: nothing sent)"
    return "201 committed"


async def websocket_client(
    name: str, hub: Hub, expect: int, *, task_status: anyio.abc.TaskStatus[None]
) -> None:
    """Stands in for a connected browser: prints what it is pushed."""
    queue = hub.connect()
    task_status.started()  # subscribed: messages from now on reach this client
    try:
        for _ in range(expect):
            message = await queue.get()
            if message is None:
                break
            print(f"   {name} <- [{message['room']}] {message['text']}")
    finally:
        hub.disconnect(queue)


async def service() -> int:
    hub = Hub()
    async with (
        pgherald.AsyncListener(DSN, channels=[CHANNEL]) as listener,
        await psycopg.AsyncConnection.connect(DSN) as aconn,
    ):
        listener.on(CHANNEL)(hub.publish)
        print(f"startup: listening on {CHANNEL!r} (backend pid {listener.backend_pid})")

        async with anyio.create_task_group() as app:
            app.start_soon(listener.run)

            with anyio.move_on_after(10):  # a safety net for the example
                async with anyio.create_task_group() as clients:
                    await clients.start(websocket_client, "alice", hub, len(MESSAGES))
                    await clients.start(websocket_client, "bob", hub, len(MESSAGES))

                    for room, text in [*MESSAGES[:2], ("lobby", "   "), *MESSAGES[2:]]:
                        status = await post_message(aconn, room, text)
                        print(f"POST /rooms/{room}/messages {text!r} -> {status}")
                # Here every client has had all its messages.

            print("shutdown: stopping the listener")
            listener.stop()  # run() returns; the task group then exits
            hub.close()
        stats = listener.stats
    print(f"received {stats.received} notifications, handler errors {stats.handler_errors}")
    return 0 if stats.received == len(MESSAGES) and stats.handler_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(service()))
