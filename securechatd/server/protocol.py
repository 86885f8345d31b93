"""The AMP responders: parse, check the connection's state, call a service, shape the answer.

No business rules live here: limits, paging and permissions are the
services'. Every service method returns a Deferred (server/policy.py);
its result is turned into the AMP answer with server/wire.py. Responders
sit on ChatLocator (one per connection), separate from the connection's
box handling and limits (server/connection.py), as in Flocker.
"""

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols import amp

from securechatd import commands
from securechatd.commands import (
    AlreadyAuthenticated,
    AuthRequired,
    ChatError,
    EnrolmentRequired,
    InvalidArgument,
    NotAllowed,
    SecondFactorRequired,
    ServiceUnavailable,
)
from securechatd.server import wire
from securechatd.server.accounts import PendingLogin
from securechatd.server.framing import command_and_responder
from securechatd.store.base import StoreError

log = Logger()


def _nothing(result):
    return {}


# What a connection whose login waits for its second step may do (by PendingLogin.enrol).
_WAITING = {
    False: "This login waits for its second factor: send the code (SecondFactor), or Logout.",
    True: "This login waits for an enrolment in two-factor login (BeginTwoFactor, ConfirmTwoFactor), or Logout.",
}


class ChatLocator(amp.CommandLocator):
    """Responders for one connection; `self.session` is None until login."""

    def __init__(self, connection, hub, clock):
        self.connection = connection
        self.hub = hub
        self.accounts = hub.accounts
        self.clock = clock
        self.session = None
        self._logging_in = False
        self.pending = None  # a server.accounts.PendingLogin: a login waiting for its second step
        self._pending_presence = (None, None)

    def run(self, name, box):
        """Run command `name` with the arguments in `box`: its answer box, or a Deferred of it."""
        entry = command_and_responder(self, name)
        if entry is None:
            raise amp.RemoteAmpError(amp.UNHANDLED_ERROR_CODE, f"Unhandled Command: {name!r}")
        command, responder = entry
        arguments = command.parseArguments(box, self)  # malformed: InvalidArgument
        answer = responder(self, **arguments)
        if isinstance(answer, Deferred):
            return answer.addCallback(command.makeResponse, self)
        return command.makeResponse(answer, self)

    def error_of(self, failure, name):
        """(code, description) answering `failure`; undeclared ones (a bug, a database error) are logged."""
        error = failure.value
        if isinstance(error, ChatError):
            return error.code, str(error)
        if isinstance(error, amp.RemoteAmpError):
            return error.errorCode, error.description
        command = name.decode("ascii", "replace")
        if isinstance(error, StoreError):
            log.error("{command}: database error: {problem}", command=command, problem=error)
        else:
            log.failure("{command} failed", failure, command=command)
        return ServiceUnavailable.code, "The server could not do that just now; try again later."

    # -- state checks --------------------------------------------------------

    def _session(self):
        if self.session is None:
            if self.pending is not None:
                raise AuthRequired(_WAITING[self.pending.enrol])
            raise AuthRequired("Log in first.")
        return self.session

    def _not_logged_in(self):
        if self.session is not None or self._logging_in:
            raise AlreadyAuthenticated("This connection is already logged in.")
        if self.pending is not None:
            raise AlreadyAuthenticated(_WAITING[self.pending.enrol])

    def _address(self):
        return self.connection.address

    def _initial_presence(self, status, note):
        """The presence a session starts with (checked before any login work); (None, None): online."""
        if status is None:
            if note is not None:
                raise InvalidArgument("A note goes with a status.")
            return None, None
        self.hub.presence.check(status, note)
        return status, note

    async def _logged_in(self, login, presence=(None, None)):
        self._logging_in = True
        try:
            outcome = await login
        finally:
            self._logging_in = False
        if isinstance(outcome, PendingLogin):
            self._wait_for_second_step(outcome, presence)
        session, token = outcome
        return self._online(session, token, presence)

    def _online(self, session, token, presence):
        """The login's answer: `session` goes online now."""
        if self.connection.lost:
            session.end()
            raise AuthRequired("The connection closed during login.")
        if presence[0] is not None:  # before anyone can see it: a reconnect does not flash online
            session.status, session.note = presence
        self.session = session
        self.connection.logged_in()
        self.hub.session_started(session)
        return {
            "username": session.username,
            "session_id": session.session_id,
            "server_time": wire.utc(self.clock.seconds()),
            "resume_token": token,
            "max_message_bytes": self.hub.messages.max_body,
        }

    def end_session(self):
        """This connection's session is over, however it ended (a login waiting for its second step too)."""
        self._forget_pending("the connection closed")
        session, self.session = self.session, None
        if session is not None:
            self.hub.session_ended(session)
        return session

    # -- the second step of a login (issue 13) --------------------------------------------

    def _wait_for_second_step(self, pending, presence):
        """Hold `pending` in place of a session, and say what the client does next (raises)."""
        if self.connection.lost:
            self.accounts.abandon(pending, "the connection closed")
            raise AuthRequired("The connection closed during login.")
        self.pending, self._pending_presence = pending, presence
        self.connection.awaiting_second_factor(self.accounts.timeout(pending))
        if pending.enrol:
            raise EnrolmentRequired(
                "This server requires two-factor login: enrol (BeginTwoFactor, then ConfirmTwoFactor with a code"
                " from your authenticator app) to finish logging in."
            )
        raise SecondFactorRequired("Give the code from your authenticator app, or a recovery code (SecondFactor).")

    def _forget_pending(self, why):
        pending, self.pending = self.pending, None
        if pending is not None:
            self.accounts.abandon(pending, why)

    def _pending_login(self):
        if self.pending is None or self.pending.over:
            if self.session is not None:
                raise AlreadyAuthenticated("This connection is already logged in.")
            raise AuthRequired("No login waits for a second step here: log in first.")
        return self.pending

    async def _second_step(self, pending, step):
        """Await `step` of `pending`: once it is over, the connection forgets it (and logs in if it passed)."""
        try:
            outcome = await step
        except BaseException:
            if pending.over and self.pending is pending:
                self.pending = None
                self.connection.second_step_over()
            raise
        self.pending = None
        *extra, session, token = outcome
        answer = self._online(session, token, self._pending_presence)
        if extra:
            answer["recovery_codes"] = extra[0]
        return answer

    @commands.SecondFactor.responder
    def second_factor(self, code):
        pending = self._pending_login()
        step = self.accounts.second_factor(pending, code, self.connection)
        return Deferred.fromCoroutine(self._second_step(pending, step))

    @commands.BeginTwoFactor.responder
    def begin_two_factor(self):
        if self.pending is not None:
            begun = self.accounts.begin_enrolment(self._pending_login())
        else:
            begun = self.hub.security.begin(self._session())
        return begun.addCallback(lambda result: {"secret": result[0], "uri": result[1]})

    @commands.ConfirmTwoFactor.responder
    def confirm_two_factor(self, code, password=None, action_time=None, action_nonce=None, action_signature=None):
        if self.pending is not None:  # (at login nothing is signed: the device is not logged in yet)
            pending = self._pending_login()
            step = self.hub.security.confirm_enrolment(pending, code, password, self.connection)
            return Deferred.fromCoroutine(self._second_step(pending, step))
        action = (action_time, action_nonce, action_signature)
        confirmed = self.hub.security.confirm(self._session(), code, password, action, self._address())
        return confirmed.addCallback(lambda codes: {"recovery_codes": codes})

    # -- accounts --------------------------------------------------------------

    @commands.Register.responder
    def register(self, username, password, invite=None):
        self._not_logged_in()
        registered = self.accounts.register(
            username, password, self._address(), invite, self.connection.certificate_name
        )
        return registered.addCallback(lambda name: {"username": name})

    @commands.Login.responder
    def login(self, username, password, client_name=None, device_id=None, status=None, note=None):
        self._not_logged_in()
        presence = self._initial_presence(status, note)
        login = self.accounts.login(
            username, password, client_name, self._address(), self.connection, device_id,
            self.connection.certificate_name,
        )
        return Deferred.fromCoroutine(self._logged_in(login, presence))

    @commands.Resume.responder
    def resume(self, username, resume_token, client_name=None, device_id=None, status=None, note=None):
        self._not_logged_in()
        presence = self._initial_presence(status, note)
        login = self.accounts.resume(
            username, resume_token, client_name, self._address(), self.connection, device_id,
            self.connection.certificate_name,
        )
        return Deferred.fromCoroutine(self._logged_in(login, presence))

    @commands.Logout.responder
    def logout(self):
        if self.session is None and self.pending is not None:  # gives up a login's second step
            if self.pending.over or self.pending.confirming:  # (its answer may still log the connection in)
                raise NotAllowed("This login's second step is being checked: wait for its answer.")
            self._forget_pending("logged out")
            self.connection.second_step_over()
            return {}
        return self.accounts.logout(self._session()).addCallback(self._logged_out)

    def _logged_out(self, result):
        self.end_session()
        self.connection.logged_out()
        return {}

    @commands.ChangePassword.responder
    def change_password(self, old_password, new_password, action_time=None, action_nonce=None, action_signature=None):
        action = (action_time, action_nonce, action_signature)
        changed = self.accounts.change_password(self._session(), old_password, new_password, self._address(), action)
        return changed.addCallback(_nothing)

    @commands.Ping.responder
    def ping(self):
        return {"server_time": wire.utc(self.clock.seconds())}

    # -- presence and users ------------------------------------------------------

    @commands.SetPresence.responder
    def set_presence(self, status, note=None):
        return self.hub.presence.set_status(self._session(), status, note).addCallback(_nothing)

    @commands.GetPresence.responder
    def get_presence(self, usernames):
        rows = self.hub.presence.get(self._session(), usernames)
        return rows.addCallback(
            lambda rows: {
                "presence": [
                    {
                        "username": name,
                        "status": status,
                        "note": note,
                        "last_seen": None if seen is None else wire.utc(seen),
                    }
                    for name, status, note, seen in rows
                ]
            }
        )

    @commands.ListUsers.responder
    def list_users(self, prefix=None, limit=None):
        users = self.hub.presence.list_users(self._session(), prefix, limit)
        return users.addCallback(
            lambda rows: {"users": [{"username": name, "status": status} for name, status in rows]}
        )

    # -- conversations -----------------------------------------------------------

    @commands.CreateConversation.responder
    def create_conversation(self, members, title=None, encrypted=None):
        created = self.hub.conversations.create(self._session(), members, title, encrypted)
        return created.addCallback(
            lambda result: {
                "conversation_id": result[0].id,
                "created": result[1],
                "encrypted": True if result[0].encrypted else None,  # (absent for plaintext, as in version 1)
                "invited": result[2] or None,  # (absent when nobody was: as in version 1)
            }
        )

    @commands.ListConversations.responder
    def list_conversations(self, after_id=None):
        listing = self.hub.conversations.listing(self._session(), after_id)
        return listing.addCallback(self._conversations)

    @staticmethod
    def _conversations(result):
        rows, has_more = result
        items = [
            wire.conversation_item(conversation, last_seq=conversation.last_seq, unread=unread)
            for conversation, unread in rows
        ]
        return wire.page(commands.ListConversations, "conversations", items, has_more)

    @commands.AddMembers.responder
    def add_members(self, conversation_id, members, membership=None):
        added = self.hub.conversations.add_members(self._session(), conversation_id, members, membership)
        return added.addCallback(lambda invited: {"invited": invited or None})  # (absent when nobody was)

    @commands.LeaveConversation.responder
    def leave_conversation(self, conversation_id, membership=None):
        left = self.hub.conversations.leave(self._session(), conversation_id, membership)
        return left.addCallback(_nothing)

    @commands.PublishMembership.responder
    def publish_membership(self, conversation_id, membership):
        published = self.hub.conversations.publish_membership(self._session(), conversation_id, membership)
        return published.addCallback(lambda epoch: {"epoch": epoch})

    @commands.GetMembership.responder
    def get_membership(self, conversation_id, after_epoch=None):
        states = self.hub.conversations.membership_states(self._session(), conversation_id, after_epoch)
        return states.addCallback(lambda result: wire.strings_page(*result, name="states"))

    # -- messages ------------------------------------------------------------------

    @commands.SendMessage.responder
    def send_message(self, conversation_id, client_msg_id, body):
        sent = self.hub.messages.send(self._session(), conversation_id, client_msg_id, body)
        return sent.addCallback(
            lambda message: {"message_id": message.id, "seq": message.seq, "sent_at": wire.utc(message.sent_at)}
        )

    @commands.History.responder
    def history(self, conversation_id, before_seq=None, limit=None):
        page = self.hub.messages.history(self._session(), conversation_id, before_seq, limit)
        return page.addCallback(self._history)

    @staticmethod
    def _history(result):
        newest_first, has_more = result
        items = [wire.message_item(message) for message in newest_first]
        answer = wire.page(commands.History, "messages", items, has_more)  # cut from the oldest end
        answer["messages"].reverse()
        return answer

    # -- encrypted messages ----------------------------------------------------------

    @staticmethod
    def _wraps(wraps):
        return [(item["device_id"], item["wrap"]) for item in wraps]

    @commands.StageWraps.responder
    def stage_wraps(self, conversation_id, client_msg_id, wraps):
        staged = self.hub.encrypted.stage(self._session(), conversation_id, client_msg_id, self._wraps(wraps))
        return staged.addCallback(lambda count: {"staged": count})

    @commands.SendEncrypted.responder
    def send_encrypted(self, conversation_id, client_msg_id, header, body, wraps, staged=None, signature=None):
        sent = self.hub.encrypted.send(
            self._session(), conversation_id, client_msg_id, header, body, self._wraps(wraps), staged, signature
        )
        return sent.addCallback(wire.sent_encrypted_answer)

    @commands.HistoryEncrypted.responder
    def history_encrypted(self, conversation_id, before_seq=None, limit=None):
        page = self.hub.encrypted.history(self._session(), conversation_id, before_seq, limit)
        return page.addCallback(self._history_encrypted)

    @staticmethod
    def _history_encrypted(result):
        newest_first, has_more = result
        items = [wire.envelope_item(message) for message in newest_first]
        answer = wire.page(commands.HistoryEncrypted, "messages", items, has_more)  # cut from the oldest end
        answer["messages"].reverse()
        return answer

    @commands.MarkRead.responder
    def mark_read(self, conversation_id, seq, private=None):
        marked = self.hub.receipts.mark_read(self._session(), conversation_id, seq, bool(private))
        return marked.addCallback(_nothing)

    @commands.GetReceipts.responder
    def get_receipts(self, conversation_id, message_id, after=None):
        receipts = self.hub.receipts.receipts(self._session(), conversation_id, message_id, after)
        return receipts.addCallback(
            lambda result: wire.page(
                commands.GetReceipts, "receipts", [wire.receipt_item(*row) for row in result[0]], result[1]
            )
        )

    # -- verifiable conversations ------------------------------------------------------

    @commands.GetServerKey.responder
    def get_server_key(self):
        self._session()
        return self.hub.chain.server_key().addCallback(lambda result: {"key": result[0], "key_id": result[1]})

    @commands.GetChain.responder
    def get_chain(self, conversation_id, after_n=None, limit=None):
        page = self.hub.chain.chain(self._session(), conversation_id, after_n, limit)
        return page.addCallback(lambda result: {"links": result[0], "heads": result[1], "has_more": result[2]})

    @commands.PublishMode.responder
    def publish_mode(self, conversation_id, event):
        published = self.hub.chain.publish_mode(self._session(), conversation_id, event)
        return published.addCallback(lambda result: {"number": result[0], "receipt": result[1]})

    @commands.GetModes.responder
    def get_modes(self, conversation_id, after_number=None):
        page = self.hub.chain.modes(self._session(), conversation_id, after_number)
        return page.addCallback(lambda result: {"events": result[0], "has_more": result[1]})

    @commands.SignTranscript.responder
    def sign_transcript(self, conversation_id, head):
        return self.hub.chain.sign_transcript(self._session(), conversation_id, head).addCallback(_nothing)

    @commands.GetTranscriptHeads.responder
    def get_transcript_heads(self, conversation_id):
        heads = self.hub.chain.transcript_heads(self._session(), conversation_id)
        return heads.addCallback(lambda found: {"heads": found})

    # -- devices and keys ------------------------------------------------------------

    @commands.PublishChainLink.responder
    def publish_chain_link(self, link):
        published = self.hub.keys.publish(self._session(), link)
        return published.addCallback(lambda result: {"seq": result[0], "hash": result[1]})

    @commands.GetDeviceChain.responder
    def get_device_chain(self, username, after_seq=None):
        page = self.hub.keys.chain(self._session(), username, after_seq)
        return page.addCallback(lambda result: {"links": result[0], "has_more": result[1]})

    @commands.UploadPrekeys.responder
    def upload_prekeys(self, device_id, spk_id, spk_pub, spk_signature, one_time):
        one_time = [(item["opk_id"], item["opk_pub"]) for item in one_time]
        uploaded = self.hub.keys.upload(self._session(), device_id, spk_id, spk_pub, spk_signature, one_time)
        return uploaded.addCallback(lambda count: {"count": count})

    @commands.CountPrekeys.responder
    def count_prekeys(self):
        return self.hub.keys.count(self._session()).addCallback(lambda count: {"count": count})

    @commands.ClaimPrekeyBundle.responder
    def claim_prekey_bundle(self, username, device_id):
        return self.hub.keys.claim(self._session(), username, device_id).addCallback(wire.bundle_answer)

    @commands.ListDevices.responder
    def list_devices(self):
        session = self._session()
        listing = self.hub.keys.devices(session)
        return listing.addCallback(lambda result: wire.devices_answer(*result, this_session=session))

    # -- account security (issue 13) ------------------------------------------------------

    @staticmethod
    def _action(action_time, action_nonce, action_signature):
        return (action_time, action_nonce, action_signature)

    @commands.TwoFactorStatus.responder
    def two_factor_status(self):
        status = self.hub.security.status(self._session())
        return status.addCallback(
            lambda result: {"enabled": result[0], "required": result[1], "recovery_codes_left": result[2]}
        )

    @commands.DisableTwoFactor.responder
    def disable_two_factor(self, code, **action):
        disabled = self.hub.security.disable(self._session(), code, self._action(**action), self._address())
        return disabled.addCallback(_nothing)

    @commands.NewRecoveryCodes.responder
    def new_recovery_codes(self, code, **action):
        made = self.hub.security.new_recovery_codes(self._session(), code, self._action(**action), self._address())
        return made.addCallback(lambda codes: {"recovery_codes": codes})

    @commands.ListSessions.responder
    def list_sessions(self):
        return self.hub.security.sessions(self._session()).addCallback(wire.sessions_answer)

    @commands.EndSession.responder
    def end_other_session(self, session_id, **action):
        ended = self.hub.security.end_session(self._session(), session_id, self._action(**action), self._address())
        return ended.addCallback(_nothing)

    @commands.EndOtherSessions.responder
    def end_other_sessions(self, **action):
        ended = self.hub.security.end_others(self._session(), self._action(**action), self._address())
        return ended.addCallback(lambda count: {"ended": count})

    @commands.GetAccountLog.responder
    def get_account_log(self, after_seq=None, tree_size=None):
        page = self.hub.security.account_log(self._session(), after_seq, tree_size)
        return page.addCallback(lambda result: wire.account_log_answer(*result))

    # -- privacy (issue 13) ------------------------------------------------------------------

    @commands.SetPrivacy.responder
    def set_privacy(self, hide_last_seen=None, appear_offline=None):
        changed = self.hub.presence.set_privacy(self._session(), hide_last_seen, appear_offline)
        return changed.addCallback(lambda result: {"hide_last_seen": result[0], "appear_offline": result[1]})

    @commands.InviteMembers.responder
    def invite_members(self, conversation_id, members):
        invited = self.hub.conversations.invite(self._session(), conversation_id, members)
        return invited.addCallback(lambda names: {"invited": names})

    @commands.GetInvitations.responder
    def get_invitations(self, conversation_id):
        listed = self.hub.conversations.group_invitations(self._session(), conversation_id)
        return listed.addCallback(
            lambda result: wire.page(
                commands.GetInvitations,
                "invitations",
                [
                    {"username": name, "inviter": inviter, "invited_at": wire.utc(at), "accepted": accepted}
                    for name, inviter, at, accepted in result[0]
                ],
                result[1],
            )
        )

    @commands.ListInvitations.responder
    def list_invitations(self):
        listed = self.hub.conversations.invitations(self._session())
        return listed.addCallback(
            lambda result: wire.page(
                commands.ListInvitations, "invitations", [wire.invitation_item(row) for row in result[0]], result[1]
            )
        )

    @commands.AnswerInvitation.responder
    def answer_invitation(self, conversation_id, accept):
        answered = self.hub.conversations.answer_invitation(self._session(), conversation_id, accept)
        return answered.addCallback(lambda joined: {"joined": joined})
