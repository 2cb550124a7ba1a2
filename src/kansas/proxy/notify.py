"""Notifications for a shard that is down are held and delivered, in order, when it is back.

Zulip's Django hands each event to the Tornado shards once (through RabbitMQ, which
keeps it while a Tornado restarts, or over HTTP). kansas fans ``notify_tornado`` out to
every shard; a shard that is restarting would silently miss those events. So, per
shard, a mailbox: a notification that cannot be delivered because the shard is down
(or while older ones wait) is queued and sent, oldest first, as soon as the health
monitor sees the shard answer again. Bounded in count and age; what falls out is
logged as lost. A shard that hangs up before answering at all (a stopping Tornado
closes the connections it has not served) is sent the notification again later; one
that hangs up in the middle of its answer had taken it, and is not.
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from kansas.health import HealthMonitor
from kansas.model import Shard
from kansas.proxy.backend import BackendPool, CollectedResponse, Failed, ShardFailure

log = Logger()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one notification for one shard."""

    state: str  # "delivered" (see reply), "queued", or "failed" (see reason)
    reply: Any = None  # the shard's CollectedResponse when delivered
    reason: str = ""


class _Mailbox:
    __slots__ = ("emptied", "letters", "sending", "shard")

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.letters: deque[tuple[bytes, float]] = deque()  # (request bytes, deadline)
        self.sending = False
        self.emptied: list[Deferred[None]] = []  # waiting for every letter to be out


class NotifyDispatcher:
    def __init__(
        self,
        pool: BackendPool,
        health: HealthMonitor,
        max_letters: int = 10_000,
        max_age: float = 120.0,
    ) -> None:
        self.pool = pool
        self.health = health
        self.max_letters = max_letters
        self.max_age = max_age
        self.boxes: dict[str, _Mailbox] = {}
        self.lost = 0
        #: Notification ids (docs/transparent-moves.md): this process's random origin
        #: and a counter without gaps; every shard gets the same id for a notification.
        self.origin = os.urandom(8).hex()
        self._seq = 0
        health.on_healthy.append(self._flush)

    def next_id(self) -> bytes:
        """The id of the next notification: ``<origin>:<seq>``."""
        self._seq += 1
        return f"{self.origin}:{self._seq}".encode()

    def queued(self, name: str | None = None) -> int:
        boxes = self.boxes.values() if name is None else [self.boxes.get(name)]
        return sum(len(box.letters) for box in boxes if box is not None)

    def drained(self, name: str) -> Deferred[None]:
        """Fires once nothing is held for shard ``name`` (at once if nothing is).

        A queue created on a shard before the notifications held for it are delivered
        would receive events from before it existed: queue creation waits for this.
        Asking starts a delivery attempt at once, without waiting for the next probe
        (a shard believed down may be back already: Django just chose it).
        """
        box = self.boxes.get(name)
        if box is None or not (box.letters or box.sending):
            return succeed(None)
        d: Deferred[None] = Deferred()
        box.emptied.append(d)
        self._flush(name)
        return d

    def _empty(self, box: _Mailbox) -> None:
        waiting, box.emptied = box.emptied, []
        for d in waiting:
            if not d.called:
                d.callback(None)

    def deliver(self, shard: Shard, payload: bytes) -> Deferred[Outcome]:
        box = self.boxes.get(shard.name)
        if box is None or box.shard != shard:
            box = self.boxes[shard.name] = _Mailbox(shard)
        if box.letters or box.sending or self.health.is_down(shard.name):
            return succeed(self._queue(box, payload))
        return self._send(shard, payload).addCallbacks(
            lambda reply: Outcome("delivered", reply), self._failed, errbackArgs=(box, payload)
        )

    def _send(self, shard: Shard, payload: bytes) -> Deferred[Any]:
        sink = CollectedResponse()
        self.pool.send(shard.address, payload, sink, retry_safe=False)
        return sink.done

    def _queue(self, box: _Mailbox, payload: bytes) -> Outcome:
        if len(box.letters) >= self.max_letters:
            self.lost += 1
            return Outcome("failed", reason=f"{len(box.letters)} notifications already wait")
        box.letters.append((payload, self.pool.reactor.seconds() + self.max_age))
        return Outcome("queued")

    def _failed(self, failure: Failure, box: _Mailbox, payload: bytes) -> Outcome:
        if self._unanswered(failure, box):
            return self._queue(box, payload)
        return Outcome("failed", reason=failure.getErrorMessage())

    def _unanswered(self, failure: Failure, box: _Mailbox) -> bool:
        """The shard did not take it (and is now known down, or being checked)."""
        error = failure.value
        if not isinstance(error, ShardFailure) or not error.unanswered:
            return False
        if error.kind is Failed.UNREACHABLE:
            self.health.failed(box.shard.name, str(error))
        else:
            self.health.probe(box.shard.name)
        return True

    def _flush(self, name: str) -> None:
        box = self.boxes.get(name)
        if box is None or box.sending or not box.letters:
            return
        now = self.pool.reactor.seconds()
        while box.letters and box.letters[0][1] < now:
            box.letters.popleft()
            self.lost += 1
            log.warn("a notification for shard {s} expired undelivered", s=name)
        if not box.letters:
            self._empty(box)
            return
        box.sending = True
        payload = box.letters[0][0]
        self._send(box.shard, payload).addCallbacks(
            self._flushed, self._flush_failed, callbackArgs=(box,), errbackArgs=(box,)
        )

    def _flushed(self, reply: Any, box: _Mailbox) -> None:
        box.sending = False
        box.letters.popleft()
        self.health.succeeded(box.shard.name)  # it answered: it is up
        if reply.status != 200:
            self.lost += 1
            log.warn("shard {s} refused a held notification: status {st}", s=box.shard.name,
                     st=reply.status)  # fmt: skip
        if box.letters:
            self._flush(box.shard.name)
        else:
            log.info("held notifications delivered to shard {s}", s=box.shard.name)
            self._empty(box)

    def _flush_failed(self, failure: Failure, box: _Mailbox) -> None:
        box.sending = False
        if self._unanswered(failure, box):
            return  # kept; retried when the shard is seen again
        box.letters.popleft()
        self.lost += 1
        log.warn("a held notification for shard {s} may be lost: {e}", s=box.shard.name,
                 e=failure.getErrorMessage())  # fmt: skip
        self._flush(box.shard.name)
