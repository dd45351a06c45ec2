"""
The Redis Streams sink of `AsyncRelay`: ``XADD`` through a Lua script that skips what is there.

Why a script and not explicit entry ids: an entry id must grow within a stream, but the log's
order, ``(tx, id)``, is only monotonic within one channel's partition; several partitions (and
several relays) write into one stream in any interleaving, so no id derived from an event's
position can be both increasing and stable across a redelivery. Instead the script keeps, per
stream, the position of the last event relayed from each channel's partition (a hash beside the
stream, ``<stream>:pgherald-positions``, field ``<group> NUL <channel> NUL <partition>``): an
event at or before that position is skipped, a later one is appended and the position moved,
in one atomic script call. Within a channel's partition a relay sends in log order, and a
partition has one relay at a time, so a redelivered read (after a crash or a handover) is
skipped event by event: effectively once, with no time window, and events with one key keep
their order.

Dead letters redelivered (`pgherald.redeliver`) lie behind their partition's position: the
script appends them whatever the position says (late, out of order), and notes their ids, per
group, in a sorted set beside the stream (``<stream>:pgherald-redelivered``, the latest 100,000
kept), so that a redelivery sent again (the relay died before the dead letter was deleted) is
skipped as a copy.

A read is sent as one script call per stream per 500 events, pipelined (one round trip). The
calls are encoded here, as the Redis protocol (RESP) bytes of ``EVALSHA``, and written on one of
redis-py's connections: redis-py's generic encoding of 8 arguments per event cost more CPU than
everything else the relay does for an event. Payloads and headers are the log's JSON text,
passed through (``raw_payloads``).
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

from ._models import Event
from ._relay_sink import Refused, _RelayState, attempts, readable_url, safe_url
from .errors import UsageError

logger = logging.getLogger("pgherald.relay")

CHUNK = 500
FIELDS = 8  # per event: partition, position, id, channel, key, created_at, payload, headers

# KEYS[1] the stream, KEYS[2] its positions hash, KEYS[3] its redelivered set. ARGV[1] the
# group, ARGV[2] MAXLEN ('' none), ARGV[3] '' (a read of the log) or, for dead letters
# redelivered, the time (the score in KEYS[3]); then FIELDS values per event. Positions are
# zero-padded "tx:id", compared as strings.
SCRIPT = """
local group, maxlen, redelivered = ARGV[1], ARGV[2], ARGV[3]
local last = {}
local added = 0
for i = 4, #ARGV, 8 do
  local pos = ARGV[i + 1]
  local field, at, new
  if redelivered == '' then
    field = group .. '\0' .. ARGV[i + 3] .. '\0' .. ARGV[i]
    at = last[field]
    if at == nil then
      at = redis.call('HGET', KEYS[2], field) or ''
    end
    new = pos > at
  else
    -- behind the partition's position: appended unless this very redelivery was
    field = group .. '\0' .. ARGV[i + 2]
    new = not redis.call('ZSCORE', KEYS[3], field)
  end
  if new then
    local entry = {'id', ARGV[i + 2], 'channel', ARGV[i + 3]}
    if ARGV[i + 4] ~= '' then
      table.insert(entry, 'key'); table.insert(entry, string.sub(ARGV[i + 4], 2))
    end
    table.insert(entry, 'created_at'); table.insert(entry, ARGV[i + 5])
    table.insert(entry, 'payload'); table.insert(entry, ARGV[i + 6])
    if ARGV[i + 7] ~= '' then
      table.insert(entry, 'headers'); table.insert(entry, ARGV[i + 7])
    end
    if maxlen ~= '' then
      redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(entry))
    else
      redis.call('XADD', KEYS[1], '*', unpack(entry))
    end
    added = added + 1
    if redelivered == '' then
      at = pos
    else
      redis.call('ZADD', KEYS[3], redelivered, field)
    end
  end
  if redelivered == '' then
    last[field] = at
  end
end
for field, at in pairs(last) do
  redis.call('HSET', KEYS[2], field, at)
end
if redelivered ~= '' then
  redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -100001)  -- the latest 100,000 are kept
end
return added
"""
SHA = hashlib.sha1(SCRIPT.encode()).hexdigest().encode()


def _bulk(value: bytes) -> bytes:
    """One RESP bulk string."""
    return b"$%d\r\n%s\r\n" % (len(value), value)


_EMPTY = _bulk(b"")
_HEAD = 7  # a script call's parts before its events: header, 3 keys, group, maxlen, mode
_PARTITIONS = [_bulk(b"%d" % p) for p in range(256)]


class RedisSink:
    anyio = False  # its client runs on asyncio only
    raw = True
    """Takes payloads and headers as the log's JSON text (the relay sets ``raw_payloads``)."""

    def __init__(
        self,
        url: str,
        *,
        group: str,
        stream: str,
        maxlen: int | None,
        max_attempts: int,
        timeout: float,
    ) -> None:
        try:
            import redis.asyncio  # noqa: F401 - a missing extra is a clear error at once
        except ImportError:
            raise UsageError(
                "relaying to Redis needs redis-py: pip install 'pgherald[relay]'"
            ) from None
        from redis.asyncio.connection import parse_url

        self.url = url
        self.target = safe_url(url)
        try:
            parse_url(url)  # what every connection attempt would refuse, said once, at once
        except ValueError as exc:
            # The reason quotes the URL's parts: only when they could be read (else it may
            # quote part of a password).
            why = (
                f": {exc}"
                if readable_url(url)
                else " (its host part cannot be read: a port that is not a number?)"
            )
            raise UsageError(
                f"invalid Redis URL {self.target}{why}; write it as "
                "redis://[[user]:password@]host[:port][/db][?socket_timeout=seconds], with "
                "'/', '?', '#' and '@' in a password percent-encoded"
            ) from None
        self.group = group
        self.stream = stream
        self.maxlen = "" if maxlen is None else str(maxlen)
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.client: Any = None
        self._group = _bulk(group.encode())
        self._maxlen = _bulk(self.maxlen.encode())
        self._channels: dict[str, bytes] = {}
        self._streams: dict[str, str] = {}
        self._keys: dict[str, bytes] = {}
        self.added = 0
        """Entries appended (the rest of what was sent were copies, skipped)."""

    def _stream(self, channel: str) -> str:
        return self.stream.replace("{channel}", channel)

    async def open(self, relay: _RelayState) -> None:
        await self._connect(relay, once=True)

    async def _connect(self, relay: _RelayState, *, once: bool = False) -> bool:
        return await relay.connect(
            lambda: self._try_connect(relay), "Redis", self.target, once=once
        )

    async def _try_connect(self, relay: _RelayState) -> bool:
        import redis.asyncio

        client = redis.asyncio.Redis.from_url(
            self.url, socket_timeout=self.timeout, socket_connect_timeout=min(self.timeout, 5)
        )
        try:
            if await relay.unless_stopped(client.ping()) is None:
                await _close(client)
                return False
            if await relay.unless_stopped(client.script_load(SCRIPT)) is None:
                await _close(client)
                return False
        except Exception:
            await _close(client)
            raise
        self.client = client
        relay.stats.connects += 1
        logger.info("connected to Redis at %s (stream %s)", self.target, self.stream)
        return True

    async def send(
        self, events: list[Event], relay: _RelayState, *, redelivery: bool = False
    ) -> int | None:
        import redis.exceptions

        attempt = 0
        while not relay.stopping.is_set():
            if self.client is None and not await self._connect(relay):
                break
            try:
                results = await relay.unless_stopped(self._send(events, redelivery))
                if results is None:
                    break
            except redis.exceptions.NoScriptError:
                # The script cache was emptied (SCRIPT FLUSH, a failover): load it again. The
                # calls that ran before are skipped as copies on the re-send.
                await self._drop()
                attempt += 1
                if not await relay.pause(attempt, "Redis lost the relay's script"):
                    break
                continue
            except redis.exceptions.ResponseError as exc:
                # Redis refused a command (out of memory, a key of another type, ...): find the
                # event, try it max_attempts times, then give it up.
                return await self._one_by_one(events, relay, exc, redelivery)
            except Exception as exc:
                await self._drop()
                attempt += 1
                why = f"no answer from Redis at {self.target} ({type(exc).__name__}: {exc})"
                if not await relay.pause(attempt, why):
                    break
                continue
            added = sum(int(r) for r in results)
            self.added += added
            relay.stats.duplicates += len(events) - added
            return None
        return 0  # stopping: nothing counts as done; the script skips what was appended

    async def _send(self, events: list[Event], redelivery: bool = False) -> list[Any]:
        """One pipelined round trip: a script call per stream per CHUNK events, in order."""
        mode = _bulk(b"%.6f" % time.time()) if redelivery else _EMPTY
        calls: list[list[bytes]] = []
        current: dict[str, list[bytes]] = {}
        channels = self._channels
        keys = self._keys
        if len(keys) > 100_000:  # a cache of the keys seen, not a leak
            keys.clear()
        partitions = _PARTITIONS
        empty = _EMPTY
        last_created: Any = None
        created = b""
        streams = self._streams
        for e in events:
            channel = channels.get(e.channel)
            if channel is None:
                channel = channels[e.channel] = _bulk(e.channel.encode())
                streams[e.channel] = self._stream(e.channel)
            stream = streams[e.channel]
            parts = current.get(stream)
            if parts is None:
                name = stream.encode()
                parts = current[stream] = [
                    b"",  # the command's header, once the number of events is known
                    _bulk(name),
                    _bulk(name + b":pgherald-positions"),
                    _bulk(name + b":pgherald-redelivered"),
                    self._group,
                    self._maxlen,
                    mode,
                ]
                calls.append(parts)
            if e.created_at != last_created:
                last_created = e.created_at
                created = _bulk(last_created.isoformat().encode())
            key = e.key
            if key is None:
                key_arg = empty  # '' is no key; '=' + key otherwise
            else:
                key_arg = keys.get(key, b"")
                if not key_arg:
                    key_arg = keys[key] = _bulk(b"=" + key.encode())
            ident = b"%d" % e.id
            payload = e.payload.encode()
            headers: Any = e.headers  # JSON text (raw_payloads)
            parts.append(
                b"%s$41\r\n%020d:%020d\r\n$%d\r\n%s\r\n%s%s%s$%d\r\n%s\r\n%s"
                % (
                    partitions[e.partition],
                    int(e.tx),
                    e.id,
                    len(ident),
                    ident,
                    channel,
                    key_arg,
                    created,
                    len(payload),
                    payload,
                    _bulk(headers.encode()) if headers else empty,
                )
            )
            if len(parts) >= _HEAD + CHUNK:
                del current[stream]
        for parts in calls:
            # EVALSHA sha 3 stream positions redelivered group maxlen mode, then FIELDS per
            # event.
            parts[0] = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n3\r\n" % (
                9 + (len(parts) - _HEAD) * FIELDS,
                SHA,
            )
        pool = self.client.connection_pool
        try:
            conn = await pool.get_connection()
        except TypeError:  # redis-py < 5.3 wants a command name
            conn = await pool.get_connection("EVALSHA")
        try:
            await conn.send_packed_command([b"".join(parts) for parts in calls])
            return [await conn.read_response() for _ in calls]
        except BaseException:
            # A reply left unread (an error, a timeout, cancelled): the connection's
            # protocol state is unknown, so it is not used again.
            await conn.disconnect()
            raise
        finally:
            await pool.release(conn)

    async def _one_by_one(
        self, events: list[Event], relay: _RelayState, error: Exception, redelivery: bool
    ) -> int:
        import redis.exceptions

        # The read's refusal was a try of the first event Redis refuses on its own: it counts
        # towards max_attempts (a read of one event is not sent again for nothing).
        carried = 1
        for i, event in enumerate(events):
            tries = 0
            if len(events) == 1:
                tries, carried = carried, 0
            while True:
                if tries:  # refused that many times: give up, or wait and send again
                    if tries >= self.max_attempts:  # the relay logs it
                        raise Refused(i, f"Redis refused it ({attempts(tries)}): {error}") from None
                    if not await relay.pause(tries, f"Redis refused event {event.id} ({error})"):
                        return i
                try:
                    (added,) = await self._send([event], redelivery)
                except redis.exceptions.ResponseError as exc:
                    error = exc
                    tries, carried = tries + 1 + carried, 0
                    continue
                except Exception as exc:
                    logger.warning("no answer from Redis at %s (%s)", self.target, exc)
                    await self._drop()
                    return i
                self.added += int(added)
                relay.stats.duplicates += 1 - int(added)
                break
        logger.debug("a batch failed (%s) but each of its events went through", error)
        return len(events)

    async def _drop(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await _close(client)

    async def aclose(self) -> None:
        await self._drop()


async def _close(client: Any) -> None:
    try:
        await client.aclose()
        # Also a connection cancelled while it was being made, which aclose leaves open.
        await client.connection_pool.disconnect(inuse_connections=True)
    except Exception as exc:
        logger.debug("closing the Redis connection: %r", exc)
