"""The wire contract: AMP commands and error codes shared by server and client.

Names here are fixed by PROTOCOL.md; outside clients are written against them.
Every command declares every error code, so a client always gets a typed
exception and never a bare UNHANDLED/UNKNOWN for an expected failure.
"""

from twisted.protocols import amp


class ChatError(Exception):
    """A declared, expected failure; str() is the description sent to the client."""

    code = b""


def _error(name, code):
    return type(name, (ChatError,), {"code": code, "__doc__": f"AMP error {code.decode()}."})


AuthRequired = _error("AuthRequired", b"AUTH_REQUIRED")
AlreadyAuthenticated = _error("AlreadyAuthenticated", b"ALREADY_AUTHENTICATED")
BadCredentials = _error("BadCredentials", b"BAD_CREDENTIALS")
RateLimited = _error("RateLimited", b"RATE_LIMITED")
InvalidUsername = _error("InvalidUsername", b"INVALID_USERNAME")
WeakPassword = _error("WeakPassword", b"WEAK_PASSWORD")
UsernameTaken = _error("UsernameTaken", b"USERNAME_TAKEN")
InvalidArgument = _error("InvalidArgument", b"INVALID_ARGUMENT")
NoSuchUser = _error("NoSuchUser", b"NO_SUCH_USER")
NoSuchConversation = _error("NoSuchConversation", b"NO_SUCH_CONVERSATION")
NotAllowed = _error("NotAllowed", b"NOT_ALLOWED")
MessageTooLarge = _error("MessageTooLarge", b"MESSAGE_TOO_LARGE")
ServiceUnavailable = _error("ServiceUnavailable", b"SERVICE_UNAVAILABLE")

ERRORS = {
    cls: cls.code
    for cls in (
        AuthRequired,
        AlreadyAuthenticated,
        BadCredentials,
        RateLimited,
        InvalidUsername,
        WeakPassword,
        UsernameTaken,
        InvalidArgument,
        NoSuchUser,
        NoSuchConversation,
        NotAllowed,
        MessageTooLarge,
        ServiceUnavailable,
    )
}
ERRORS_BY_CODE = {code: cls for cls, code in ERRORS.items()}

BAD_CREDENTIALS_TEXT = "Wrong username or password."


class ChatCommand(amp.Command):
    """A command whose malformed arguments raise InvalidArgument, not a crash.

    Plain AMP lets a missing argument or invalid UTF-8 escape as an undeclared
    exception, which answers UNKNOWN and closes the connection.
    """

    errors = ERRORS

    @classmethod
    def parseArguments(cls, box, protocol):
        try:
            return super().parseArguments(box, protocol)
        except Exception:
            raise InvalidArgument(f"Malformed arguments to {cls.commandName.decode()}.")


# -- accounts (before login) --------------------------------------------------


class Register(ChatCommand):
    arguments = [(b"username", amp.Unicode()), (b"password", amp.Unicode())]
    response = [(b"username", amp.Unicode())]


_LOGGED_IN = [
    (b"username", amp.Unicode()),
    (b"session_id", amp.Unicode()),
    (b"server_time", amp.DateTime()),
    (b"resume_token", amp.Unicode()),
]


class Login(ChatCommand):
    arguments = [
        (b"username", amp.Unicode()),
        (b"password", amp.Unicode()),
        (b"client_name", amp.Unicode(optional=True)),
    ]
    response = _LOGGED_IN


class Resume(ChatCommand):
    arguments = [
        (b"username", amp.Unicode()),
        (b"resume_token", amp.Unicode()),
        (b"client_name", amp.Unicode(optional=True)),
    ]
    response = _LOGGED_IN


class Logout(ChatCommand):
    arguments = []
    response = []


class ChangePassword(ChatCommand):
    arguments = [(b"old_password", amp.Unicode()), (b"new_password", amp.Unicode())]
    response = []


class Ping(ChatCommand):
    arguments = []
    response = [(b"server_time", amp.DateTime())]
