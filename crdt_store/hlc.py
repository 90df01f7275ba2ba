"""The hybrid logical clock that orders every write of a station.

An HLC value is one integer below 2**53 (it must survive pycrdt's float conversion):
milliseconds since the epoch shifted left by 11 bits, plus an 11-bit counter. The clock
never reads the wall clock itself; callers pass ``now_ms`` so the logic stays pure and
testable with skewed clocks.

A remote value further ahead of our wall time than ``max_skew_ms`` is not allowed to drag
the clock forward (one station with a clock set to next year would otherwise win every
later write); the caller learns about it through :class:`ClockSkew` and reports the station.
"""

from __future__ import annotations

from dataclasses import dataclass

COUNTER_BITS = 11
COUNTER_MASK = (1 << COUNTER_BITS) - 1
MAX_HLC = (1 << 53) - 1


def pack(ms: int, counter: int) -> int:
    """Combine wall milliseconds and a counter into one HLC value."""
    return (ms << COUNTER_BITS) | counter


def physical_ms(hlc: int) -> int:
    """The wall-clock milliseconds part of an HLC value."""
    return hlc >> COUNTER_BITS


@dataclass(frozen=True, slots=True)
class ClockSkew:
    """A remote HLC that was too far ahead of our wall clock to be trusted."""

    remote_hlc: int
    ahead_ms: int


class HybridClock:
    """A monotonic HLC. ``last`` is the highest value issued or accepted so far."""

    __slots__ = ("last", "max_skew_ms")

    def __init__(self, last: int = 0, *, max_skew_ms: int = 300_000) -> None:
        self.last = last
        self.max_skew_ms = max_skew_ms

    def tick(self, now_ms: int) -> int:
        """Issue a new value, greater than every value issued or accepted before."""
        candidate = pack(now_ms, 0)
        if candidate <= self.last:
            candidate = self.last + 1
        if candidate > MAX_HLC:
            raise OverflowError("hybrid logical clock exceeded 2**53")
        self.last = candidate
        return candidate

    def observe(self, remote: int, now_ms: int) -> ClockSkew | None:
        """Advance past a remote value, unless it is too far ahead of ``now_ms``."""
        ahead = physical_ms(remote) - now_ms
        if ahead > self.max_skew_ms:
            return ClockSkew(remote_hlc=remote, ahead_ms=ahead)
        self.last = max(self.last, remote)
        return None
