"""Actions a device starts in the account log's name, checked before they are done.

A session bound to a device signs what it asks for (ending a session,
changing the second factor, a new password): the device's Ed25519 key,
from the user's device chain, over the action, its target, the device's
time and a nonce (securechatd/accountlog.py, ACTION_LABEL). The event then
carries that signature, so the server cannot invent it (TRUST.md §2.8); the
time must be near the server's and a nonce is accepted once, so a signed
action cannot be played again later. A session bound to no device (a
version 1 client) signs nothing and its events say so (no device).
"""

from securechatd.accountlog import ACTION_LABEL, ACTION_WINDOW, NONCE_BYTES, SIGNATURE_BYTES, Action, action_fields
from securechatd.commands import BadSignature, InvalidArgument, NoSuchDevice, NoSuchUser, NotAllowed
from securechatd.server.keys import signed_by
from securechatd.store.account_log import NewEvent


class ActionChecker:
    def __init__(self, store, clock, run_in_thread):
        self.store = store
        self.clock = clock
        self._run = run_in_thread

    async def event(self, session, kind, target, time_ms, nonce, signature, required=True):
        """The NewEvent to log for `kind` on `target`, started by `session`, with its device's signature.

        From a session bound to a device the signature is required (unless
        `required` is False: then without one the event names no device);
        from one bound to none it is refused. Raises the coded error of the
        first check that fails.
        """
        given = [value is not None for value in (time_ms, nonce, signature)]
        unsigned = NewEvent(kind, session.address, session.session_id, b"", target)
        if session.device_id is None:
            if any(given):
                raise InvalidArgument("Only a session bound to a device signs an action (log in with device_id).")
            return unsigned
        if not all(given):
            if any(given) or required:
                raise InvalidArgument(
                    "A session bound to a device signs this action: action_time, action_nonce and action_signature."
                )
            return unsigned
        if len(nonce) != NONCE_BYTES or len(signature) != SIGNATURE_BYTES or time_ms < 0:
            raise InvalidArgument(
                f"action_nonce is {NONCE_BYTES} bytes, action_signature {SIGNATURE_BYTES} and action_time not negative."
            )
        if abs(time_ms / 1000 - self.clock.seconds()) > ACTION_WINDOW:
            raise NotAllowed(
                f"The action's time is more than {ACTION_WINDOW // 60} minutes from the server's clock:"
                " check your device's clock and sign it again."
            )
        chain = await self.store.chain_state(session.username, [session.device_id])
        if chain is None:
            raise NoSuchUser("Your account no longer exists.")
        device = chain.devices.get(session.device_id)
        if device is None or device.revoked_seq is not None:
            raise NoSuchDevice(f"Device {session.device_id} is not a current device of your chain.")
        device_id = bytes.fromhex(session.device_id)
        fields = action_fields(session.username, device_id, kind, target, time_ms, nonce)
        if not await self._run(signed_by, device.sig_pub, signature, ACTION_LABEL, fields):
            raise BadSignature("The action's signature does not check with this session's device key.")
        return unsigned._replace(device=device_id, action=Action(time_ms, nonce, signature))
