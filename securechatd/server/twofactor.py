"""Two-factor login's rules: enrolment, codes and recovery codes, each TOTP secret sealed under the server's key.

securechatd/totp.py does the RFC 6238 arithmetic; this is the policy
around it. An enrolment is on only once a code of its secret was right, so
a secret that never reached an app locks nobody out, and abandoning it
leaves two-factor login off. A time step is accepted only above the last
one accepted (compare and set in the store), so a code seen over someone's
shoulder is spent; a recovery code only once. `verify` with `commit` False
does the same reads and arithmetic and spends nothing: a login whose
password was wrong goes through it, so its answer and its cost do not say
the password was wrong before the code is given. Secrets and codes never
reach a log or an error.
"""

import base64

from twisted.logger import Logger

from securechatd import secretbox, totp
from securechatd.commands import BadCredentials, InvalidArgument, NotAllowed, ServiceUnavailable
from securechatd.server.account_log import REPLAYED
from securechatd.store.account_log import NewEvent

log = Logger()

MAX_CODE = 64  # characters of a typed code: a TOTP code or a recovery code with any spacing
WRONG_CODE = "That code is not right: check the time on the device that shows it, and try the next one."


def check_code_argument(code):
    if len(code) > MAX_CODE:
        raise InvalidArgument(f"A code is at most {MAX_CODE} characters.")


class TwoFactor:
    def __init__(self, store, clock, key, required, log_service, key_path, issuer="securechatd"):
        self.store = store
        self.issuer = issuer  # [accounts] totp_issuer: the name authenticator apps show
        self.clock = clock
        self.key = key  # secretbox key: seals each user's TOTP secret (never the signing key)
        self.key_path = key_path  # where it was read from, for the operator
        self.required = required  # [accounts] two_factor = required
        self.log = log_service  # the AccountLog: each change and each recovery code used is an event
        self._mismatch_told = False

    def _secret(self, username, sealed):
        try:
            return secretbox.unseal(self.key, username, sealed)
        except secretbox.Unsealable:
            self._tell_mismatch(username)
            raise ServiceUnavailable("The server cannot check two-factor codes just now; tell its operator.")

    def _tell_mismatch(self, username):
        """Tell the operator, once (each login would say it again), that the key file is not the database's."""
        if self._mismatch_told:
            return
        self._mismatch_told = True
        log.error(
            "the TOTP key {path} does not match the database: it does not open the two-factor secret of {user},"
            " so the secrets were sealed under another key (a key file or a database from another server?)."
            " Until that key is back in {path} and the daemon restarted, TOTP codes answer SERVICE_UNAVAILABLE;"
            " recovery codes still work. (If other users' codes do work, only {user}'s secret is damaged:"
            " securechatd-admin 2fa {user} --disable.) Said once.",
            path=self.key_path,
            user=username,
        )

    async def status(self, username):
        """(enabled, required, recovery codes left)."""
        state = await self.store.two_factor(username)
        enabled = state is not None and state.enabled
        return enabled, self.required, state.recovery_left if enabled else 0

    async def begin(self, username):
        """(base32 secret, otpauth URI) of a new enrolment, replacing one begun before; NOT_ALLOWED if on."""
        secret = totp.new_secret()
        sealed = secretbox.seal(self.key, username, secret)
        outcome = await self.store.begin_two_factor(username, sealed, self.clock.seconds())
        if outcome == "on":
            raise NotAllowed("Two-factor login is on already: switch it off first (DisableTwoFactor) to enrol again.")
        return base64.b32encode(secret).decode("ascii"), totp.provisioning_uri(secret, username, self.issuer)

    async def confirm(self, username, code, keep_session, event):
        """Switch the begun enrolment on with a right `code`: (recovery codes, new credential generation).

        BAD_CREDENTIALS for a wrong code (the enrolment waits for a right
        one); NOT_ALLOWED with no enrolment begun, or one begun again meanwhile.
        """
        check_code_argument(code)
        state = await self.store.two_factor(username)
        if state is None or state.enabled:
            raise NotAllowed("There is no enrolment to confirm: begin one (BeginTwoFactor).")
        step = totp.check(self._secret(username, state.sealed), code, self.clock.seconds(), None)
        if step is None:
            raise BadCredentials(WRONG_CODE)
        codes = totp.new_recovery_codes()
        hashes = [totp.recovery_code_hash(username, code) for code in codes]
        outcome, result = await self.store.enable_two_factor(
            username, state.sealed, step, hashes, keep_session, event, self.clock.seconds()
        )
        if outcome == "replayed":
            raise NotAllowed(REPLAYED)
        if outcome != "enabled":
            raise NotAllowed("This enrolment was begun again or confirmed meanwhile: use the newest secret.")
        generation, logged = result
        self.log.added(logged)
        return codes, generation

    async def verify(self, username, typed, address="", commit=True):
        """How `typed` proves `username`'s second factor ("totp" or "recovery"), or None.

        With `commit` the step or recovery code is spent (and a recovery
        code's use logged); without, nothing is (a login whose password was
        wrong does this same work).
        """
        code_hash = totp.recovery_code_hash(username, typed)
        state = await self.store.two_factor(username, code_hash)
        if state is None or not state.enabled:
            return None
        if code_hash is not None:
            if not (state.has_code and commit):
                return None
            used = await self.store.use_recovery_code(
                username, code_hash, NewEvent("recovery_code_used", address), self.clock.seconds()
            )
            self.log.added(used)
            return "recovery" if used is not None else None
        step = totp.check(self._secret(username, state.sealed), typed, self.clock.seconds(), state.last_step)
        if step is None or not commit:
            return None
        return "totp" if await self.store.accept_step(username, step) else None

    async def disable(self, username, event):
        """Switch two-factor login off (the caller checked a code and the setting); NOT_ALLOWED if not on."""
        self._logged(await self.store.disable_two_factor(username, event, self.clock.seconds()))

    async def new_recovery_codes(self, username, event):
        """Ten new recovery codes (the caller checked a code); the old ones are revoked."""
        codes = totp.new_recovery_codes()
        hashes = [totp.recovery_code_hash(username, code) for code in codes]
        self._logged(await self.store.replace_recovery_codes(username, hashes, event, self.clock.seconds()))
        return codes

    def _logged(self, outcome):
        if outcome is None:
            raise NotAllowed("Two-factor login is not on.")
        if outcome == "replayed":
            raise NotAllowed(REPLAYED)
        self.log.added(outcome)
