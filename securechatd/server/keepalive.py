"""Dead-connection detection: ping a quiet connection, drop one that stays silent.

One timer per connection, rescheduled only when it fires (not on every
packet), so busy connections cost nothing. Any bytes from the client count
as a sign of life, including an error answer to the ping.
"""


class KeepAlive:
    def __init__(self, clock, ping, drop, ping_after, drop_after):
        self.clock = clock
        self.ping = ping
        self.drop = drop
        self.ping_after = ping_after
        self.drop_after = drop_after
        self.last_heard = clock.seconds()
        self._timer = clock.callLater(ping_after, self._check)

    def heard(self):
        self.last_heard = self.clock.seconds()

    def _check(self):
        now = self.clock.seconds()
        quiet = now - self.last_heard
        if quiet >= self.drop_after:
            self._timer = None
            self.drop()
            return
        if quiet >= self.ping_after:
            self.ping()
            due = self.last_heard + self.drop_after
        else:
            due = self.last_heard + self.ping_after
        self._timer = self.clock.callLater(due - now, self._check)

    def stop(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
