"""
Tests for L{securechatd.certs}: development CA and server certificates.
"""

import datetime
import io
import ipaddress
import os
import stat

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.trial.unittest import TestCase

from securechatd import admin, certs
from securechatd.certs import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    CertError,
    ensure_dev_certs,
    write_certs,
)

ALL_FILES = (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)
NOW = datetime.datetime(2030, 6, 1, 12, 0, 0, tzinfo=datetime.timezone.utc)


def load_cert(directory, name):
    with open(os.path.join(directory, name), "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def load_key(directory, name):
    with open(os.path.join(directory, name), "rb") as f:
        data = f.read()
    return data, serialization.load_pem_private_key(data, password=None)


def public_der(public_key):
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def snapshot(directory):
    """
    Map each file name in directory to its content.
    """
    result = {}
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            result[name] = f.read()
    return result


class WriteCertsTests(TestCase):
    def setUp(self):
        self.directory = self.mktemp()

    def set_umask(self, mask):
        self.addCleanup(os.umask, os.umask(mask))

    def test_writes_four_files(self):
        """
        write_certs creates the directory and returns the paths of the four
        files it wrote, CA first.
        """
        paths = write_certs(self.directory, ["chat.example"], now=NOW)
        self.assertEqual(
            paths, [os.path.join(self.directory, name) for name in ALL_FILES]
        )
        self.assertEqual(sorted(os.listdir(self.directory)), sorted(ALL_FILES))

    def test_modes(self):
        """
        Even with a umask of 0, keys are 0600, certificates 0644, and a
        directory the call created 0700.
        """
        self.set_umask(0)
        write_certs(self.directory, ["chat.example"], now=NOW)
        modes = {
            name: stat.S_IMODE(os.stat(os.path.join(self.directory, name)).st_mode)
            for name in ALL_FILES
        }
        self.assertEqual(
            modes,
            {CA_CERT: 0o644, CA_KEY: 0o600, SERVER_CERT: 0o644, SERVER_KEY: 0o600},
        )
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o700)

    def test_existing_directory_mode_kept(self):
        """
        An existing directory is used as it is.
        """
        self.set_umask(0)
        os.mkdir(self.directory, 0o755)
        write_certs(self.directory, ["chat.example"], now=NOW)
        self.assertEqual(stat.S_IMODE(os.stat(self.directory).st_mode), 0o755)

    def test_keys_are_pkcs8_and_match(self):
        """
        Both keys are unencrypted PKCS8 PEM P-256 keys belonging to their
        certificates.
        """
        write_certs(self.directory, ["chat.example"], now=NOW)
        for key_name, cert_name in ((CA_KEY, CA_CERT), (SERVER_KEY, SERVER_CERT)):
            data, key = load_key(self.directory, key_name)
            self.assertTrue(data.startswith(b"-----BEGIN PRIVATE KEY-----\n"))
            self.assertEqual(key.curve.name, "secp256r1")
            self.assertEqual(
                public_der(key.public_key()),
                public_der(load_cert(self.directory, cert_name).public_key()),
            )

    def test_ca_certificate(self):
        """
        The CA is a self-signed CA valid for ten years, allowed only to sign
        certificates and CRLs.
        """
        write_certs(self.directory, ["chat.example"], now=NOW)
        ca = load_cert(self.directory, CA_CERT)
        name = ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(name, "securechatd development CA")
        self.assertEqual(ca.issuer, ca.subject)
        self.assertEqual(ca.not_valid_before_utc, NOW)
        self.assertEqual(ca.not_valid_after_utc, NOW + datetime.timedelta(days=3650))
        constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
        self.assertEqual(
            (usage.key_cert_sign, usage.crl_sign, usage.digital_signature),
            (True, True, False),
        )

    def test_server_certificate(self):
        """
        The server certificate names the first hostname as CN, carries every
        hostname and IP address as a subjectAltName, is for server
        authentication only, and is valid for C{days} from C{now}.
        """
        write_certs(
            self.directory,
            ["chat.example", "localhost"],
            ["192.0.2.7", "2001:db8::1"],
            now=NOW,
            days=30,
        )
        cert = load_cert(self.directory, SERVER_CERT)
        name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
        self.assertEqual(name, "chat.example")
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        self.assertEqual(
            san.value.get_values_for_type(x509.DNSName), ["chat.example", "localhost"]
        )
        self.assertEqual(
            san.value.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("192.0.2.7"), ipaddress.ip_address("2001:db8::1")],
        )
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertFalse(constraints.value.ca)
        self.assertEqual(
            list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value),
            [ExtendedKeyUsageOID.SERVER_AUTH],
        )
        self.assertEqual(cert.not_valid_before_utc, NOW)
        self.assertEqual(cert.not_valid_after_utc, NOW + datetime.timedelta(days=30))

    def test_server_chains_to_ca(self):
        """
        A strict RFC 5280 verifier trusting only ca.pem accepts the server
        certificate for each of its names, and rejects another name.
        """
        write_certs(self.directory, ["chat.example"], ["192.0.2.7"], now=NOW)
        ca = load_cert(self.directory, CA_CERT)
        cert = load_cert(self.directory, SERVER_CERT)
        builder = PolicyBuilder().store(Store([ca])).time(NOW)
        for subject in (
            x509.DNSName("chat.example"),
            x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
        ):
            chain = builder.build_server_verifier(subject).verify(cert, [])
            self.assertEqual(chain, [cert, ca])
        verifier = builder.build_server_verifier(x509.DNSName("other.example"))
        self.assertRaises(VerificationError, verifier.verify, cert, [])

    def test_each_call_makes_a_new_ca(self):
        """
        Two calls make two unrelated CAs (fresh keys, fresh serials).
        """
        other = self.mktemp()
        write_certs(self.directory, ["chat.example"], now=NOW)
        write_certs(other, ["chat.example"], now=NOW)
        first = load_cert(self.directory, CA_CERT)
        second = load_cert(other, CA_CERT)
        self.assertNotEqual(first.serial_number, second.serial_number)
        self.assertNotEqual(
            public_der(first.public_key()), public_der(second.public_key())
        )

    def test_never_overwrites(self):
        """
        If any one of the four files exists, write_certs raises CertError
        naming it before trying to write anything, and leaves it untouched.
        """
        attempts = []
        self.patch(certs, "_write_new", lambda *args: attempts.append(args))
        for name in ALL_FILES:
            directory = self.mktemp()
            os.mkdir(directory)
            path = os.path.join(directory, name)
            with open(path, "wb") as f:
                f.write(b"operator's file")
            error = self.assertRaises(
                CertError, write_certs, directory, ["chat.example"], now=NOW
            )
            self.assertEqual(
                str(error), f"{path} already exists; refusing to overwrite it"
            )
            self.assertEqual(snapshot(directory), {name: b"operator's file"})
        self.assertEqual(attempts, [])

    def test_race_lost(self):
        """
        A file that appears after the check is still not overwritten: each
        file is created exclusively.
        """
        os.mkdir(self.directory)
        path = os.path.join(self.directory, SERVER_KEY)
        with open(path, "wb") as f:
            f.write(b"operator's file")
        error = self.assertRaises(CertError, certs._write_new, path, b"new", 0o600)
        self.assertEqual(
            str(error), f"{path} already exists; refusing to overwrite it"
        )
        self.assertEqual(snapshot(self.directory), {SERVER_KEY: b"operator's file"})

    def test_dangling_symlink_not_followed(self):
        """
        A dangling symlink in place of a key counts as an existing file: the
        key is not written through it.
        """
        os.mkdir(self.directory)
        target = os.path.abspath(self.mktemp())
        os.symlink(target, os.path.join(self.directory, SERVER_KEY))
        self.assertRaises(CertError, write_certs, self.directory, ["chat.example"], now=NOW)
        self.assertFalse(os.path.lexists(target))

    def test_failed_write_leaves_nothing(self):
        """
        If a later file cannot be written, the files this call already wrote
        are removed again and the error is reported.
        """
        write_new = certs._write_new

        def failing_write_new(path, data, mode):
            if path.endswith(SERVER_CERT):
                raise CertError(f"cannot create {path}: No space left on device")
            write_new(path, data, mode)

        self.patch(certs, "_write_new", failing_write_new)
        error = self.assertRaises(
            CertError, write_certs, self.directory, ["chat.example"], now=NOW
        )
        self.assertIn(SERVER_CERT, str(error))
        self.assertEqual(os.listdir(self.directory), [])

    def test_needs_a_hostname(self):
        """
        A server certificate without any hostname is refused before anything
        is written.
        """
        self.assertRaises(CertError, write_certs, self.directory, [], now=NOW)
        self.assertFalse(os.path.exists(self.directory))


class ClientReadableNamesTests(TestCase):
    """
    Every server certificate written carries subjectAltNames the client's
    host name check (service_identity) can read: one it cannot read makes
    the client refuse the whole certificate.
    """

    def setUp(self):
        self.directory = self.mktemp()
        self.stderr = io.StringIO()
        self.patch(admin.sys, "stderr", self.stderr)

    def admin_certs(self, *names):
        """Run `securechatd-admin certs`: (exit status, standard output)."""
        out = io.StringIO()
        status = admin.run(["certs", "--dir", self.directory, *names], out)
        return status, out.getvalue()

    def test_names_pass_the_client_check(self):
        """
        Each hostname (a wildcard too) and each address given verifies with
        the functions the client uses.
        """
        write_certs(
            self.directory,
            ["localhost", "chat.example", "*.chat.example"],
            ["127.0.0.1", "::1"],
            now=NOW,
        )
        cert = load_cert(self.directory, SERVER_CERT)
        for name in ("localhost", "chat.example", "eu.chat.example"):
            verify_certificate_hostname(cert, name)
        for address in ("127.0.0.1", "::1"):
            verify_certificate_ip_address(cert, address)

    def test_address_as_hostname(self):
        """
        An address given as a hostname would be a DNS subjectAltName the
        client cannot read: refused, naming it, before anything is written.
        """
        error = self.assertRaises(
            CertError, write_certs, self.directory, ["localhost", "127.0.0.1"], now=NOW
        )
        self.assertIn("127.0.0.1", str(error))
        self.assertFalse(os.path.exists(self.directory))

    def test_wildcard_too_wide(self):
        """
        "*.localhost" (a wildcard over a single label) is refused.
        """
        error = self.assertRaises(
            CertError, write_certs, self.directory, ["*.localhost"], now=NOW
        )
        self.assertIn("*.localhost", str(error))
        self.assertFalse(os.path.exists(self.directory))

    def test_admin_certs_carry_readable_names(self):
        """
        `securechatd-admin certs` writes a server certificate whose
        subjectAltNames pass the client's check for every name given.
        """
        status, _ = self.admin_certs("--hostname", "localhost", "--ip", "127.0.0.1")
        self.assertEqual((status, self.stderr.getvalue()), (0, ""))
        cert = load_cert(self.directory, SERVER_CERT)
        verify_certificate_hostname(cert, "localhost")
        verify_certificate_ip_address(cert, "127.0.0.1")

    def test_admin_address_as_hostname(self):
        """
        `certs --hostname 127.0.0.1` fails in one line pointing at --ip, and
        writes nothing.
        """
        status, out = self.admin_certs("--hostname", "127.0.0.1")
        self.assertEqual((status, out), (1, ""))
        self.assertEqual(
            self.stderr.getvalue(),
            "securechatd-admin: --hostname: '127.0.0.1' is an IP address; "
            "give it with --ip\n",
        )
        self.assertFalse(os.path.exists(self.directory))

    def test_admin_wildcard_too_wide(self):
        """
        `certs --hostname *.localhost` fails in one line and writes nothing.
        """
        status, out = self.admin_certs("--hostname", "*.localhost")
        self.assertEqual((status, out), (1, ""))
        self.assertIn("*.localhost", self.stderr.getvalue())
        self.assertEqual(self.stderr.getvalue().count("\n"), 1)
        self.assertFalse(os.path.exists(self.directory))


class EnsureDevCertsTests(TestCase):
    def setUp(self):
        self.directory = self.mktemp()

    def path(self, name):
        return os.path.join(self.directory, name)

    def write(self, name, data=b"operator's file"):
        os.makedirs(self.directory, exist_ok=True)
        with open(self.path(name), "wb") as f:
            f.write(data)

    def test_first_run_creates(self):
        """
        With no certificate files, ensure_dev_certs writes all four, for
        localhost, 127.0.0.1 and ::1.
        """
        self.assertIs(ensure_dev_certs(self.directory, NOW), True)
        self.assertEqual(sorted(os.listdir(self.directory)), sorted(ALL_FILES))
        san = (
            load_cert(self.directory, SERVER_CERT)
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value
        )
        self.assertEqual(san.get_values_for_type(x509.DNSName), ["localhost"])
        self.assertEqual(
            san.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )

    def test_second_run_keeps_files(self):
        """
        Once the certificates exist, ensure_dev_certs returns False and
        changes nothing.
        """
        ensure_dev_certs(self.directory, NOW)
        before = snapshot(self.directory)
        self.assertIs(ensure_dev_certs(self.directory, NOW), False)
        self.assertEqual(snapshot(self.directory), before)

    def test_operator_certificate_without_ca(self):
        """
        An operator's server.pem and server.key without any CA files are
        accepted as they are.
        """
        self.write(SERVER_CERT, b"real cert")
        self.write(SERVER_KEY, b"real key")
        self.assertIs(ensure_dev_certs(self.directory, NOW), False)
        self.assertEqual(
            snapshot(self.directory),
            {SERVER_CERT: b"real cert", SERVER_KEY: b"real key"},
        )

    def assertPartial(self, present, missing):
        """
        With only the files named in present, ensure_dev_certs raises
        CertError naming the missing file first and changes nothing.
        """
        for name in present:
            self.write(name)
        before = snapshot(self.directory)
        error = self.assertRaises(CertError, ensure_dev_certs, self.directory, NOW)
        self.assertTrue(str(error).startswith(self.path(missing) + " "), str(error))
        self.assertIn(" missing ", str(error))
        self.assertEqual(snapshot(self.directory), before)
        return str(error)

    def test_cert_without_key(self):
        """server.pem alone: server.key is missing."""
        self.assertPartial([SERVER_CERT], SERVER_KEY)

    def test_key_without_cert(self):
        """server.key alone: server.pem is missing."""
        self.assertPartial([SERVER_KEY], SERVER_CERT)

    def test_ca_cert_without_server_files(self):
        """ca.pem alone: the message names both server files and ca.pem."""
        message = self.assertPartial([CA_CERT], SERVER_CERT)
        self.assertIn(self.path(SERVER_KEY), message)
        self.assertIn(self.path(CA_CERT), message)

    def test_ca_key_without_server_files(self):
        """ca.key alone: no new CA is made next to it."""
        message = self.assertPartial([CA_KEY], SERVER_CERT)
        self.assertIn(self.path(CA_KEY), message)

    def test_ca_with_server_cert_only(self):
        """Everything but server.key: server.key is missing."""
        self.assertPartial([CA_CERT, CA_KEY, SERVER_CERT], SERVER_KEY)
