"""The gateway's per-client write path: hand-started writes, hand-over to the client's task."""

from __future__ import annotations

import asyncio

import pytest

from pgherald.contrib.gateway.client import Client
from pgherald.contrib.gateway.frames import Frame


class _Drops:
    def __init__(self) -> None:
        self.count = 0

    def inc(self) -> None:
        self.count += 1


class _Metrics:
    def __init__(self) -> None:
        self.drops = _Drops()


class FakeHub:
    """What a `Client` uses of its hub: buffer size, metrics, the dirty list."""

    def __init__(self, inline: bool = True, client_buffer: int = 100) -> None:
        self.inline = inline
        self.client_buffer = client_buffer
        self.metrics = _Metrics()
        self.frames_out = 0
        self.grace = 5.0
        self.dirty_clients: list[Client] = []

    def dirty(self, client: Client) -> None:
        self.dirty_clients.append(client)

    def flush(self) -> None:
        dirty, self.dirty_clients = self.dirty_clients, []
        for client in dirty:
            client.flush()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # hand-started writes are asyncio's (trio clients always use their task)


def frames(*names: str) -> list[Frame]:
    return [Frame("ch", name) for name in names]


class Recorder:
    """A write function; writes wait on `gate` when it is set (a slow client)."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.gate: asyncio.Future[None] | None = None
        self.finished: list[str] = []
        self.fail: Exception | None = None

    async def __call__(self, batch: list[Frame]) -> None:
        self.writes.append([f.payload for f in batch])
        if self.fail is not None:
            raise self.fail
        try:
            if self.gate is not None:
                await self.gate
        finally:
            self.finished.append(batch[-1].payload)


class DirectRecorder:
    """A direct write function: takes the frames at once while `open`, raises `fail`."""

    def __init__(self) -> None:
        self.writes: list[list[str]] = []
        self.open = True
        self.fail: Exception | None = None

    def __call__(self, batch: list[Frame]) -> bool:
        if self.fail is not None:
            raise self.fail
        if self.open:
            self.writes.append([f.payload for f in batch])
        return self.open


async def running(
    inline: bool = True, direct: DirectRecorder | None = None
) -> tuple[FakeHub, Client, Recorder, asyncio.Task[None]]:
    """A client whose own task (`pump`) runs, with a recording write function."""
    hub = FakeHub(inline=inline)
    client = Client(hub, "sse")  # type: ignore[arg-type]
    write = Recorder()
    task = asyncio.create_task(client.pump(write, direct))
    await asyncio.sleep(0)  # let pump reach its wait
    return hub, client, write, task


@pytest.mark.anyio
async def test_flush_writes_a_burst_at_once_without_the_clients_task() -> None:
    hub, client, write, task = await running()
    for f in frames("a", "b", "c"):
        client.offer(f)
    assert hub.dirty_clients == [client]  # marked once, for the first frame
    hub.flush()
    # Written synchronously inside flush: no task switch was needed.
    assert write.writes == [["a", "b", "c"]]
    assert client.pending == []
    client.end("bye")
    await task


@pytest.mark.anyio
async def test_a_write_that_waits_is_finished_by_the_clients_task_in_order() -> None:
    hub, client, write, task = await running()
    write.gate = asyncio.get_running_loop().create_future()
    client.offer(frames("a")[0])
    hub.flush()
    assert write.writes == [["a"]]
    assert write.finished == []
    # Frames offered meanwhile wait: flush leaves them to the busy client's task.
    for f in frames("b", "c"):
        client.offer(f)
    hub.flush()
    assert write.writes == [["a"]]
    write.gate.set_result(None)
    write.gate = None
    for _ in range(5):
        await asyncio.sleep(0)
    assert write.writes == [["a"], ["b", "c"]]
    assert write.finished == ["a", "c"]
    # Back to hand-started writes.
    client.offer(frames("d")[0])
    hub.flush()
    assert write.writes[-1] == ["d"]
    client.end("bye")
    await task


@pytest.mark.anyio
async def test_a_hand_started_write_that_fails_raises_in_the_clients_task() -> None:
    hub, client, write, task = await running()
    write.fail = OSError("gone")
    client.offer(frames("a")[0])
    hub.flush()
    with pytest.raises(OSError, match="gone"):
        await task


@pytest.mark.anyio
async def test_cancelling_the_client_task_reaches_a_suspended_write() -> None:
    hub, client, write, task = await running()
    write.gate = asyncio.get_running_loop().create_future()
    client.offer(frames("a")[0])
    hub.flush()
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert write.finished == ["a"]  # the write's own cleanup ran
    assert write.gate.cancelled()


@pytest.mark.anyio
async def test_without_inline_writes_the_clients_task_does_them() -> None:
    hub, client, write, task = await running(inline=False)
    for f in frames("a", "b"):
        client.offer(f)
    hub.flush()
    assert write.writes == []  # not by hand
    await asyncio.sleep(0)
    assert write.writes == [["a", "b"]]
    client.end("bye")
    await task


@pytest.mark.anyio
async def test_a_frame_offered_in_task_is_never_written_by_hand() -> None:
    hub, client, write, task = await running()
    client.offer(frames("a")[0])
    client.offer(frames("b")[0], in_task=True)  # e.g. a write that reads the database
    hub.flush()
    assert write.writes == []
    await asyncio.sleep(0)
    assert write.writes == [["a", "b"]]
    client.offer(frames("c")[0])  # back to writes started by hand
    hub.flush()
    assert write.writes[-1] == ["c"]
    client.end("bye")
    await task


@pytest.mark.anyio
async def test_overflow_ends_the_client_once() -> None:
    hub = FakeHub(client_buffer=2)
    client = Client(hub, "sse")  # type: ignore[arg-type]
    for f in frames("a", "b", "c", "d"):
        client.offer(f)  # no pump yet: everything stays pending
    assert client.reason is not None
    assert client.reason.startswith("too slow")
    assert client.close_code == 1013
    assert hub.metrics.drops.count == 1
    assert client.pending == []  # dropped with the client


@pytest.mark.anyio
async def test_direct_writes_are_tried_first_and_fall_back_in_order() -> None:
    direct = DirectRecorder()
    hub, client, write, task = await running(direct=direct)
    client.offer(frames("a")[0])
    hub.flush()
    assert direct.writes == [["a"]]
    assert write.writes == []
    # The socket cannot take more now (a slow reader): the write goes through the task's
    # (waiting) path, and what comes meanwhile waits behind it, in order.
    direct.open = False
    write.gate = asyncio.get_running_loop().create_future()
    client.offer(frames("b")[0])
    hub.flush()
    assert write.writes == [["b"]]
    direct.open = True
    client.offer(frames("c")[0])
    hub.flush()
    assert direct.writes == [["a"]]  # not past the unfinished write of "b"
    write.gate.set_result(None)
    write.gate = None
    for _ in range(5):
        await asyncio.sleep(0)
    assert write.writes == [["b"], ["c"]]
    client.offer(frames("d")[0])
    hub.flush()
    assert direct.writes == [["a"], ["d"]]
    client.end("bye")
    await task


@pytest.mark.anyio
async def test_a_direct_write_that_fails_raises_in_the_clients_task_not_the_hub() -> None:
    direct = DirectRecorder()
    hub, client, _write, task = await running(direct=direct)
    direct.fail = RuntimeError("transport closed")
    client.offer(frames("a")[0])
    hub.flush()  # must not raise: the hub serves every client
    with pytest.raises(RuntimeError, match="transport closed"):
        await task
