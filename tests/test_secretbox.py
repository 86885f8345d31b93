"""The server key file (made once, 0600, refused when unfit) and secrets sealed under it for one user."""

import os
import stat

from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from twisted.trial import unittest

from securechatd import secretbox
from securechatd.secretbox import KeyFileError, Unsealable

SECRET = bytes(range(20))  # the size of a TOTP secret


class KeyFileTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.directory = self.mktemp()
        os.mkdir(self.directory)
        self.path = os.path.join(self.directory, "server.key")

    def write(self, data, mode):
        with open(self.path, "wb") as f:
            f.write(data)
        os.chmod(self.path, mode)

    def test_created_at_first_use(self):
        key = secretbox.load_or_create_key(self.path)
        self.assertEqual(len(key), 32)
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), key)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.directory), ["server.key"])  # no temporary file left behind

    def test_created_0600_whatever_the_umask(self):
        old = os.umask(0)
        try:
            secretbox.load_or_create_key(self.path)
        finally:
            os.umask(old)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    def test_reused(self):
        key = secretbox.load_or_create_key(self.path)
        self.assertEqual(secretbox.load_or_create_key(self.path), key)

    def test_existing_file_used(self):
        self.write(b"k" * 32, 0o600)
        self.assertEqual(secretbox.load_or_create_key(self.path), b"k" * 32)

    def test_a_lost_key_is_not_replaced_while_secrets_are_sealed_under_it(self):
        with self.assertRaises(KeyFileError) as raised:
            secretbox.load_or_create_key(self.path, sealed_for=3)
        self.assertIn(f"the TOTP key {self.path} is missing", str(raised.exception))
        self.assertIn("(3 users)", str(raised.exception))
        self.assertEqual(os.listdir(self.directory), [])

    def test_a_key_in_place_is_used_whatever_is_sealed(self):
        self.write(b"k" * 32, 0o600)
        self.assertEqual(secretbox.load_or_create_key(self.path, sealed_for=3), b"k" * 32)

    def test_read_only_file_used(self):
        self.write(b"k" * 32, 0o400)
        self.assertEqual(secretbox.load_or_create_key(self.path), b"k" * 32)

    def test_two_keys_are_different(self):
        other = os.path.join(self.directory, "other.key")
        self.assertNotEqual(secretbox.load_or_create_key(self.path), secretbox.load_or_create_key(other))

    def test_wrong_size_refused(self):
        for size in (0, 16, 31, 33, 64):
            self.write(b"k" * size, 0o600)
            error = self.assertRaises(KeyFileError, secretbox.load_or_create_key, self.path)
            self.assertIn(f"{size} bytes, not 32", str(error))
            with open(self.path, "rb") as f:
                self.assertEqual(f.read(), b"k" * size)  # left as it is

    def test_too_open_refused(self):
        for mode in (0o644, 0o640, 0o604, 0o660, 0o666, 0o610):
            self.write(b"k" * 32, mode)
            error = self.assertRaises(KeyFileError, secretbox.load_or_create_key, self.path)
            self.assertIn(f"mode {mode:04o}", str(error))
            self.assertIn("chmod 600", str(error))
            self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), mode)  # not quietly fixed

    def test_not_a_file_refused(self):
        os.mkdir(self.path, 0o700)
        error = self.assertRaises(KeyFileError, secretbox.load_or_create_key, self.path)
        self.assertIn("not a regular file", str(error))

    def test_missing_directory_refused(self):
        path = os.path.join(self.directory, "absent", "server.key")
        error = self.assertRaises(KeyFileError, secretbox.load_or_create_key, path)
        self.assertIn("cannot create the server key", str(error))

    def test_key_made_meanwhile_by_another_process_wins(self):
        """Between our look and our link another daemon put its key there: we use it, never replace it."""
        real_link = os.link

        def racing_link(source, target):
            self.write(b"o" * 32, 0o600)
            return real_link(source, target)

        self.patch(secretbox.os, "link", racing_link)
        self.assertEqual(secretbox.load_or_create_key(self.path), b"o" * 32)
        self.assertEqual(os.listdir(self.directory), ["server.key"])


class SealTests(unittest.SynchronousTestCase):
    key = bytes(range(32, 64))

    def test_round_trip(self):
        sealed = secretbox.seal(self.key, "alice", SECRET)
        self.assertEqual(len(sealed), 12 + len(SECRET) + 16)
        self.assertEqual(secretbox.unseal(self.key, "alice", sealed), SECRET)

    def test_fresh_nonce_each_time(self):
        self.assertNotEqual(secretbox.seal(self.key, "alice", SECRET), secretbox.seal(self.key, "alice", SECRET))

    def test_associated_data_by_hand(self):
        """ChaCha20-Poly1305 over nonce || ciphertext, with the label and the length-prefixed user as associated data."""
        sealed = secretbox.seal(self.key, "alice", SECRET)
        associated = b"securechatd/totp-secret/v1" + b"\x00\x00\x00\x05alice"
        self.assertEqual(ChaCha20Poly1305(self.key).decrypt(sealed[:12], sealed[12:], associated), SECRET)

    def test_another_users_row(self):
        sealed = secretbox.seal(self.key, "alice", SECRET)
        self.assertRaises(Unsealable, secretbox.unseal, self.key, "bob", sealed)
        self.assertRaises(Unsealable, secretbox.unseal, self.key, "alice2", sealed)

    def test_another_key(self):
        sealed = secretbox.seal(self.key, "alice", SECRET)
        self.assertRaises(Unsealable, secretbox.unseal, bytes(32), "alice", sealed)

    def test_every_byte_is_checked(self):
        sealed = secretbox.seal(self.key, "alice", SECRET)
        for at in range(len(sealed)):
            changed = bytearray(sealed)
            changed[at] ^= 0x80
            self.assertRaises(Unsealable, secretbox.unseal, self.key, "alice", bytes(changed))

    def test_cut_or_lengthened(self):
        sealed = secretbox.seal(self.key, "alice", SECRET)
        for damaged in (b"", sealed[:12], sealed[:27], sealed[:-1], sealed + b"\x00", sealed[12:]):
            self.assertRaises(Unsealable, secretbox.unseal, self.key, "alice", damaged)
        self.assertRaises(Unsealable, secretbox.unseal, self.key, "alice", None)
