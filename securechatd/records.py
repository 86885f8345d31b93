"""The domain records every layer speaks: what the store returns and services pass on.

Plain immutable tuples, no behaviour: the store fills them, services decide
with them, and only the connection layer turns them into wire boxes. Times
are seconds since the epoch, as the injected clock gives them. (One
exception: a ChainLink's receipt is set once, in the transaction that
appends the link, before anyone else sees it.)
"""

from collections import namedtuple
from dataclasses import dataclass

# encrypted: end-to-end encrypted (for life); epoch, members_hash: its latest signed membership state (0, None: none)
Conversation = namedtuple(
    "Conversation", "id kind title members last_seq encrypted epoch members_hash", defaults=(False, 0, None)
)
Message = namedtuple("Message", "id conversation_id seq sender body sent_at")
# A message of an encrypted conversation: header and body as sent, and wraps {device_id: wrap}
# (every recipient device's when just stored; only the reading device's when read back); its
# sender device's signature (b"": none), its ChainLink, and (when just stored) the names of
# members with a current device it has no wrap for. Never hashed.
EncryptedMessage = namedtuple(
    "EncryptedMessage",
    "id conversation_id seq sender sender_device sent_at header body wraps signature link left_out",
    defaults=(b"", None, ()),
)


@dataclass(slots=True)
class ChainLink:
    """Link n of an encrypted conversation's hash chain: e_n, the link's bytes (docs/E2EE.md), and
    its receipt from the server (None: no signed head covers it yet)."""

    conversation_id: int
    n: int
    e: bytes
    data: bytes
    receipt: bytes = None

Receipt = namedtuple("Receipt", "conversation_id reader state seq at")
# first_wrap: the lowest seq of a wrap waiting for the device asked about (None: none, or not asked)
Membership = namedtuple(
    "Membership", "conversation_id delivered_seq read_seq last_seq encrypted first_wrap", defaults=(False, None)
)
Stored = namedtuple("Stored", "message new")  # the answer to storing a message: new, or a resend
MarkMove = namedtuple("MarkMove", "state old new senders")  # a mark moved from old to new
Presence = namedtuple("Presence", "username status note at")  # a user's combined status changed
