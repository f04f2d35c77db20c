"""The Early-Bird detector: a FIFO of the last L masks and a distance threshold (pure logic)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .masks import ChannelMask, hamming


@dataclass(frozen=True)
class Ticket:
    check: int  # index of the check (0-based) at which the ticket was drawn
    mask: ChannelMask
    max_distance: float | None  # the largest distance from the newest mask to the others in the queue
    iteration: int | None = None  # training iteration of that check (set by the search)
    found: bool = True  # False: the search budget ran out and the last mask is extracted anyway


@dataclass
class EarlyBirdDetector:
    """`update(mask)` returns a Ticket when the newest mask is within `eta` of every other queued mask.

    Nothing can be drawn before the queue holds `queue` masks. The distance is strict: d < eta
    (a queue of identical masks, d = 0, draws for any eta > 0).
    """

    eta: float = 0.1
    queue: int = 5
    _fifo: deque = field(default_factory=deque, init=False, repr=False)
    checks: int = field(default=0, init=False)
    history: list[float] = field(default_factory=list, init=False)  # max distance per check (nan if too few)

    def __post_init__(self):
        if not self.eta > 0:
            raise ValueError(f"eta must be > 0; got {self.eta}")
        if int(self.queue) != self.queue or self.queue < 2:
            raise ValueError(f"queue must be an integer >= 2; got {self.queue}")

    def update(self, mask: ChannelMask) -> Ticket | None:
        self._fifo.append(mask)
        if len(self._fifo) > self.queue:
            self._fifo.popleft()
        index = self.checks
        self.checks += 1
        if len(self._fifo) < self.queue:
            self.history.append(float("nan"))
            return None
        newest = self._fifo[-1]
        dmax = max(hamming(newest, m) for m in list(self._fifo)[:-1])
        self.history.append(dmax)
        if dmax < self.eta:
            return Ticket(check=index, mask=newest, max_distance=dmax)
        return None

    @property
    def masks(self) -> list[ChannelMask]:
        return list(self._fifo)
