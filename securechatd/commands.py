"""The wire contract: AMP commands and error codes shared by server and client.

Names here are fixed by PROTOCOL.md; outside clients are written against them.
Every command declares every error code, so a client always gets a typed
exception and never a bare UNHANDLED/UNKNOWN for an expected failure.
"""

import functools
import keyword

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
MailboxFull = _error("MailboxFull", b"MAILBOX_FULL")
NoSuchDevice = _error("NoSuchDevice", b"NO_SUCH_DEVICE")
BadSignature = _error("BadSignature", b"BAD_SIGNATURE")
SecondFactorRequired = _error("SecondFactorRequired", b"SECOND_FACTOR_REQUIRED")  # (issue 13) answer with SecondFactor
EnrolmentRequired = _error("EnrolmentRequired", b"ENROLMENT_REQUIRED")  # (issue 13) enrol to finish logging in
NoSuchSession = _error("NoSuchSession", b"NO_SUCH_SESSION")  # (issue 13)
InvitationRequired = _error("InvitationRequired", b"INVITATION_REQUIRED")  # (issue 13) strangers to a signed state

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
        MailboxFull,
        NoSuchDevice,
        BadSignature,
        SecondFactorRequired,
        EnrolmentRequired,
        NoSuchSession,
        InvitationRequired,
    )
}
ERRORS_BY_CODE = {code: cls for cls, code in ERRORS.items()}

BAD_CREDENTIALS_TEXT = "Wrong username or password."
# the answer to a wrong second step: it never says whether the password or the code was wrong
SECOND_FACTOR_TEXT = "Wrong username, password or code; log in again."
# the same for an id that does not exist and one the caller is not in; it names no id (clients show it as is)
NO_SUCH_CONVERSATION_TEXT = "You are not in that conversation, or it does not exist."

# -- limits both sides need (the server enforces them, clients stay within them) --------

MAX_CLIENT_MSG_ID = 64  # characters of SendMessage's client_msg_id
MAX_PRESENCE_NAMES = 100  # names per GetPresence, so an answer always fits one AMP value
MAX_NOTE_BYTES = 200  # UTF-8 bytes of a presence note
MAX_TITLE = 200  # characters of a group title
USERS_LIMIT = (50, 200)  # ListUsers' limit: (default, maximum)
HISTORY_LIMIT = (50, 500)  # History's limit: (default, maximum)
MAX_LINK_BYTES = 512  # a device chain link (docs/E2EE.md: at most 410 bytes as the format stands)
CHAIN_PAGE = 100  # links per GetDeviceChain answer: 100 of MAX_LINK_BYTES fit one AMP value
MAX_PREKEYS_PER_UPLOAD = 100  # one-time prekeys in one UploadPrekeys


class Integer(amp.Integer):
    """A 64-bit signed integer: anything larger is a malformed argument, not a database error."""

    def fromString(self, inString):
        value = super().fromString(inString)
        if not -(2**63) <= value < 2**63:
            raise ValueError("integer out of range")
        return value


# Argument types converted by the fast path below: each reads and writes exactly
# one key of the box, so toStringProto/fromStringProto is all AMP would do.
_ONE_KEY_TYPES = (amp.String, amp.Integer, amp.Boolean, amp.DateTime, amp.ListOf, amp.AmpList)


@functools.cache
def _fields(command, schema):
    """(wire name, Python name, Argument) for each entry of a command's `schema` list.

    An argument of any other type (one that spans several keys, like
    amp.Descriptor or a custom toBox/fromBox) would be mis-encoded by the
    fast path, so it is refused here rather than silently. An amp.AmpList
    is converted by _AmpListPath, whose item arguments obey the same rule.
    """
    return _checked_fields(command.__name__, getattr(command, schema))


def _checked_fields(owner, arguments):
    fields = []
    for wire, argument in arguments:
        name = wire.decode("ascii")
        kind = type(argument)
        if not (
            isinstance(argument, _ONE_KEY_TYPES)
            and kind.toBox is amp.Argument.toBox
            and kind.fromBox is amp.Argument.fromBox
        ):
            raise TypeError(f"{owner}.{name}: {type(argument).__name__} is not a one-key argument type")
        if not name.isidentifier() or keyword.iskeyword(name) or len(wire) > _KEY_LIMIT:
            raise TypeError(f"{owner}: {wire!r} is not a plain argument name")
        if (
            isinstance(argument, amp.AmpList)
            and kind.fromStringProto is amp.AmpList.fromStringProto
            and kind.toStringProto is amp.AmpList.toStringProto
        ):
            argument = _AmpListPath(argument, _checked_fields(f"{owner}.{name}", argument.subargs))
        fields.append((wire, name, argument))
    return tuple(fields)


_KEY_LIMIT = 255  # bytes of an AMP key
_VALUE_LIMIT = 0xFFFF  # bytes of an AMP value


class _AmpListPath:
    """An amp.AmpList's conversion in one loop: its value is a run of AMP boxes
    (2-byte length-prefixed keys and values, each box ended by an empty key),
    read straight into dicts and written in AMP's own byte order (sorted keys).

    Unlike amp.parseString, which silently drops an unfinished box at the
    end, a value that does not end exactly with a box's end is refused.
    """

    def __init__(self, argument, fields):
        self.optional = argument.optional
        self.subargs = argument.subargs
        self.fields = fields
        self.sorted_fields = tuple(sorted(fields))  # amp.AmpBox.serialize writes keys in order

    def fromStringProto(self, string, proto):
        fields = self.fields
        items = []
        box = {}
        key = None
        size = len(string)
        at = 0
        while at < size:
            start = at + 2
            if start > size:
                raise ValueError("an AmpList value cut short in a length")
            length = (string[at] << 8) | string[at + 1]
            if key is None:
                if length == 0:  # the end of a box
                    items.append(_from_box(box, fields))
                    box = {}
                    at = start
                    continue
                if length > _KEY_LIMIT:
                    raise ValueError("an AmpList key longer than 255 bytes")
            at = start + length
            if at > size:
                raise ValueError("an AmpList value cut short in a key or value")
            if key is None:
                key = string[start:at]
            else:
                box[key] = string[start:at]
                key = None
        if box or key is not None:
            raise ValueError("an AmpList value ending inside a box")
        return items

    def toStringProto(self, items, proto):
        parts = []
        for item in items:
            for wire, name, argument in self.sorted_fields:
                value = item.get(name) if argument.optional else item[name]
                if value is None and argument.optional:
                    continue
                string = argument.toStringProto(value, proto)
                if isinstance(string, str):  # (as amp.AmpBox.serialize)
                    raise TypeError(f"Unicode value for key {wire!r} not allowed: {string!r}")
                if len(string) > _VALUE_LIMIT:
                    raise amp.TooLong(False, True, string, wire)
                parts += (len(wire).to_bytes(2, "big"), wire, len(string).to_bytes(2, "big"), string)
            parts.append(b"\x00\x00")
        return b"".join(parts)


def _to_box(box, fields, objects):
    """Fill `box` from `objects` as AMP's Command.makeArguments/makeResponse would."""
    for wire, name, argument in fields:
        value = objects.get(name) if argument.optional else objects[name]
        if value is not None or not argument.optional:
            box[wire] = argument.toStringProto(value, None)
    return box


def _from_box(box, fields):
    """Python values from `box` as AMP's Command.parseArguments/parseResponse would (KeyError if one is missing)."""
    objects = {}
    for wire, name, argument in fields:
        string = box.get(wire)
        if string is None and not argument.optional:
            raise KeyError(wire)
        objects[name] = None if string is None else argument.fromStringProto(string, None)
    return objects


class ChatCommand(amp.Command):
    """A command whose malformed arguments raise InvalidArgument, not a crash.

    Plain AMP lets a missing argument or invalid UTF-8 escape as an undeclared
    exception, which answers UNKNOWN and closes the connection. Boxes are also
    converted in one loop over a cached field list: AMP's own conversion,
    run for every message both ways, cost as much as parsing the boxes.
    """

    errors = ERRORS

    @classmethod
    def parseArguments(cls, box, protocol):
        try:
            return _from_box(box, _fields(cls, "arguments"))
        except Exception:
            raise InvalidArgument(f"Malformed arguments to {cls.commandName.decode()}.")

    @classmethod
    def makeArguments(cls, objects, proto):
        fields = _fields(cls, "arguments")
        unknown = objects.keys() - {name for _, name, _ in fields}
        if unknown:
            raise amp.InvalidSignature(f"{', '.join(sorted(unknown))} is not a valid argument")
        return _to_box(cls.commandType(), fields, objects)

    @classmethod
    def parseResponse(cls, box, protocol):
        return _from_box(box, _fields(cls, "response"))

    @classmethod
    def makeResponse(cls, objects, proto):
        return _to_box(cls.responseType(), _fields(cls, "response"), objects)


# -- accounts (before login) --------------------------------------------------


class Register(ChatCommand):
    arguments = [
        (b"username", amp.Unicode()),
        (b"password", amp.Unicode()),
        (b"invite", amp.Unicode(optional=True)),
    ]
    response = [(b"username", amp.Unicode())]


_LOGGED_IN = [
    (b"username", amp.Unicode()),
    (b"session_id", amp.Unicode()),
    (b"server_time", amp.DateTime()),
    (b"resume_token", amp.Unicode()),
    (b"max_message_bytes", Integer(optional=True)),  # (addition) the server's limit on a body, so clients check first
]

# (addition) the presence a session starts with, so a reconnecting client is never shown online for a moment
_INITIAL_PRESENCE = [(b"status", amp.Unicode(optional=True)), (b"note", amp.Unicode(optional=True))]


class Login(ChatCommand):
    arguments = [
        (b"username", amp.Unicode()),
        (b"password", amp.Unicode()),
        (b"client_name", amp.Unicode(optional=True)),
        (b"device_id", amp.Unicode(optional=True)),  # version 2: binds the session to this device
        *_INITIAL_PRESENCE,
    ]
    response = _LOGGED_IN


class Resume(ChatCommand):
    arguments = [
        (b"username", amp.Unicode()),
        (b"resume_token", amp.Unicode()),
        (b"client_name", amp.Unicode(optional=True)),
        (b"device_id", amp.Unicode(optional=True)),
        *_INITIAL_PRESENCE,
    ]
    response = _LOGGED_IN


class Logout(ChatCommand):
    arguments = []
    response = []


# (issue 13) A device's signature over an action it starts (docs/PROTOCOL.md, "Account log"):
# required from a session bound to a device, refused from one bound to none.
_SIGNED_ACTION = [
    (b"action_time", Integer(optional=True)),  # ms since the epoch, the device's clock
    (b"action_nonce", amp.String(optional=True)),  # 16 random bytes
    (b"action_signature", amp.String(optional=True)),  # 64 bytes, Ed25519 under securechatd/account-action/v1
]


class ChangePassword(ChatCommand):
    arguments = [(b"old_password", amp.Unicode()), (b"new_password", amp.Unicode()), *_SIGNED_ACTION]
    response = []


class Ping(ChatCommand):
    arguments = []
    response = [(b"server_time", amp.DateTime())]


# -- presence and users ---------------------------------------------------------

STATUSES = ("online", "away", "busy", "invisible")


class SetPresence(ChatCommand):
    arguments = [(b"status", amp.Unicode()), (b"note", amp.Unicode(optional=True))]
    response = []


class GetPresence(ChatCommand):
    arguments = [(b"usernames", amp.ListOf(amp.Unicode()))]
    response = [
        (
            b"presence",
            amp.AmpList(
                [
                    (b"username", amp.Unicode()),
                    (b"status", amp.Unicode()),
                    (b"note", amp.Unicode(optional=True)),
                    (b"last_seen", amp.DateTime(optional=True)),
                ]
            ),
        )
    ]


class SetPrivacy(ChatCommand):
    """(issue 13) Hide your last-seen time, appear offline to everyone; absent: unchanged. Answers both."""

    arguments = [(b"hide_last_seen", amp.Boolean(optional=True)), (b"appear_offline", amp.Boolean(optional=True))]
    response = [(b"hide_last_seen", amp.Boolean()), (b"appear_offline", amp.Boolean())]


class ListUsers(ChatCommand):
    arguments = [(b"prefix", amp.Unicode(optional=True)), (b"limit", Integer(optional=True))]
    response = [(b"users", amp.AmpList([(b"username", amp.Unicode()), (b"status", amp.Unicode())]))]


# -- conversations ----------------------------------------------------------------


class CreateConversation(ChatCommand):
    arguments = [
        (b"members", amp.ListOf(amp.Unicode())),
        (b"title", amp.Unicode(optional=True)),
        (b"encrypted", amp.Boolean(optional=True)),  # (v2) absent: encrypted unless the server allows plaintext
    ]
    response = [
        (b"conversation_id", Integer()),
        (b"created", amp.Boolean()),
        (b"encrypted", amp.Boolean(optional=True)),
        (b"invited", amp.ListOf(amp.Unicode(), optional=True)),  # (v2) strangers invited instead; absent: none
    ]


class ListConversations(ChatCommand):
    arguments = [(b"after_id", Integer(optional=True))]
    response = [
        (
            b"conversations",
            amp.AmpList(
                [
                    (b"conversation_id", Integer()),
                    (b"kind", amp.Unicode()),
                    (b"title", amp.Unicode(optional=True)),
                    (b"members", amp.ListOf(amp.Unicode())),
                    (b"last_seq", Integer()),
                    (b"unread", Integer()),
                    (b"encrypted", amp.Boolean(optional=True)),  # (v2)
                ]
            ),
        ),
        (b"has_more", amp.Boolean(optional=True)),
    ]


class AddMembers(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"members", amp.ListOf(amp.Unicode())),
        (b"membership", amp.String(optional=True)),  # (v2) the signed state after the change: encrypted only
    ]
    response = [(b"invited", amp.ListOf(amp.Unicode(), optional=True))]  # (v2) strangers invited instead; absent: none


class LeaveConversation(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"membership", amp.String(optional=True)),  # (v2) the signed state after the change: encrypted only
    ]
    response = []


# -- messages ---------------------------------------------------------------------


class SendMessage(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"client_msg_id", amp.Unicode()),
        (b"body", amp.Unicode()),
    ]
    response = [(b"message_id", Integer()), (b"seq", Integer()), (b"sent_at", amp.DateTime())]


class History(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"before_seq", Integer(optional=True)),
        (b"limit", Integer(optional=True)),
    ]
    response = [
        (
            b"messages",
            amp.AmpList(
                [
                    (b"message_id", Integer()),
                    (b"seq", Integer()),
                    (b"sender", amp.Unicode()),
                    (b"body", amp.Unicode()),
                    (b"sent_at", amp.DateTime()),
                ]
            ),
        ),
        (b"has_more", amp.Boolean()),
    ]


class MarkRead(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"seq", Integer()),
        (b"private", amp.Boolean(optional=True)),
    ]
    response = []


class GetReceipts(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"message_id", Integer()),
        (b"after", amp.Unicode(optional=True)),
    ]
    response = [
        (
            b"receipts",
            amp.AmpList(
                [
                    (b"username", amp.Unicode()),
                    (b"delivered_at", amp.DateTime(optional=True)),
                    (b"read_at", amp.DateTime(optional=True)),
                ]
            ),
        ),
        (b"has_more", amp.Boolean(optional=True)),
    ]


# -- devices and keys (version 2) ---------------------------------------------------
#
# Device ids are 32 lower-case hex digits; keys, signatures, hashes and chain
# links are raw bytes (docs/E2EE.md). The server checks and stores, and never
# holds a private key.


class PublishChainLink(ChatCommand):
    arguments = [(b"link", amp.String())]
    response = [(b"seq", Integer()), (b"hash", amp.String())]


class GetDeviceChain(ChatCommand):
    arguments = [(b"username", amp.Unicode()), (b"after_seq", Integer(optional=True))]
    response = [(b"links", amp.ListOf(amp.String())), (b"has_more", amp.Boolean())]


class UploadPrekeys(ChatCommand):
    arguments = [
        (b"device_id", amp.Unicode()),
        (b"spk_id", Integer()),
        (b"spk_pub", amp.String()),
        (b"spk_signature", amp.String()),
        (b"one_time", amp.AmpList([(b"opk_id", Integer()), (b"opk_pub", amp.String())])),
    ]
    response = [(b"count", Integer())]


class CountPrekeys(ChatCommand):
    arguments = []
    response = [(b"count", Integer())]


class ClaimPrekeyBundle(ChatCommand):
    arguments = [(b"username", amp.Unicode()), (b"device_id", amp.Unicode())]
    response = [
        (b"spk_id", Integer()),
        (b"spk_pub", amp.String()),
        (b"spk_signature", amp.String()),
        (b"opk_id", Integer(optional=True)),
        (b"opk_pub", amp.String(optional=True)),
        (b"sig_pub", amp.String()),
        (b"dh_pub", amp.String()),
    ]


class ListDevices(ChatCommand):
    arguments = []
    response = [
        (
            b"devices",
            amp.AmpList([(b"device_id", amp.Unicode()), (b"name", amp.Unicode()), (b"added_seq", Integer())]),
        ),
        (
            b"sessions",
            amp.AmpList(
                [
                    (b"device_id", amp.Unicode(optional=True)),
                    (b"client_name", amp.Unicode(optional=True)),
                    (b"address", amp.Unicode(optional=True)),
                    (b"since", amp.DateTime()),
                    (b"this_session", amp.Boolean()),
                ]
            ),
        ),
        (b"has_more", amp.Boolean()),
    ]


# -- encrypted conversations (version 2) -----------------------------------------------
#
# Membership states, headers, bodies and wraps are the byte formats of
# docs/E2EE.md; the server checks their shape and their place, routes each
# wrap to its device only, and cannot read a body.

WRAP_ITEM = [(b"device_id", amp.Unicode()), (b"wrap", amp.String())]


class PublishMembership(ChatCommand):
    """The first signed membership state (epoch 1) of an encrypted conversation, by its creator."""

    arguments = [(b"conversation_id", Integer()), (b"membership", amp.String())]
    response = [(b"epoch", Integer())]


class GetMembership(ChatCommand):
    arguments = [(b"conversation_id", Integer()), (b"after_epoch", Integer(optional=True))]
    response = [(b"states", amp.ListOf(amp.String())), (b"has_more", amp.Boolean())]


class StageWraps(ChatCommand):
    """Wraps for a message about to be sent, when they do not fit one SendEncrypted (large groups)."""

    arguments = [(b"conversation_id", Integer()), (b"client_msg_id", amp.Unicode()), (b"wraps", amp.AmpList(WRAP_ITEM))]
    response = [(b"staged", Integer())]


class SendEncrypted(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"client_msg_id", amp.Unicode()),
        (b"header", amp.String()),
        (b"body", amp.String()),
        (b"wraps", amp.AmpList(WRAP_ITEM)),
        (b"staged", Integer(optional=True)),  # (added) how many wraps were staged for it; another number is refused
        (b"signature", amp.String(optional=True)),  # (added) the sender device's signature: attestable mode
    ]
    response = [
        (b"message_id", Integer()),
        (b"seq", Integer()),
        (b"sent_at", amp.DateTime()),
        (b"receipt", amp.String(optional=True)),  # (added) the server's signed receipt for the message's chain link
        # (added) members with a current device the message has no wrap for (their client fetches their chains)
        (b"missing", amp.ListOf(amp.Unicode(), optional=True)),
    ]


ENCRYPTED_MESSAGE = [
    (b"message_id", Integer()),
    (b"seq", Integer()),
    (b"sender", amp.Unicode()),
    (b"sender_device", amp.Unicode()),
    (b"sent_at", amp.DateTime()),
    (b"header", amp.String()),
    (b"body", amp.String()),
    (b"wrap", amp.String(optional=True)),  # this device's, while it has not acknowledged it
    (b"signature", amp.String(optional=True)),  # (added) the sender device's signature: attestable mode
    (b"link", amp.String(optional=True)),  # (added) the message's chain link
]


class HistoryEncrypted(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"before_seq", Integer(optional=True)),
        (b"limit", Integer(optional=True)),
    ]
    response = [(b"messages", amp.AmpList(ENCRYPTED_MESSAGE)), (b"has_more", amp.Boolean())]


# -- verifiable conversations (version 2) ---------------------------------------------
#
# Each encrypted conversation has a hash chain kept by the server: every
# message, membership state and mode event is a link; the server signs chain
# heads with its own Ed25519 key (docs/E2EE.md, "Verifiable conversations").


class GetServerKey(ChatCommand):
    """The server's Ed25519 public key (it signs chain heads) and its key id, to compare out of band."""

    arguments = []
    response = [(b"key", amp.String()), (b"key_id", amp.Unicode())]


class GetChain(ChatCommand):
    """Links after `after_n` in order, and the signed heads at or after the first of them that cover them."""

    arguments = [
        (b"conversation_id", Integer()),
        (b"after_n", Integer(optional=True)),
        (b"limit", Integer(optional=True)),
    ]
    response = [(b"links", amp.ListOf(amp.String())), (b"heads", amp.ListOf(amp.String())), (b"has_more", amp.Boolean())]


class PublishMode(ChatCommand):
    """A signed mode event (attestable or deniable) of an encrypted conversation, by a member's device."""

    arguments = [(b"conversation_id", Integer()), (b"event", amp.String())]
    response = [(b"number", Integer()), (b"receipt", amp.String())]


class GetModes(ChatCommand):
    arguments = [(b"conversation_id", Integer()), (b"after_number", Integer(optional=True))]
    response = [(b"events", amp.ListOf(amp.String())), (b"has_more", amp.Boolean())]


class SignTranscript(ChatCommand):
    """A transcript head signed by this session's device: kept (the newest per device) and passed to the members."""

    arguments = [(b"conversation_id", Integer()), (b"head", amp.String())]
    response = []


class GetTranscriptHeads(ChatCommand):
    """The newest transcript head of each member device that signed one."""

    arguments = [(b"conversation_id", Integer())]
    response = [(b"heads", amp.ListOf(amp.String()))]


# -- server to client ---------------------------------------------------------------


class DeliverEncrypted(ChatCommand):
    """A new message of an encrypted conversation, to a session bound to a device that has a wrap of it."""

    arguments = [
        (b"conversation_id", Integer()),
        *ENCRYPTED_MESSAGE,
        (b"receipt", amp.String(optional=True)),  # (added) the server's signed receipt for its chain link
    ]
    response = []


class ModeChanged(ChatCommand):
    """A member published a mode event (PublishMode): to the other members' device-bound sessions, so clients fetch
    the chain before they seal again."""

    arguments = [(b"conversation_id", Integer())]
    response = []


class DevicesChanged(ChatCommand):
    """A user's device chain changed (a device added or revoked): to the device-bound sessions of those who
    share a conversation with them, and their own others, so clients fetch the chain before encrypting again."""

    arguments = [(b"username", amp.Unicode())]
    response = []


class TranscriptSigned(ChatCommand):
    """A member's device signed a transcript head (SignTranscript): to the conversation's other members."""

    arguments = [(b"conversation_id", Integer()), (b"username", amp.Unicode()), (b"head", amp.String())]
    response = []


class Deliver(ChatCommand):
    arguments = [
        (b"message_id", Integer()),
        (b"conversation_id", Integer()),
        (b"seq", Integer()),
        (b"sender", amp.Unicode()),
        (b"body", amp.Unicode()),
        (b"sent_at", amp.DateTime()),
    ]
    response = []


class Receipt(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"username", amp.Unicode()),
        (b"state", amp.Unicode()),
        (b"seq", Integer()),
        (b"at", amp.DateTime()),
    ]
    response = []


class PresenceChanged(ChatCommand):
    arguments = [
        (b"username", amp.Unicode()),
        (b"status", amp.Unicode()),
        (b"note", amp.Unicode(optional=True)),
        (b"at", amp.DateTime()),
    ]
    response = []


class ConversationUpdated(ChatCommand):
    arguments = [
        (b"conversation_id", Integer()),
        (b"kind", amp.Unicode()),
        (b"title", amp.Unicode(optional=True)),
        (b"members", amp.ListOf(amp.Unicode())),
        (b"encrypted", amp.Boolean(optional=True)),  # (v2)
    ]
    response = []


# -- account security (issue 13) ------------------------------------------------------
#
# Two-factor login (TOTP, recovery codes), sessions under the user's control,
# the tamper-evident account log, invitations; docs/PROTOCOL.md, "Account security".

_LOGGED_IN_OPTIONAL = [(name, type(argument)(optional=True)) for name, argument in _LOGGED_IN]


class SecondFactor(ChatCommand):
    """The second step of a Login answered SECOND_FACTOR_REQUIRED: a TOTP code or a recovery code."""

    arguments = [(b"code", amp.Unicode())]
    response = _LOGGED_IN


class BeginTwoFactor(ChatCommand):
    """A new TOTP secret to enrol (base32, and the otpauth:// URI an app scans); on only once confirmed."""

    arguments = []
    response = [(b"secret", amp.Unicode()), (b"uri", amp.Unicode())]


class ConfirmTwoFactor(ChatCommand):
    """A code of the secret BeginTwoFactor gave: two-factor login is on; the recovery codes, shown once.

    After a Login answered ENROLMENT_REQUIRED, the answer also logs the connection in (the Login fields)."""

    arguments = [
        (b"code", amp.Unicode()),
        (b"password", amp.Unicode(optional=True)),  # the account's own: all but a Login's enrolment need it
        *_SIGNED_ACTION,
    ]
    response = [(b"recovery_codes", amp.ListOf(amp.Unicode())), *_LOGGED_IN_OPTIONAL]


class DisableTwoFactor(ChatCommand):
    arguments = [(b"code", amp.Unicode()), *_SIGNED_ACTION]  # a current code or a recovery code
    response = []


class NewRecoveryCodes(ChatCommand):
    """Ten new recovery codes, shown once; the old ones stop working."""

    arguments = [(b"code", amp.Unicode()), *_SIGNED_ACTION]  # a current code or a recovery code
    response = [(b"recovery_codes", amp.ListOf(amp.Unicode()))]


class TwoFactorStatus(ChatCommand):
    arguments = []
    response = [(b"enabled", amp.Boolean()), (b"required", amp.Boolean()), (b"recovery_codes_left", Integer())]


class ListSessions(ChatCommand):
    """The caller's sessions: those logged in now and those that may come back (a resume token)."""

    arguments = []
    response = [
        (
            b"sessions",
            amp.AmpList(
                [
                    (b"session_id", amp.Unicode()),
                    (b"device_id", amp.Unicode(optional=True)),
                    (b"client_name", amp.Unicode(optional=True)),
                    (b"address", amp.Unicode(optional=True)),
                    (b"since", amp.DateTime()),
                    (b"last_active", amp.DateTime()),
                    (b"online", amp.Boolean()),
                    (b"this_session", amp.Boolean()),
                ]
            ),
        ),
        (b"has_more", amp.Boolean()),
    ]


class EndSession(ChatCommand):
    """End one of the caller's other sessions: its connection closes and its resume token is revoked."""

    arguments = [(b"session_id", amp.Unicode()), *_SIGNED_ACTION]
    response = []


class EndOtherSessions(ChatCommand):
    arguments = [*_SIGNED_ACTION]
    response = [(b"ended", Integer())]  # sessions ended: logged in, or holding a resume token


class GetAccountLog(ChatCommand):
    """The caller's account events after `after_seq`, each with its inclusion proof in the signed tree
    head, and the consistency proof from the tree of `tree_size` leaves (the head the client saw last)."""

    arguments = [(b"after_seq", Integer(optional=True)), (b"tree_size", Integer(optional=True))]
    response = [
        (
            b"events",
            amp.AmpList([(b"event", amp.String()), (b"leaf_index", Integer()), (b"proof", amp.String())]),
        ),
        (b"tree_head", amp.String()),
        (b"consistency", amp.String()),
        (b"has_more", amp.Boolean()),
    ]


class InviteMembers(ChatCommand):
    """Invite people to a group: each becomes a member only by accepting (AnswerInvitation)."""

    arguments = [(b"conversation_id", Integer()), (b"members", amp.ListOf(amp.Unicode()))]
    response = [(b"invited", amp.ListOf(amp.Unicode()))]


INVITATION = [
    (b"conversation_id", Integer()),
    (b"kind", amp.Unicode()),
    (b"title", amp.Unicode(optional=True)),
    (b"inviter", amp.Unicode()),
    (b"invited_at", amp.DateTime()),
    (b"accepted", amp.Boolean()),  # accepted, waiting for a member's signed state (encrypted groups)
    (b"encrypted", amp.Boolean(optional=True)),
]


class GetInvitations(ChatCommand):
    """The invitations to a group the caller belongs to: who was invited, by whom, and who accepted
    (an encrypted group's accepted invitations wait for a member's signed state)."""

    arguments = [(b"conversation_id", Integer())]
    response = [
        (
            b"invitations",
            amp.AmpList(
                [
                    (b"username", amp.Unicode()),
                    (b"inviter", amp.Unicode()),
                    (b"invited_at", amp.DateTime()),
                    (b"accepted", amp.Boolean()),
                ]
            ),
        ),
        (b"has_more", amp.Boolean()),
    ]


class ListInvitations(ChatCommand):
    arguments = []
    response = [(b"invitations", amp.AmpList(INVITATION)), (b"has_more", amp.Boolean())]


class AnswerInvitation(ChatCommand):
    arguments = [(b"conversation_id", Integer()), (b"accept", amp.Boolean())]
    response = [(b"joined", amp.Boolean())]  # false: declined, or accepted and waiting for a member's signed state


class Invited(ChatCommand):
    """Server to client: the user was invited to a group (ListInvitations has it too)."""

    arguments = [(b"conversation_id", Integer()), *INVITATION[1:4], (b"encrypted", amp.Boolean(optional=True))]
    response = []


class InvitationAccepted(ChatCommand):
    """Server to client: someone accepted an invitation to an encrypted group; a member's device adds
    them with the signed membership state (AddMembers)."""

    arguments = [(b"conversation_id", Integer()), (b"username", amp.Unicode())]
    response = []
