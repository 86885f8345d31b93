"""Failure and rate counters that slow down password guessing and sign-up floods.

All state is in memory and keyed by account or client address; every entry
forgets itself after its window, so an attacker cycling through names cannot
grow it without bound for longer than that window.
"""

import ipaddress
import math
from collections import deque

from securechatd.commands import RateLimited


def address_key(address):
    """What limits count per address: an IPv6 client has a whole /64 to pick from, so it is one."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if parsed.version == 6:
        return str(ipaddress.ip_network(f"{parsed}/64", strict=False))
    return address


def retry_text(seconds):
    whole = max(1, math.ceil(seconds))
    return f"retry in {whole} second{'' if whole == 1 else 's'}"


class _Swept:
    """Drops stale keys now and then, so keys never seen again do not pile up."""

    _sweep_at = 1024

    def _maybe_sweep(self, table, is_stale):
        if len(table) >= self._sweep_at:
            for key in list(table):
                if is_stale(key):
                    table.pop(key, None)
            self._sweep_at = max(1024, 2 * len(table))


class WindowCounter(_Swept):
    """At most `limit` events per key in any `window` seconds."""

    def __init__(self, clock, limit, window):
        self._clock = clock
        self.limit = limit
        self.window = window
        self._events = {}

    def _recent(self, key):
        events = self._events.get(key)
        if events is None:
            return ()
        horizon = self._clock.seconds() - self.window
        while events and events[0] <= horizon:
            events.popleft()
        if not events:
            del self._events[key]
        return events

    def retry_after(self, key, pending=0):
        """Seconds until another event is allowed for `key` (0: allowed now).

        `pending` events may still be recorded (attempts in flight): they
        count against the limit, and a moment is enough to see how they end.
        """
        events = self._recent(key)
        if len(events) + pending < self.limit:
            return 0
        if len(events) < self.limit:
            return 1
        return events[0] + self.window - self._clock.seconds()

    def record(self, key):
        self._maybe_sweep(self._events, lambda key: not self._recent(key))
        self._recent(key)
        self._events.setdefault(key, deque(maxlen=self.limit)).append(self._clock.seconds())

    def forget(self, key):
        self._events.pop(key, None)


class AccountDelay(_Swept):
    """After `free` failures an account waits 1, 2, 4, ... up to `max_delay` seconds.

    The wait applies to every attempt, the right password included, so a
    guesser gains nothing by trying during it. The count resets on success
    or after `window` seconds without a failure.
    """

    def __init__(self, clock, free, max_delay, window):
        self._clock = clock
        self.free = free
        self.max_delay = max_delay
        self.window = window
        self._state = {}  # account -> (failures, last failure time)

    def _failures(self, account):
        failures, last = self._state.get(account, (0, None))
        if last is not None and self._clock.seconds() - last >= self.window:
            del self._state[account]
            return 0, None
        return failures, last

    def retry_after(self, account, pending=0):
        """Seconds this account must wait; attempts in flight (`pending`) count as failures to come."""
        failures, last = self._failures(account)
        if failures + pending < self.free:
            return 0
        wait = 0
        if failures >= self.free:
            delay = min(2 ** (failures - self.free), self.max_delay)
            wait = max(0, last + delay - self._clock.seconds())
        return max(wait, 1) if pending else wait

    def record(self, account):
        self._maybe_sweep(self._state, lambda key: self._failures(key)[1] is None)
        failures, _ = self._failures(account)
        self._state[account] = (failures + 1, self._clock.seconds())

    def forget(self, account):
        self._state.pop(account, None)


class LoginThrottle:
    """Per-account delays plus a per-address block, checked before any hashing.

    Attempts still being checked count too, so a burst of concurrent guesses
    gets no more tries than the same guesses one after another.
    """

    def __init__(self, clock, account_free, account_max_delay, address_limit, address_window):
        self.accounts = AccountDelay(clock, account_free, account_max_delay, address_window)
        self.addresses = WindowCounter(clock, address_limit, address_window)
        self._pending = {}  # account or address -> attempts in flight

    def begin(self, account, address, count_pending=True):
        """Raise RateLimited if this account or address must wait; else count the attempt as in flight.

        `count_pending` False: attempts in flight do not count against the
        limits (for unguessable resume tokens, whose storms are not guessing).
        """
        pending = self._pending.get if count_pending else (lambda key, default: 0)
        address_wait = self.addresses.retry_after(address, pending(("address", address), 0))
        if address_wait:
            raise RateLimited(
                f"Too many failed logins from your address; {retry_text(address_wait)}."
            )
        account_wait = self.accounts.retry_after(account, pending(("account", account), 0))
        if account_wait:
            raise RateLimited(
                f"Too many failed logins for this account; {retry_text(account_wait)}."
            )
        for key in (("account", account), ("address", address)):
            self._pending[key] = self._pending.get(key, 0) + 1

    def end(self, account, address, succeeded):
        """The attempt `begin` let through is over: True (right), False (wrong) or None (neither)."""
        for key in (("account", account), ("address", address)):
            left = self._pending.pop(key) - 1
            if left:
                self._pending[key] = left
        if succeeded:
            self.accounts.forget(account)
        elif succeeded is False:
            self.accounts.record(account)
            self.addresses.record(address)


class TokenBucket(_Swept):
    """Per key, a burst of `burst` events, refilled at `rate` per second."""

    def __init__(self, clock, burst, rate):
        self._clock = clock
        self.burst = burst
        self.rate = rate
        self._buckets = {}  # key -> (tokens, time of that count)

    def _tokens(self, key, now):
        tokens, then = self._buckets.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - then) * self.rate)

    def take(self, key):
        """Use one token: 0 if there was one, else the seconds until there is."""
        now = self._clock.seconds()
        self._maybe_sweep(self._buckets, lambda key: self._tokens(key, now) >= self.burst)
        tokens = self._tokens(key, now)
        if tokens < 1 - 1e-6:  # (a retry exactly when told must not fail on rounding)
            return (1 - tokens) / self.rate
        self._buckets[key] = (max(0.0, tokens - 1), now)
        return 0

    def refund(self, key):
        """Give back a token taken for something that turned out to cost nothing."""
        now = self._clock.seconds()
        self._buckets[key] = (min(self.burst, self._tokens(key, now) + 1), now)
