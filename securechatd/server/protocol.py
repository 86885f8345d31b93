"""The AMP responders: parse, check the connection's state, call a service.

No business rules live here. Responders sit on ChatLocator (one per
connection), separate from the connection's box handling and limits
(server/connection.py), as in Flocker.
"""

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.protocols import amp

from securechatd import commands
from securechatd.commands import AlreadyAuthenticated, AuthRequired, ChatError, ServiceUnavailable
from securechatd.server.accounts import utc
from securechatd.server.messages import check_limit, page_within_limit
from securechatd.store.base import StoreError

log = Logger()

CONVERSATION_ITEM = dict(commands.ListConversations.response)[b"conversations"].subargs


def _answer(coroutine, shape=lambda result: {}):
    """Run a service coroutine; its result, passed through `shape`, is the AMP answer."""
    return Deferred.fromCoroutine(coroutine).addCallback(shape)


class ChatLocator(amp.CommandLocator):
    """Responders for one connection; `self.session` is None until login."""

    def __init__(self, connection, hub, clock):
        self.connection = connection
        self.hub = hub
        self.accounts = hub.accounts
        self.clock = clock
        self.session = None
        self._logging_in = False

    def run(self, name, box):
        """Run command `name` with the arguments in `box`: its answer box, or a Deferred of it."""
        entry = self._commandDispatch.get(name)
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
            raise AuthRequired("Log in first.")
        return self.session

    def _not_logged_in(self):
        if self.session is not None or self._logging_in:
            raise AlreadyAuthenticated("This connection is already logged in.")

    def _address(self):
        return self.connection.address

    async def _logged_in(self, login):
        self._logging_in = True
        try:
            session, token = await login
        finally:
            self._logging_in = False
        if self.connection.lost:
            session.end()
            raise AuthRequired("The connection closed during login.")
        self.session = session
        self.connection.logged_in()
        self.hub.session_started(session)
        return {
            "username": session.username,
            "session_id": session.session_id,
            "server_time": utc(self.clock.seconds()),
            "resume_token": token,
        }

    def end_session(self):
        """This connection's session is over, however it ended."""
        session, self.session = self.session, None
        if session is not None:
            self.hub.session_ended(session)
        return session

    # -- accounts --------------------------------------------------------------

    @commands.Register.responder
    def register(self, username, password, invite=None):
        self._not_logged_in()
        registered = self.accounts.register(username, password, self._address(), invite)
        return _answer(registered, lambda name: {"username": name})

    @commands.Login.responder
    def login(self, username, password, client_name=None):
        self._not_logged_in()
        login = self.accounts.login(username, password, client_name, self._address(), self.connection)
        return Deferred.fromCoroutine(self._logged_in(login))

    @commands.Resume.responder
    def resume(self, username, resume_token, client_name=None):
        self._not_logged_in()
        login = self.accounts.resume(
            username, resume_token, client_name, self._address(), self.connection
        )
        return Deferred.fromCoroutine(self._logged_in(login))

    @commands.Logout.responder
    def logout(self):
        session = self._session()

        async def logout():
            await self.accounts.logout(session)
            self.end_session()
            self.connection.logged_out()

        return _answer(logout())

    @commands.ChangePassword.responder
    def change_password(self, old_password, new_password):
        changed = self.accounts.change_password(
            self._session(), old_password, new_password, self._address()
        )
        return _answer(changed)

    @commands.Ping.responder
    def ping(self):
        return {"server_time": utc(self.clock.seconds())}

    # -- presence and users ------------------------------------------------------

    @commands.SetPresence.responder
    def set_presence(self, status, note=None):
        session = self._session()
        self.hub.limit_action(session)
        self.hub.presence.set_status(session, status, note)
        return {}

    @commands.GetPresence.responder
    def get_presence(self, usernames):
        self._session()
        return _answer(self.hub.presence.get(usernames), lambda rows: {"presence": rows})

    @commands.ListUsers.responder
    def list_users(self, prefix=None, limit=None):
        self._session()
        limit = check_limit(limit, 50, 200)
        listed = self.accounts.store.list_users((prefix or "").lower(), limit)

        def shape(names):
            status = self.hub.presence.status_of
            return {"users": [{"username": name, "status": status(name)[0]} for name in names]}

        return listed.addCallback(shape)

    # -- conversations -----------------------------------------------------------

    @commands.CreateConversation.responder
    def create_conversation(self, members, title=None):
        session = self._session()
        self.hub.limit_action(session)
        created = self.hub.conversations.create(session, members, title)
        return _answer(
            created, lambda result: {"conversation_id": result[0].id, "created": result[1]}
        )

    @commands.ListConversations.responder
    def list_conversations(self, after_id=None):
        listing = self.hub.conversations.listing(self._session())

        def shape(rows):
            items = [
                {
                    "conversation_id": conversation.id,
                    "kind": conversation.kind,
                    "title": conversation.title,
                    "members": list(conversation.members),
                    "last_seq": conversation.last_seq,
                    "unread": unread,
                }
                for conversation, unread in rows
                if after_id is None or conversation.id > after_id
            ]
            page = page_within_limit(items, CONVERSATION_ITEM)
            return {"conversations": page, "has_more": len(page) < len(items)}

        return _answer(listing, shape)

    @commands.AddMembers.responder
    def add_members(self, conversation_id, members):
        session = self._session()
        self.hub.limit_action(session)
        return _answer(self.hub.conversations.add_members(session, conversation_id, members))

    @commands.LeaveConversation.responder
    def leave_conversation(self, conversation_id):
        session = self._session()
        self.hub.limit_action(session)
        return _answer(self.hub.conversations.leave(session, conversation_id))

    # -- messages ------------------------------------------------------------------

    @commands.SendMessage.responder
    def send_message(self, conversation_id, client_msg_id, body):
        sent = self.hub.messages.send(self._session(), conversation_id, client_msg_id, body)
        return sent.addCallback(
            lambda message: {"message_id": message.id, "seq": message.seq, "sent_at": utc(message.sent_at)}
        )

    @commands.History.responder
    def history(self, conversation_id, before_seq=None, limit=None):
        page = self.hub.messages.history(self._session(), conversation_id, before_seq, limit)
        return _answer(page, lambda result: {"messages": result[0], "has_more": result[1]})

    @commands.MarkRead.responder
    def mark_read(self, conversation_id, seq, private=None):
        return _answer(
            self.hub.messages.mark_read(self._session(), conversation_id, seq, bool(private))
        )

    @commands.GetReceipts.responder
    def get_receipts(self, conversation_id, message_id, after=None):
        receipts = self.hub.messages.receipts(self._session(), conversation_id, message_id, after)
        return _answer(receipts, lambda result: {"receipts": result[0], "has_more": result[1]})
