"""The device chains a client has verified: fetched from the key directory, checked link by link, kept.

A chain is fetched from one link before the last one seen (GetDeviceChain's
`after_seq`, paged), so the first link of the answer must be the very link
seen last: a server that rewrote or cut the chain shows a fork there, and
one that appends a bad link fails ChainState.extend. Either is an alarm and
changes nothing held: the client keeps encrypting to the devices it
verified before. A chain seen for the first time is trusted on first use
(docs/E2EE.md, "Device chain"); a change of a known user's devices is
reported, never silent.
"""

from twisted.internet.defer import Deferred, succeed

from securechatd import commands
from securechatd.e2ee.chain import ChainError, ChainState, Fork, Link, verify_chain
from securechatd.e2ee.encoding import Malformed

# on_alarm kinds raised here
FORK = "fork"  # a chain that does not extend the one seen (rewritten, cut short, or a prev that does not link)
BAD_CHAIN = "bad_chain"  # a link that breaks another rule: malformed, bad signature, unknown or revoked signer, ...


class Chains:
    """{user: chain.ChainState} verified, backed by the device file's link bytes.

    `call(command, **arguments)` asks the server; `save()` writes the device
    file; `alarm(kind, user, detail)` and `devices_changed(user, added,
    removed)` (hex ids) are the client's callbacks; `clock` dates fetches.
    """

    def __init__(self, state, call, save, alarm, devices_changed, clock):
        self.state = state
        self._call = call
        self._save = save
        self._alarm = alarm
        self._devices_changed = devices_changed
        self._clock = clock
        self._chains = {}
        self._fetched = {}  # user -> when the server was last asked (clock seconds)
        self._fetching = {}  # user -> [Deferred] of callers waiting for the fetch under way
        self._stale_meanwhile = set()  # users marked stale while a fetch was under way: it may predate the change
        self._gone = set()  # users the server does not know (deleted): never fetched again in this run
        for user, links in state.chains.items():
            self._chains[user] = verify_chain(user, [Link.from_bytes(link) for link in links])

    def get(self, user):
        """The verified ChainState of `user`, or None if none was fetched yet (no fetch here)."""
        return self._chains.get(user)

    def device(self, user, device_id):
        """The DeviceKeys of a current device of `user`'s verified chain, or None."""
        chain = self._chains.get(user)
        found = chain.devices.get(device_id) if chain is not None else None
        return found.keys if found is not None else None

    def lookup(self, user, device_id):
        """device(), in the shape membership.MembershipState.extend asks for."""
        return self.device(user, device_id)

    def history_lookup(self, user, device_id):
        """As lookup(), also finding devices revoked since: for membership states a later one vouches for."""
        chain_state = self._chains.get(user)
        if chain_state is None:
            return None
        device = chain_state.devices.get(device_id) or chain_state.former.get(device_id)
        return device.keys if device is not None else None

    def owner(self, device_id):
        """The user whose kept chain lists the device `device_id` (32 hex digits) as current, or None."""
        for user, chain_state in self._chains.items():
            if any(device.hex() == device_id for device in chain_state.devices):
                return user
        return None

    def stale(self, users=None):
        """Fetch the chains of `users` (None: everyone's) at their next refresh, whatever their age."""
        for user in list(self._fetched) + list(self._fetching) if users is None else users:
            self._fetched.pop(user, None)
            if user in self._fetching:  # (its answer may be from before the change: not fresh when it comes)
                self._stale_meanwhile.add(user)

    def refresh(self, user, max_age=0.0):
        """Deferred ChainState of `user`, verified against what was seen; fetched unless fetched `max_age` seconds ago.

        A chain that breaks a rule raises the alarm and the state seen before
        is the answer (None if there was none): the caller goes on with what
        it verified. A user the server does not know (deleted) answers None.
        A fetch already under way for `user` is shared.
        """
        if user in self._gone:
            return succeed(None)
        fetched = self._fetched.get(user)
        if fetched is not None and self._clock.seconds() - fetched <= max_age and user in self._chains:
            return Deferred.fromCoroutine(self._known(user))
        waiting = Deferred()
        if user in self._fetching:
            self._fetching[user].append(waiting)
            return waiting
        self._fetching[user] = [waiting]
        fetch = Deferred.fromCoroutine(self._fetch(user))

        def done(result):
            self._stale_meanwhile.discard(user)
            for waiter in self._fetching.pop(user):
                waiter.callback(result)

        def failed(failure):
            self._stale_meanwhile.discard(user)
            for waiter in self._fetching.pop(user):
                waiter.errback(failure)

        fetch.addCallbacks(done, failed)
        return waiting

    async def _known(self, user):
        return self._chains.get(user)

    async def _fetch(self, user):
        known = self._chains.get(user)
        after = known.seq - 1 if known is not None and known.seq else 0
        fetched_at = self._clock.seconds()
        links = []
        while True:
            try:
                page = await self._call(commands.GetDeviceChain, username=user, after_seq=after + len(links))
            except commands.NoSuchUser:
                self._gone.add(user)  # (a name is never taken again: not asked again, nor charged as a search)
                return None  # deleted (or never was): no devices to encrypt to; what was verified is kept
            except commands.RateLimited:
                return known  # (too many directory searches just now: go on with what was verified)
            links += page["links"]
            if not page["has_more"] or not page["links"]:
                break
        if self._chains.get(user) is not known:  # our own link was taken meanwhile: start from it
            return await self._fetch(user)
        try:
            new = self._verify(user, known, links)
        except (ChainError, Malformed) as problem:
            self._alarm(FORK if isinstance(problem, Fork) else BAD_CHAIN, user, f"{user}'s device chain: {problem}")
            return known
        if user not in self._stale_meanwhile:  # (else the next refresh asks again)
            self._fetched[user] = fetched_at
        if known is not None and new.seq == known.seq:
            return known
        self._chains[user] = new
        self.state.chains[user] = self.state.chains.get(user, []) + links[1 if known is not None and known.seq else 0 :]
        self._save()
        if known is not None:
            added = sorted(device.hex() for device in new.devices.keys() - known.devices.keys())
            removed = sorted(device.hex() for device in known.devices.keys() - new.devices.keys())
            if added or removed:
                self._devices_changed(user, added, removed)
        return new

    @staticmethod
    def _verify(user, known, links):
        """The state after `links`: from link 1 for a user not seen, else from the last link seen (it comes first)."""
        parsed = [Link.from_bytes(link) for link in links]
        if known is None or not known.seq:
            return ChainState(user).extend(parsed)
        if not parsed:
            raise Fork(known.seq, f"the chain ends before link {known.seq}, which was seen")
        if parsed[0].seq != known.seq or parsed[0].hash() != known.head:
            raise Fork(known.seq, "it is not the link seen before with this seq")
        return known.extend(parsed[1:])

    def accept_own(self, user, link):
        """Our own link the server took (PublishChainLink answered): extend the chain with it and keep it."""
        known = self._chains.get(user) or ChainState(user)
        self._chains[user] = known.extend([link])
        self.state.chains[user] = self.state.chains.get(user, []) + [link.to_bytes()]
