"""SQL for privacy: who sees whose presence, each user's privacy choices, invitations to groups.

Who may see U's presence, and who may add U to a group without inviting,
is one relation: the people U shares a conversation with of U's own accord
(`CONSENTS`): a group U is a member of (joining one takes U's consent now:
U created it, accepted an invitation, or was added by such a contact), or a
direct conversation in which U has written. Opening a direct conversation
with a stranger therefore shows their presence only once they answer.
"""

from collections import namedtuple

from securechatd.store.base import LIVE, USER_ID, StoreBase, placeholders, user_id
from securechatd.store.messaging import _add_members, conversation_row

# U (members row `mine`) consents to the member of row `theirs` of the same conversation
CONSENTS = (
    "(c.kind = 'group' OR EXISTS (SELECT 1 FROM messages x"
    " WHERE x.conversation_id = c.id AND x.sender_id = mine.user_id))"
)
_SHARED = (
    "members mine JOIN conversations c ON c.id = mine.conversation_id"
    " JOIN members theirs ON theirs.conversation_id = mine.conversation_id AND theirs.user_id <> mine.user_id"
)

# What a viewer may know of a user: last_seen, their choices, whether they consent to the viewer, and whether
# the two share any conversation at all (then the viewer knows the user exists: naming them searches nothing).
PresenceView = namedtuple("PresenceView", "last_seen hide_last_seen appear_offline consents shared")
# An invitation as its invitee lists it.
Invitation = namedtuple("Invitation", "conversation_id kind title inviter invited_at accepted encrypted")


class PrivacyStore(StoreBase):
    # -- presence ------------------------------------------------------------------------

    def audience(self, username):
        """Deferred: the users `username` consents to (see the module's docstring): their presence's audience."""
        return self._read("audience", self._audience_txn, username)

    @staticmethod
    def _audience_txn(txn, username):
        txn.execute(
            f"SELECT DISTINCT u.username FROM {_SHARED} JOIN users u ON u.id = theirs.user_id"
            f" WHERE mine.user_id = ({USER_ID}) AND {CONSENTS}",
            (username,),
        )
        return {name for (name,) in txn.fetchall()}

    def presence_view(self, viewer, usernames):
        """Deferred: {username: PresenceView} of those of `usernames` (at most 1000) that exist, for `viewer`."""
        return self._read("presence_view", self._presence_view_txn, viewer, list(usernames))

    @staticmethod
    def _presence_view_txn(txn, viewer, usernames):
        if not usernames:
            return {}
        txn.execute(
            "SELECT u.username, u.last_seen, u.hide_last_seen, u.appear_offline,"
            f" EXISTS (SELECT 1 FROM {_SHARED} WHERE mine.user_id = u.id AND theirs.user_id = ({USER_ID})"
            f"  AND {CONSENTS}),"
            f" EXISTS (SELECT 1 FROM {_SHARED} WHERE mine.user_id = u.id AND theirs.user_id = ({USER_ID}))"
            f" FROM users u WHERE u.username IN {placeholders(usernames)} AND u.{LIVE}",
            (viewer, viewer, *usernames),
        )
        return {
            name: PresenceView(seen, bool(hide), bool(appear), bool(consents), bool(shared))
            for name, seen, hide, appear, consents, shared in txn.fetchall()
        }

    def consenting(self, username, others):
        """Deferred: those of `others` (at most 1000 names) who consent to `username`: not strangers to them."""
        return self._read("consenting", self._consenting_txn, username, list(others))

    @staticmethod
    def _consenting_txn(txn, username, others):
        if not others:
            return set()
        txn.execute(
            f"SELECT DISTINCT u.username FROM {_SHARED} JOIN users u ON u.id = mine.user_id"
            f" WHERE theirs.user_id = ({USER_ID}) AND u.username IN {placeholders(others)} AND {CONSENTS}",
            (username, *others),
        )
        return {name for (name,) in txn.fetchall()}

    # -- each user's choices ------------------------------------------------------------

    def privacy(self, username):
        """Deferred: (hide_last_seen, appear_offline) of the user, or None if there is no such user."""
        return self._read("privacy", self._privacy_txn, username)

    @staticmethod
    def _privacy_txn(txn, username):
        txn.execute(f"SELECT hide_last_seen, appear_offline FROM users WHERE username = ? AND {LIVE}", (username,))
        row = txn.fetchone()
        return None if row is None else (bool(row[0]), bool(row[1]))

    def set_privacy(self, username, hide_last_seen, appear_offline):
        """Deferred: set the choices that are not None; the user's (hide_last_seen, appear_offline) after."""
        return self._write("set_privacy", self._set_privacy_txn, username, hide_last_seen, appear_offline)

    @staticmethod
    def _set_privacy_txn(txn, username, hide_last_seen, appear_offline):
        txn.execute(
            "UPDATE users SET hide_last_seen = COALESCE(?, hide_last_seen),"
            " appear_offline = COALESCE(?, appear_offline)"
            f" WHERE username = ? AND {LIVE} RETURNING hide_last_seen, appear_offline",
            (hide_last_seen, appear_offline, username),
        )
        row = txn.fetchone()
        return None if row is None else (bool(row[0]), bool(row[1]))

    # -- invitations ---------------------------------------------------------------------

    def invite(self, conversation_id, inviter, usernames, now):
        """Deferred: those of `usernames` now invited to the conversation (members, those invited
        already and unknown names are left out)."""
        return self._write("invite", self._invite_txn, conversation_id, inviter, list(usernames), now)

    @staticmethod
    def _invite_txn(txn, conversation_id, inviter, usernames, now):
        invited = []
        for name in usernames:
            txn.execute(
                "INSERT INTO invitations (conversation_id, user_id, inviter, invited_at)"
                f" SELECT ?, id, ?, ? FROM users WHERE username = ? AND {LIVE} AND NOT EXISTS"
                " (SELECT 1 FROM members WHERE conversation_id = ? AND user_id = users.id)"
                " ON CONFLICT DO NOTHING",
                (conversation_id, inviter, now, name, conversation_id),
            )
            if txn.rowcount == 1:
                invited.append(name)
        return invited

    def invitations_of(self, username, limit):
        """Deferred: [Invitation] of the user to conversations they are not a member of, oldest first."""
        return self._read("invitations_of", self._invitations_of_txn, username, limit)

    @staticmethod
    def _invitations_of_txn(txn, username, limit):
        txn.execute(
            "SELECT i.conversation_id, c.kind, c.title, i.inviter, i.invited_at, i.accepted_at IS NOT NULL, c.encrypted"
            " FROM invitations i JOIN conversations c ON c.id = i.conversation_id"
            f" WHERE i.user_id = ({USER_ID}) AND NOT EXISTS"
            " (SELECT 1 FROM members m WHERE m.conversation_id = i.conversation_id AND m.user_id = i.user_id)"
            " ORDER BY i.invited_at, i.conversation_id LIMIT ?",
            (username, limit),
        )
        return [
            Invitation(cid, kind, title, inviter, at, bool(accepted), bool(encrypted))
            for cid, kind, title, inviter, at, accepted, encrypted in txn.fetchall()
        ]

    def group_invitations(self, conversation_id, limit):
        """Deferred: [(username, inviter, invited_at, accepted)] of the conversation's invitations, oldest first."""
        return self._read("group_invitations", self._group_invitations_txn, conversation_id, limit)

    @staticmethod
    def _group_invitations_txn(txn, conversation_id, limit):
        txn.execute(
            "SELECT u.username, i.inviter, i.invited_at, i.accepted_at IS NOT NULL"
            " FROM invitations i JOIN users u ON u.id = i.user_id WHERE i.conversation_id = ? AND NOT EXISTS"
            " (SELECT 1 FROM members m WHERE m.conversation_id = i.conversation_id AND m.user_id = i.user_id)"
            " ORDER BY i.invited_at, u.username LIMIT ?",
            (conversation_id, limit),
        )
        return [(name, inviter, at, bool(accepted)) for name, inviter, at, accepted in txn.fetchall()]

    def answer_invitation(self, conversation_id, username, accept, join, now):
        """Deferred: answer the user's invitation. Declined: it is deleted ("declined"). Accepted with
        `join`: they become a member, the invitation is deleted: the Conversation after. Accepted
        without (an encrypted group: a member's signed state adds them): it is marked ("accepted").
        None if they hold no such invitation (or are a member already)."""
        return self._write("answer_invitation", self._answer_txn, conversation_id, username, accept, join, now)

    @staticmethod
    def _answer_txn(txn, conversation_id, username, accept, join, now):
        uid = user_id(txn, username)
        if uid is None:
            return None
        txn.execute(
            "SELECT 1 FROM invitations i WHERE i.conversation_id = ? AND i.user_id = ? AND NOT EXISTS"
            " (SELECT 1 FROM members m WHERE m.conversation_id = i.conversation_id AND m.user_id = i.user_id)",
            (conversation_id, uid),
        )
        if txn.fetchone() is None:
            return None
        if not accept or join:
            txn.execute("DELETE FROM invitations WHERE conversation_id = ? AND user_id = ?", (conversation_id, uid))
        if not accept:
            return "declined"
        if not join:
            txn.execute(
                "UPDATE invitations SET accepted_at = ? WHERE conversation_id = ? AND user_id = ?",
                (now, conversation_id, uid),
            )
            return "accepted"
        txn.execute("SELECT last_seq FROM conversations WHERE id = ?", (conversation_id,))
        (last_seq,) = txn.fetchone()
        _add_members(txn, conversation_id, [username], now, last_seq)
        return conversation_row(txn, conversation_id)

    def accepted_invitations(self, conversation_id, usernames):
        """Deferred: those of `usernames` (at most 1000) who accepted an invitation to the conversation."""
        return self._read("accepted_invitations", self._accepted_txn, conversation_id, list(usernames))

    @staticmethod
    def _accepted_txn(txn, conversation_id, usernames):
        if not usernames:
            return set()
        txn.execute(
            "SELECT u.username FROM invitations i JOIN users u ON u.id = i.user_id"
            f" WHERE i.conversation_id = ? AND i.accepted_at IS NOT NULL AND u.username IN {placeholders(usernames)}",
            (conversation_id, *usernames),
        )
        return {name for (name,) in txn.fetchall()}

    def drop_invitations(self, conversation_id, usernames):
        """Deferred: forget the invitations of `usernames` (at most 1000) to the conversation: they joined."""
        return self._write("drop_invitations", self._drop_txn, conversation_id, list(usernames))

    @staticmethod
    def _drop_txn(txn, conversation_id, usernames):
        if usernames:
            txn.execute(
                f"DELETE FROM invitations WHERE conversation_id = ? AND user_id IN"
                f" (SELECT id FROM users WHERE username IN {placeholders(usernames)})",
                (conversation_id, *usernames),
            )
