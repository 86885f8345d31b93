"""The domain records every layer speaks: what the store returns and services pass on.

Plain immutable tuples, no behaviour: the store fills them, services decide
with them, and only the connection layer turns them into wire boxes. Times
are seconds since the epoch, as the injected clock gives them.
"""

from collections import namedtuple

Conversation = namedtuple("Conversation", "id kind title members last_seq")
Message = namedtuple("Message", "id conversation_id seq sender body sent_at")
Receipt = namedtuple("Receipt", "conversation_id reader state seq at")
Membership = namedtuple("Membership", "conversation_id delivered_seq read_seq last_seq")
Stored = namedtuple("Stored", "message new")  # the answer to storing a message: new, or a resend
MarkMove = namedtuple("MarkMove", "state old new senders")  # a mark moved from old to new
Presence = namedtuple("Presence", "username status note at")  # a user's combined status changed
