"""The AMP protocol: parse, check the connection's state, call a service.

No business rules live here. Responders sit on ChatLocator (one per
connection), separate from the AMP box handling, as in Flocker.
"""

import ipaddress

from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from securechatd import commands
from securechatd.commands import AlreadyAuthenticated, AuthRequired, ChatError, ServiceUnavailable
from securechatd.server.accounts import utc
from securechatd.server.sessions import IConnection

log = Logger()


def _declared(error):
    """An AMP error box for a declared ChatError raised before the responder ran."""
    return fail(amp.RemoteAmpError(error.code, str(error)))


class ChatLocator(amp.CommandLocator):
    """Responders for one connection; `self.session` is None until login."""

    def __init__(self, connection, accounts, clock):
        self.connection = connection
        self.accounts = accounts
        self.clock = clock
        self.session = None
        self._logging_in = False

    def locateResponder(self, name):
        responder = super().locateResponder(name)
        if responder is None:
            return None

        def respond(box):
            try:
                answer = responder(box)
            except ChatError as error:  # raised by ChatCommand.parseArguments
                return _declared(error)
            return answer.addErrback(self._unexpected, name)

        return respond

    def _unexpected(self, failure, name):
        """Answer an undeclared failure (a bug, a database error) with a code, keeping the connection."""
        if failure.check(amp.RemoteAmpError):
            return failure
        log.failure("{command} failed", failure, command=name.decode("ascii", "replace"))
        return _declared(ServiceUnavailable("The server could not do that just now; try again later."))

    # -- state checks --------------------------------------------------------

    def _session(self):
        if self.session is None:
            raise AuthRequired("Log in first.")
        return self.session

    def _not_logged_in(self):
        if self.session is not None or self._logging_in:
            raise AlreadyAuthenticated("This connection is already logged in.")

    def _address(self):
        """The client's IP address; IPv4 clients of a dual-stack socket as plain IPv4."""
        host = getattr(self.connection.transport.getPeer(), "host", "unknown")
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return host
        return str(getattr(address, "ipv4_mapped", None) or address)

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
        return {
            "username": session.username,
            "session_id": session.session_id,
            "server_time": utc(self.clock.seconds()),
            "resume_token": token,
        }

    # -- responders ----------------------------------------------------------

    @commands.Register.responder
    def register(self, username, password):
        self._not_logged_in()
        registered = self.accounts.register(username, password, self._address())
        return Deferred.fromCoroutine(registered).addCallback(lambda name: {"username": name})

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
        self.session = None
        return Deferred.fromCoroutine(self.accounts.logout(session)).addCallback(lambda _: {})

    @commands.ChangePassword.responder
    def change_password(self, old_password, new_password):
        changed = self.accounts.change_password(
            self._session(), old_password, new_password, self._address()
        )
        return Deferred.fromCoroutine(changed).addCallback(lambda _: {})

    @commands.Ping.responder
    def ping(self):
        return {"server_time": utc(self.clock.seconds())}


@implementer(IConnection)
class ChatProtocol(amp.AMP):
    """One client connection."""

    lost = False

    def __init__(self, accounts, clock):
        self.locator = ChatLocator(self, accounts, clock)
        super().__init__(locator=self.locator)

    def session_ended(self, reason):
        log.info("ending {session}: {reason}", session=self.locator.session, reason=reason)
        self.locator.session = None
        self.transport.loseConnection()

    def makeConnection(self, transport):
        # Skips AMP.makeConnection's info line per connection: noise at scale;
        # the security log records what matters (logins and failures).
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def connectionLost(self, reason):
        self.lost = True
        if self.locator.session is not None:
            self.locator.session.end()
            self.locator.session = None
        amp.BinaryBoxProtocol.connectionLost(self, reason)
        self.transport = None


class ChatFactory(Factory):
    """Makes a ChatProtocol per connection, all sharing the services."""

    noisy = False

    def __init__(self, accounts, clock):
        self.accounts = accounts
        self.clock = clock

    def buildProtocol(self, addr):
        protocol = ChatProtocol(self.accounts, self.clock)
        protocol.factory = self
        return protocol
