"""securechatd.files: private files replaced whole, never written through a link, no temporary file left."""

import os
import stat

from twisted.trial import unittest

from securechatd.files import write_private


class WritePrivateTests(unittest.TestCase):
    def setUp(self):
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.path = os.path.join(self.directory, "export.json")

    def test_replaced_whole_0600_and_nothing_left_beside_it(self):
        write_private(self.path, b"first")
        os.chmod(self.path, 0o644)
        write_private(self.path, b"second")
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"second")
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        self.assertEqual(os.listdir(self.directory), ["export.json"])

    def test_a_link_at_the_path_is_replaced_not_written_through(self):
        """In a shared directory someone may have left a link where the file goes: its target is untouched."""
        target = os.path.join(self.directory, "someone-elses")
        with open(target, "wb") as f:
            f.write(b"theirs")
        os.symlink(target, self.path)
        write_private(self.path, b"mine")
        with open(target, "rb") as f:
            self.assertEqual(f.read(), b"theirs")
        self.assertFalse(os.path.islink(self.path))
        with open(self.path, "rb") as f:
            self.assertEqual(f.read(), b"mine")
