"""
The NATS JetStream sink of `AsyncRelay`: a read published pipelined, acknowledged as a whole.

Every event is one message on ``subject`` (``{channel}`` replaced) with ``Nats-Msg-Id`` = the
event id, so JetStream drops a second copy within the stream's ``duplicate_window``. Messages
are sent with a reply subject of our own inbox (one subscription for every acknowledgement),
not awaited one by one: a read of 20,000 events costs one wait.

The connection does not reconnect by itself (``allow_reconnect=False``): nats-py would buffer
what is published while it reconnects and send it after the messages lost with the old
connection, out of order. Instead a lost connection fails the batch; the relay connects anew
and publishes again from the first event JetStream did not acknowledge, in order (what was
stored meanwhile is dropped as a duplicate), so events with one key stay in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable
from typing import Any

from ._models import Event
from ._relay_sink import Refused, _RelayState, attempts, safe_url
from .errors import UsageError

logger = logging.getLogger("pgherald.relay")

_PENDING, _OK, _FAILED = 0, 1, 2
_NO_RESPONDERS = ""  # the error of a message nothing took (503 no responders)
# Subject tokens: no whitespace, no wildcards, no empty token.
_BAD_SUBJECT = set(" \t\r\n*>")


class NatsSink:
    anyio = False  # its client runs on asyncio only
    raw = True
    """Takes payloads and headers as the log's JSON text (the relay sets ``raw_payloads``)."""

    def __init__(
        self,
        url: str,
        *,
        channels: frozenset[str],
        stream: str,
        subject: str,
        stream_config: dict[str, Any],
        max_attempts: int,
        timeout: float,
    ) -> None:
        try:
            import nats  # noqa: F401 - checked here: a missing extra is a clear error at once
        except ImportError:
            raise UsageError(
                "relaying to NATS needs nats-py: pip install 'pgherald[relay]'"
            ) from None
        self.url = url
        self.target = safe_url(url)
        self.stream = stream
        self.template = subject
        self.subjects = {c: self._subject(c) for c in channels}
        self._subject_bytes = {c: s.encode() for c, s in self.subjects.items()}
        # Per channel, the header lines between the event id and the created time.
        self._channel_lines = {
            c: b"\r\nPgherald-Channel: " + _header_value(c) + b"\r\nPgherald-Created-At: "
            for c in channels
        }
        self._key_lines: dict[str, bytes] = {}
        self.stream_config = stream_config
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.nc: Any = None
        self.inbox = ""
        self._seq = 0
        self._base = 0
        self._state = bytearray()
        self._errors: dict[int, str] = {}
        self._acked = 0
        self._expected = 0
        """How many of the batch were written: their answers end the wait."""
        self._progress = asyncio.Event()
        # As nats-server writes it: UTF-8 as it is (a name with non-ASCII is not escaped).
        self._stream_tag = b'"stream":' + json.dumps(stream, ensure_ascii=False).encode()
        self._foreign: str | None = None  # a stream other than ours acknowledged an event
        self.duplicates = 0
        """Acknowledgements that said "duplicate" (a re-send JetStream dropped)."""

    def _subject(self, channel: str) -> str:
        subject = self.template.replace("{channel}", channel)
        if not subject or set(subject) & _BAD_SUBJECT or "" in subject.split("."):
            raise UsageError(
                f"subject {subject!r} (for channel {channel!r}) is not a valid NATS subject: "
                "no spaces, '*', '>' or empty tokens; pass --subject with a fixed name"
            )
        return subject

    # -- connection --

    async def open(self, relay: _RelayState) -> None:
        await self._connect(relay, once=True)

    async def _connect(self, relay: _RelayState, *, once: bool = False) -> bool:
        """Connect and make sure the stream exists; False when stopped first."""
        return await relay.connect(
            lambda: self._try_connect(relay), "JetStream", self.target, once=once
        )

    async def _try_connect(self, relay: _RelayState) -> bool:
        nc = _client_class()()
        try:
            connecting = nc.connect(
                servers=[self.url],
                allow_reconnect=False,
                # nats-py tries a server up to max_reconnect_attempts + 1 times, waiting
                # reconnect_time_wait between: the relay's own backoff does that.
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=min(self.timeout, 5.0),
                name="pgherald-relay",
                error_cb=self._on_error,
                disconnected_cb=self._on_disconnect,
                closed_cb=self._on_disconnect,
                pending_size=0,  # no buffering while disconnected: never out of order
            )
            if await relay.unless_stopped(_true(connecting)) is None:
                # Stopped in the handshake: nothing to flush, and nats-py's close of a
                # client it never finished connecting can wait out the whole timeout.
                await _close(nc, timeout=0.1)
                return False
            # JetStream's answer can take up to `timeout`: stop() does not wait for it.
            if await relay.unless_stopped(_true(self._stream_info(nc))) is None:
                await _close(nc, timeout=0.1)
                return False
            self.inbox = nc.new_inbox()
            sub = await nc.subscribe(
                self.inbox + ".*",
                cb=self._on_ack,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )
        except Exception:  # UsageError (the stream cannot be created) included
            await _close(nc)
            raise
        # Acknowledgements straight to _ack, not through the subscription's queue
        # and task (see _client_class): half of the relay's CPU per event.
        nc.pgherald_acks = (getattr(sub, "_id", None), self._ack)
        self.nc = nc
        relay.stats.connects += 1
        logger.info("connected to JetStream at %s (stream %s)", self.target, self.stream)
        return True

    async def _stream_info(self, nc: Any) -> Any:
        """The stream's info; a stream not there is created first (raising `UsageError` when
        it cannot be with the settings given)."""
        import nats.js.errors
        from nats.js.api import StreamConfig

        js = nc.jetstream(timeout=self.timeout)
        try:
            return await js.stream_info(self.stream)
        except nats.js.errors.NotFoundError:
            config: dict[str, Any] = {"subjects": sorted(set(self.subjects.values()))}
            config.update(self.stream_config)
            try:
                info = await js.add_stream(StreamConfig(name=self.stream, **config))
            except (nats.js.errors.BadRequestError, TypeError) as exc:
                raise UsageError(
                    f"cannot create JetStream stream {self.stream!r} with {self.stream_config!r}:"
                    f" {exc}; fix --stream-option (or create the stream yourself)"
                ) from None
            logger.info("created JetStream stream %s", self.stream)
            return info

    async def _no_responders(self, event: Event, relay: _RelayState) -> str | None:
        """Why nothing took *event*'s message, as far as JetStream tells (a stream deleted
        meanwhile is created again); None when stopped meanwhile."""
        subject = self.subjects[event.channel]
        fix = (
            f"JetStream stored nothing for event {event.id}: no stream takes subject {subject}"
            " (no responders)"
        )
        try:
            info = await relay.unless_stopped(self._stream_info(self.nc))
        except UsageError:
            raise
        except Exception as exc:
            return f"{fix}; JetStream at {self.target} does not answer ({type(exc).__name__})"
        if info is None:
            return None
        taken = list(info.config.subjects or [])
        if not any(_subject_matches(pattern, subject) for pattern in taken):
            return (
                f"{fix}: stream {self.stream} takes {', '.join(taken) or 'no subjects'}; add "
                f"{subject} to its subjects (nats stream edit {self.stream} --subjects ...), "
                "or relay with --stream and --subject that match"
            )
        return (
            f"{fix}; stream {self.stream} takes it (was it just created, or JetStream not ready?)"
        )

    def _foreign_message(self) -> str:
        return (
            f"JetStream stored events in stream {self._foreign!r}, not in {self.stream!r} (the "
            f"relay's --stream): stream {self._foreign!r} takes subject(s) "
            f"{', '.join(sorted(set(self.subjects.values())))}, and {self.stream!r} does not. "
            "Its de-duplication and retention are not the relay's: relay with --stream "
            f"{self._foreign}, or change the subjects (--subject, or the streams')"
        )

    async def _on_error(self, exc: Exception) -> None:
        logger.debug("NATS connection error: %r", exc)

    async def _on_disconnect(self) -> None:
        self._progress.set()  # the batch waiting for acknowledgements learns at once

    async def _on_ack(self, msg: Any) -> None:
        self._ack(msg.subject.encode(), msg.data)

    def _ack(self, subject: bytes, data: bytes) -> None:
        """JetStream's answer to message ``<inbox>.<seq>``: OK, duplicate, or an error."""
        try:
            i = int(subject[subject.rfind(b".") + 1 :]) - self._base
        except ValueError:
            return
        state = self._state
        if not 0 <= i < len(state) or state[i] != _PENDING:
            return  # a late answer to an earlier batch
        if data and b'"error"' not in data:
            state[i] = _OK
            if b'"duplicate"' in data:
                self.duplicates += 1
            if self._stream_tag not in data and self._foreign is None:
                # Stored, but in another stream than ours (it takes our subject); an answer
                # without a stream name is not one we know: no stream named.
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    stream = str(json.loads(data)["stream"])
                    if stream != self.stream:  # (a server that writes it otherwise: ours)
                        self._foreign = stream
        else:
            state[i] = _FAILED
            if data:
                try:
                    error = json.loads(data)["error"]
                    self._errors[i] = str(error.get("description") or error)
                except (ValueError, KeyError, AttributeError):
                    self._errors[i] = data[:200].decode(errors="replace")
            else:  # 503 no responders: JetStream not there (yet), or no stream for the subject
                self._errors[i] = _NO_RESPONDERS
        self._acked += 1
        if self._acked >= self._expected:
            self._progress.set()

    # -- publishing --

    async def send(
        self, events: list[Event], relay: _RelayState, *, redelivery: bool = False
    ) -> int | None:
        # A redelivery keeps the event's Nats-Msg-Id: JetStream records the ids of messages it
        # stored only, so a dead letter (refused, never stored) goes through; one it did store
        # (an error answer after all, in a cluster) is dropped as the copy it is, within
        # duplicate_window, and so is a redelivery sent again after a crash.
        first = 0
        attempt = 0  # transient failures in a row (unreachable, no answer)
        refusals = 0  # times the event at `first` was refused by JetStream
        while first < len(events):
            if relay.stopping.is_set():
                return first
            if self.nc is None or not self.nc.is_connected:
                await self._drop()
                if not await self._connect(relay):
                    return first
            before = self.duplicates
            done, error = await self._publish(events, first, relay)
            relay.stats.duplicates += self.duplicates - before
            if self._foreign is not None:
                raise UsageError(self._foreign_message())
            if done == len(events):
                return None
            if relay.stopping.is_set():
                return done  # what is acknowledged is done; the connection is closed by aclose
            if done > first:
                attempt, refusals = 0, 0
            first = done
            attempt += 1
            event = events[first]
            if error == _NO_RESPONDERS:
                # Nothing took the message: JetStream is not (yet) up, the stream was deleted,
                # or it does not take the subject. Not the event's fault: retried for ever.
                why = await self._no_responders(event, relay)
                if why is None:
                    return first
            elif error is not None:  # JetStream answered with an error for this event
                refusals += 1
                if refusals >= self.max_attempts:  # the relay logs it
                    raise Refused(first, f"JetStream refused it ({attempts(refusals)}): {error}")
                why = f"JetStream refused event {event.id} ({error})"
            else:
                why = f"no acknowledgement from JetStream at {self.target} for event {event.id}"
                await self._drop()
            if not await relay.pause(attempt, why):
                return first
        return None

    async def _publish(
        self, events: list[Event], first: int, relay: _RelayState
    ) -> tuple[int, str | None]:
        """Publish ``events[first:]``; the index of the first not acknowledged, and the
        error JetStream gave for it (None: no answer, the connection broke, or stopping;
        `_NO_RESPONDERS`: nothing took it)."""
        nc = self.nc
        count = len(events) - first
        self._base = self._seq
        self._seq += count
        self._state = bytearray(count)
        self._errors = {}
        self._acked = 0
        self._expected = count
        self._progress.clear()
        self._foreign = None

        async def write() -> bool:
            # Fewer when one is over max_payload: then the answers to those end the wait.
            self._expected = await self._write(nc, events, first, count)
            await nc.flush(timeout=self.timeout)  # a PING's PONG: up to `timeout` if frozen
            return True

        try:
            # Stopping cancels the writing and the flush too: a frozen server (or a full
            # socket buffer) would hold them up to `timeout`.
            await relay.unless_stopped(write())
        except Exception as exc:
            logger.debug("publishing to JetStream failed: %r", exc)
        too_large = expected = self._expected
        while not relay.stopping.is_set():
            if self._first_failure(expected) is not None:
                break  # an error answer: no need to wait for the rest
            if self._acked >= expected:
                break
            if self.nc is None or not nc.is_connected:
                break
            self._progress.clear()
            before = self._acked
            try:
                waited = asyncio.wait_for(self._progress.wait(), self.timeout)
                if await relay.unless_stopped(waited) is None:
                    break  # stopping: what is acknowledged is done, the rest comes again
            except asyncio.TimeoutError:
                if self._acked == before:
                    break
        done = first + _prefix_ok(self._state, expected)
        if done == first + too_large and too_large < count:
            e = events[done]
            raise Refused(
                done,
                f"event {e.id} is larger than the NATS server's max_payload "
                f"({nc.max_payload} bytes)",
            )
        index = done - first
        if index < count and self._state[index] == _FAILED:
            return done, self._errors.get(index, _NO_RESPONDERS)
        return done, None

    async def _write(self, nc: Any, events: list[Event], first: int, count: int) -> int:
        """Send ``HPUB`` commands for ``events[first:first + count]``, a chunk at a time;
        return how many were sent (fewer: the next one exceeds ``max_payload``)."""
        # The commands are encoded here, not by nc.publish (which validates and encodes the
        # headers of every message again): that halves the relay's CPU per event. The
        # subjects and header names are checked once, in __init__; payloads and headers are
        # the log's JSON text, passed through (raw_payloads), never decoded and encoded again.
        send = getattr(nc, "_send_command", None)
        flush = getattr(nc, "_flush_pending", None)
        fast = send is not None and flush is not None
        max_payload = nc.max_payload
        reply = (self.inbox + ".").encode()
        base = self._base
        subjects = self._subject_bytes
        channel_lines = self._channel_lines
        key_lines = self._key_lines
        if len(key_lines) > 100_000:  # a cache of the keys seen, not a leak
            key_lines.clear()
        last_created: Any = None
        created = b""
        chunk: list[bytes] = []
        for i in range(count):
            e = events[first + i]
            if e.created_at != last_created:
                last_created = e.created_at
                created = last_created.isoformat().encode()
            key = e.key
            if key is None:
                tail = b""
            else:
                tail = key_lines.get(key, b"")
                if not tail:
                    tail = key_lines[key] = b"\r\nPgherald-Key: " + _header_value(key)
            headers: Any = e.headers  # JSON text (raw_payloads)
            if headers:
                tail += b"\r\nPgherald-Headers: " + _header_value(headers)
            head = (
                b"NATS/1.0\r\nNats-Msg-Id: %d\r\nPgherald-Event-Id: %d\r\nPgherald-Tx: %s%s%s%s"
                b"\r\n\r\n" % (e.id, e.id, e.tx.encode(), channel_lines[e.channel], created, tail)
            )
            payload = e.payload.encode()
            size = len(head) + len(payload)
            if size > max_payload:
                count = i
                break
            if not fast:
                await nc.publish(
                    subjects[e.channel].decode(),
                    payload,
                    reply=(reply + str(base + i).encode()).decode(),
                    headers=_parse_headers(head),
                )
                continue
            chunk.append(
                b"HPUB %s %s%d %d %d\r\n%s%s\r\n"
                % (subjects[e.channel], reply, base + i, len(head), size, head, payload)
            )
            if len(chunk) >= 512:
                await send(b"".join(chunk))  # type: ignore[misc]
                await flush()  # type: ignore[misc]
                chunk = []
        if chunk:
            await send(b"".join(chunk))  # type: ignore[misc]
            await flush()  # type: ignore[misc]
        return count

    def _first_failure(self, expected: int) -> int | None:
        i = self._state.find(_FAILED, 0, expected)
        return None if i < 0 else i

    async def _drop(self) -> None:
        nc, self.nc = self.nc, None
        if nc is not None:
            await _close(nc)

    async def aclose(self) -> None:
        await self._drop()


_CLIENT: Any = None


def _client_class() -> Any:
    """nats-py's Client, with acknowledgements to our inbox handed straight to `NatsSink._ack`.

    nats-py builds a `Msg` for every message, queues it on the subscription and wakes the
    subscription's task to run the callback: for 20,000 acknowledgements per read that is half
    of the relay's CPU. The subclass intercepts messages of the inbox subscription (its sid in
    ``pgherald_acks``) before that; anything else, and a nats-py without ``_process_msg``, takes
    nats-py's own path (the subscription's callback, `NatsSink._on_ack`)."""
    global _CLIENT
    if _CLIENT is None:
        import nats.aio.client

        base: Any = nats.aio.client.Client

        class Client(base):  # type: ignore[misc]
            pgherald_acks: tuple[int | None, Any] = (None, None)

            async def _process_msg(
                self, sid: int, subject: bytes, reply: bytes, data: bytes, headers: Any
            ) -> None:
                ack_sid, ack = self.pgherald_acks
                if sid == ack_sid:
                    ack(subject, data)
                    return
                await super()._process_msg(sid, subject, reply, data, headers)

        _CLIENT = Client if hasattr(base, "_process_msg") else base
    return _CLIENT


def _subject_matches(pattern: str, subject: str) -> bool:
    """Whether a stream's subject *pattern* (NATS wildcards ``*`` and ``>``) takes *subject*."""
    tokens = subject.split(".")
    parts = pattern.split(".")
    for i, part in enumerate(parts):
        if part == ">":
            return len(tokens) > i
        if i >= len(tokens) or part not in ("*", tokens[i]):
            return False
    return len(parts) == len(tokens)


def _header_value(text: str) -> bytes:
    """A header value on one line (CR and LF would end the header block early)."""
    if "\r" in text or "\n" in text:
        text = text.replace("\r", " ").replace("\n", " ")
    return text.encode()


def _parse_headers(head: bytes) -> dict[str, str]:
    """The header block built by `NatsSink._write` as a dict (for nc.publish)."""
    lines = head.decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if line)


def _prefix_ok(state: bytearray, n: int) -> int:
    """How many of the first *n* are acknowledged, from the start without a gap."""
    head = bytes(state[:n])
    return n - len(head.lstrip(b"\x01"))


async def _true(coro: Awaitable[Any]) -> bool:
    await coro
    return True


async def _close(nc: Any, timeout: float = 2.0) -> None:
    try:
        await asyncio.wait_for(nc.close(), timeout)
    except Exception as exc:  # closing a broken connection: nothing to do
        logger.debug("closing the NATS connection: %r", exc)
    # A connection abandoned in its handshake: nats-py's close leaves its socket open.
    writer = getattr(getattr(nc, "_transport", None), "_io_writer", None)
    if writer is not None:
        writer.close()
