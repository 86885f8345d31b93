"""SQL for the key directory: device chains, the devices they imply, prekeys, device-bound tokens.

Public material only: the server never holds a private key. A chain's links
are kept as published (clients check their bytes); `devices` is what the
links say so far, so checks need not replay a chain. Every change to a chain
checks, in its own transaction, that the chain is still where the caller saw
it, so two links racing for the same place cannot both be accepted.
"""

from collections import namedtuple

from securechatd.store.account_log import append_event
from securechatd.store.accounts import AccountStore
from securechatd.store.base import USER_ID, StoreBase, blobs_page, placeholders, user_id

# device_id: 32 hex digits; revoked_seq: None while current
Device = namedtuple("Device", "device_id sig_pub dh_pub name added_seq revoked_seq")
# where a user's chain stands: its last link (0, None without one), the devices asked about, how many are current
ChainState = namedtuple("ChainState", "seq hash devices current")
# a link checked by the service, in the terms the store keeps it (`data`: its bytes, `device`: hex)
NewLink = namedtuple("NewLink", "seq prev hash data op device sig_pub dh_pub name")
# what a claim hands out: the device, its signed prekey, and one one-time prekey (None, None when none is left)
PrekeyBundle = namedtuple("PrekeyBundle", "device spk_id spk_pub spk_signature opk_id opk_pub")

_DEVICE_COLUMNS = "device_id, sig_pub, dh_pub, name, added_seq, revoked_seq"
_CURRENT = "revoked_seq IS NULL"
_OF_DEVICE = "user_id = ? AND device_id = ?"


def _head(txn, uid):
    """(seq, hash) of the user's last link; (0, None) without a chain."""
    txn.execute("SELECT seq, hash FROM chain_links WHERE user_id = ? ORDER BY seq DESC LIMIT 1", (uid,))
    row = txn.fetchone()
    return (row[0], bytes(row[1])) if row else (0, None)


def _device(txn, uid, device_id):
    txn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE {_OF_DEVICE}", (uid, device_id))
    row = txn.fetchone()
    return _device_record(row) if row else None


def _device_record(row):
    device_id, sig_pub, dh_pub, name, added_seq, revoked_seq = row
    return Device(device_id, bytes(sig_pub), bytes(dh_pub), name, added_seq, revoked_seq)


def _count_one_time(txn, uid, device_id):
    txn.execute(f"SELECT COUNT(*) FROM one_time_prekeys WHERE {_OF_DEVICE}", (uid, device_id))
    return txn.fetchone()[0]


def _binding_refused(txn, uid, device_id):
    """"revoked" / "unknown" if the user's chain lists `device_id` as revoked / does not list it, else None
    (a user without a chain may bind any device: the one about to publish link 1)."""
    device = _device(txn, uid, device_id)
    if device is not None and device.revoked_seq is not None:
        return "revoked"
    if device is None and _head(txn, uid)[0]:
        return "unknown"
    return None


class KeyStore(StoreBase):
    # -- chains ----------------------------------------------------------------------

    def chain_state(self, username, device_ids):
        """Deferred: the ChainState of `username`'s chain with the Devices among `device_ids`; None for no user."""
        return self._read("chain_state", self._chain_state_txn, username, list(device_ids))

    @staticmethod
    def _chain_state_txn(txn, username, device_ids):
        uid = user_id(txn, username)
        if uid is None:
            return None
        seq, digest = _head(txn, uid)
        devices = {}
        if device_ids:
            txn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = ? AND device_id IN {placeholders(device_ids)}",
                (uid, *device_ids),
            )
            devices = {row[0]: _device_record(row) for row in txn.fetchall()}
        txn.execute(f"SELECT COUNT(*) FROM devices WHERE user_id = ? AND {_CURRENT}", (uid,))
        return ChainState(seq, digest, devices, txn.fetchone()[0])

    def append_link(self, username, link, now, event=None):
        """Deferred: True if the NewLink `link` now ends the chain (with an `event`, its Logged leaf);
        False if the chain is no longer at link.seq - 1 with hash link.prev (another link got there
        first), or the user is gone.

        What the link does to its device happens in the same transaction: an
        add lists it, a name renames it, a revoke marks it and drops its
        prekeys, the resume tokens of sessions bound to it and the wraps
        waiting for it (it can never log in to take them); and the account
        event `event` (a store.account_log.NewEvent) is logged, so a link is
        never stored without its event, nor an event without its link.
        """
        return self._write("append_link", self._append_link_txn, username, link, now, event)

    @staticmethod
    def _append_link_txn(txn, username, link, now, event):
        uid = user_id(txn, username)
        if uid is None:
            return False
        seq, digest = _head(txn, uid)
        if seq != link.seq - 1 or (seq and digest != link.prev):
            return False
        txn.execute(
            "INSERT INTO chain_links (user_id, seq, hash, link, published_at) VALUES (?, ?, ?, ?, ?)",
            (uid, link.seq, link.hash, link.data, now),
        )
        device = (uid, link.device)
        if link.op == "add":
            txn.execute(
                "INSERT INTO devices (user_id, device_id, sig_pub, dh_pub, name, added_seq) VALUES (?, ?, ?, ?, ?, ?)",
                (*device, link.sig_pub, link.dh_pub, link.name, link.seq),
            )
        elif link.op == "name":
            txn.execute(f"UPDATE devices SET name = ? WHERE {_OF_DEVICE}", (link.name, *device))
        else:
            txn.execute(f"UPDATE devices SET revoked_seq = ? WHERE {_OF_DEVICE}", (link.seq, *device))
            for table in ("one_time_prekeys", "signed_prekeys", "resume_tokens", "wraps"):
                txn.execute(f"DELETE FROM {table} WHERE {_OF_DEVICE}", device)
        return True if event is None else append_event(txn, uid, username, event, now)

    def device_chain(self, username, after_seq, limit):
        """Deferred: ([link bytes], has_more): `username`'s links after `after_seq`, at most `limit`; None for no user."""
        return self._read("device_chain", self._device_chain_txn, username, after_seq, limit)

    @staticmethod
    def _device_chain_txn(txn, username, after_seq, limit):
        uid = user_id(txn, username)
        if uid is None:
            return None
        return blobs_page(
            txn, "SELECT link FROM chain_links WHERE user_id = ? AND seq > ? ORDER BY seq LIMIT ?", (uid, after_seq), limit
        )

    def current_devices(self, username):
        """Deferred: the Devices of `username`'s chain that are not revoked, in the order they were added."""
        return self._read("current_devices", self._current_devices_txn, username)

    @staticmethod
    def _current_devices_txn(txn, username):
        txn.execute(
            f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE user_id = ({USER_ID}) AND {_CURRENT} ORDER BY added_seq",
            (username,),
        )
        return [_device_record(row) for row in txn.fetchall()]

    # -- prekeys -----------------------------------------------------------------------

    def store_prekeys(self, username, device_id, spk, one_time, max_stored, now):
        """Deferred: replace the device's signed prekey `spk` (id, pub, signature) and add the
        one-time prekeys `one_time` [(id, pub)], all or nothing. Answers (outcome, value):

        ("stored", one-time prekeys now stored); ("no device", None) if the device is not
        current; ("conflict", id) if an id is stored with another key (one stored with the
        same key is a retried upload: kept as it is); ("full", stored) if the device would
        hold more than `max_stored`.
        """
        return self._write(
            "store_prekeys", self._store_prekeys_txn, username, device_id, spk, list(one_time), max_stored, now
        )

    @staticmethod
    def _store_prekeys_txn(txn, username, device_id, spk, one_time, max_stored, now):
        uid = user_id(txn, username)
        device = _device(txn, uid, device_id) if uid is not None else None
        if device is None or device.revoked_seq is not None:
            return "no device", None
        new = dict(one_time)
        if new:
            txn.execute(
                f"SELECT opk_id, opk_pub FROM one_time_prekeys WHERE {_OF_DEVICE} AND opk_id IN {placeholders(new)}",
                (uid, device_id, *new),
            )
            for opk_id, opk_pub in txn.fetchall():
                if bytes(opk_pub) != new.pop(opk_id):
                    return "conflict", opk_id
        stored = _count_one_time(txn, uid, device_id)
        if stored + len(new) > max_stored:
            return "full", stored
        spk_id, spk_pub, signature = spk
        txn.execute(
            "INSERT INTO signed_prekeys (user_id, device_id, spk_id, spk_pub, signature, uploaded_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (user_id, device_id) DO UPDATE SET"
            " spk_id = excluded.spk_id, spk_pub = excluded.spk_pub, signature = excluded.signature,"
            " uploaded_at = excluded.uploaded_at",
            (uid, device_id, spk_id, spk_pub, signature, now),
        )
        txn.executemany(
            "INSERT INTO one_time_prekeys (user_id, device_id, opk_id, opk_pub, uploaded_at) VALUES (?, ?, ?, ?, ?)",
            [(uid, device_id, opk_id, opk_pub, now) for opk_id, opk_pub in new.items()],
        )
        return "stored", stored + len(new)

    def count_prekeys(self, username, device_id):
        """Deferred: how many one-time prekeys of the device are left."""
        return self._read("count_prekeys", self._count_prekeys_txn, username, device_id)

    @staticmethod
    def _count_prekeys_txn(txn, username, device_id):
        uid = user_id(txn, username)
        return 0 if uid is None else _count_one_time(txn, uid, device_id)

    def claim_prekeys(self, username, device_id):
        """Deferred: (outcome, PrekeyBundle or None), outcome one of "claimed", "no user",
        "no device" (not a current device of the user's chain), "no prekeys" (no signed prekey yet).

        The one-time prekey handed out is deleted in the same transaction that
        reads it, so it is handed out at most once.
        """
        return self._write("claim_prekeys", self._claim_prekeys_txn, username, device_id)

    @staticmethod
    def _claim_prekeys_txn(txn, username, device_id):
        uid = user_id(txn, username)
        if uid is None:
            return "no user", None
        device = _device(txn, uid, device_id)
        if device is None or device.revoked_seq is not None:
            return "no device", None
        txn.execute(f"SELECT spk_id, spk_pub, signature FROM signed_prekeys WHERE {_OF_DEVICE}", (uid, device_id))
        spk = txn.fetchone()
        if spk is None:
            return "no prekeys", None
        opk_id = opk_pub = None
        while True:  # (an engine with concurrent writers may see another claim delete the row first)
            txn.execute(
                f"SELECT opk_id, opk_pub FROM one_time_prekeys WHERE {_OF_DEVICE} ORDER BY opk_id LIMIT 1",
                (uid, device_id),
            )
            row = txn.fetchone()
            if row is None:
                break
            txn.execute(f"DELETE FROM one_time_prekeys WHERE {_OF_DEVICE} AND opk_id = ?", (uid, device_id, row[0]))
            if txn.rowcount == 1:
                opk_id, opk_pub = row[0], bytes(row[1])
                break
        return "claimed", PrekeyBundle(device, spk[0], bytes(spk[1]), bytes(spk[2]), opk_id, opk_pub)

    # -- sessions bound to a device ------------------------------------------------------

    def device_binding(self, username, device_id):
        """Deferred: None if a session of `username` may bind to `device_id` now, else "revoked" or
        "unknown" (as add_device_resume_token would answer)."""
        return self._read("device_binding", self._device_binding_txn, username, device_id)

    @staticmethod
    def _device_binding_txn(txn, username, device_id):
        uid = user_id(txn, username)
        return None if uid is None else _binding_refused(txn, uid, device_id)

    def add_device_resume_token(self, username, session_id, token_hash, now, expires_at, generation, device_id):
        """Deferred: record the resume token of a session bound to `device_id`, as add_resume_token does.

        Answers "recorded"; "stale" if the password changed since `generation`
        (nothing recorded); or, recording nothing, "revoked" / "unknown" if the
        user's chain lists the device as revoked / does not list it. A user
        without a chain may bind any device (the one about to publish link 1).
        Checked in the token's own transaction, so no token outlives a revoke.
        """
        return self._write(
            "add_device_resume_token",
            self._add_device_resume_token_txn,
            username,
            session_id,
            token_hash,
            now,
            expires_at,
            generation,
            device_id,
        )

    @staticmethod
    def _add_device_resume_token_txn(txn, username, session_id, token_hash, now, expires_at, generation, device_id):
        uid = user_id(txn, username)
        if uid is None:
            return "stale"
        refused = _binding_refused(txn, uid, device_id)
        if refused:
            return refused
        if not AccountStore._add_resume_token_txn(txn, username, session_id, token_hash, now, expires_at, generation):
            return "stale"
        txn.execute("UPDATE resume_tokens SET device_id = ? WHERE token_hash = ?", (device_id, token_hash))
        return "recorded"
