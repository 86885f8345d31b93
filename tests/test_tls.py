"""
Tests for L{securechatd.tls}: real TLS handshakes.

Most tests make certificates in a temporary directory, then connect a
server and a client through L{TLSMemoryBIOFactory} over L{iosim} (no sockets,
no reactor) and look at what each application protocol received and why
each connection ended.  L{ClientLibraryTests} runs the client library
against the real daemon on 127.0.0.1.
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from OpenSSL import SSL
from service_identity.exceptions import (
    CertificateError,
    DNSMismatch,
    IPAddressMismatch,
    VerificationError,
)
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IOpenSSLServerConnectionCreator,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test.iosim import connectedServerAndClient
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from securechatd.certs import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    CertError,
    write_certs,
)
from securechatd.client.library import ChatClient, TLSHandshakeFailed
from securechatd.commands import BadCredentials
from securechatd.tls import CIPHERS, client_options, server_options
from tests.helpers import start_daemon, wall_now

SERVER_GREETING = b"hello from the server"
CLIENT_GREETING = b"hello from the client"


class Peer(Protocol):
    """
    An application protocol that sends a greeting as soon as it is
    connected and records what it receives and why it was disconnected.
    """

    def __init__(self, greeting):
        self.greeting = greeting
        self.received = b""
        self.lost_reason = None

    def connectionMade(self):
        self.transport.write(self.greeting)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost_reason = reason


class Connection:
    """
    One in-memory TLS connection, pumped until nothing more moves.

    @ivar server: the server's application L{Peer}.
    @ivar client: the client's application L{Peer}.
    @ivar server_tls: the server's L{TLSMemoryBIOProtocol}.
    @ivar client_tls: the client's L{TLSMemoryBIOProtocol}.
    """

    def __init__(self, server_creator, client_creator):
        clock = Clock()
        self.server = Peer(SERVER_GREETING)
        self.client = Peer(CLIENT_GREETING)
        server_factory = TLSMemoryBIOFactory(
            server_creator,
            isClient=False,
            wrappedFactory=Factory.forProtocol(lambda: self.server),
            clock=clock,
        )
        client_factory = TLSMemoryBIOFactory(
            client_creator,
            isClient=True,
            wrappedFactory=Factory.forProtocol(lambda: self.client),
            clock=clock,
        )
        self.client_tls, self.server_tls, pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            clock=clock,
        )
        pump.flush()


@implementer(IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator)
class RawContext:
    """
    A connection creator around a hand-made pyOpenSSL context, for peers
    weaker than anything Twisted's own options would build.
    """

    def __init__(self, context):
        self._context = context

    def clientConnectionForTLS(self, tls_protocol):
        return SSL.Connection(self._context, None)

    serverConnectionForTLS = clientConnectionForTLS


def weak_context(minimum, maximum, ciphers):
    """
    A pyOpenSSL context limited to the given TLS versions and TLS 1.2
    cipher string, at OpenSSL security level 0.  OpenSSL 3 and later will
    not even offer TLS 1.0/1.1 at its default level, so without this a test
    would only show that our own test peer gave up, not that securechatd's
    end refused.
    """
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(minimum)
    context.set_max_proto_version(maximum)
    context.set_cipher_list(ciphers + b":@SECLEVEL=0")
    return context


def tls12_client(ca_path, ciphers):
    """
    A client verifying like securechatd's, but limited to TLS 1.2 (whose
    cipher suites are negotiable) and offering only the given suites.
    """
    with open(ca_path, "rb") as f:
        ca = Certificate.loadPEM(f.read())
    return optionsForClientTLS(
        "localhost",
        trustRoot=ca,
        extraCertificateOptions={
            "lowerMaximumSecurityTo": TLSVersion.TLSv1_2,
            "acceptableCiphers": AcceptableCiphers.fromOpenSSLCipherString(ciphers),
        },
    )


def twisted_default_server(certs_dir):
    """
    Server options with Twisted's defaults, for control experiments.
    """
    with open(os.path.join(certs_dir, SERVER_KEY), "rb") as f:
        key = f.read()
    with open(os.path.join(certs_dir, SERVER_CERT), "rb") as f:
        cert = f.read()
    return PrivateCertificate.loadPEM(key + cert).options()


def write_server_cert(
    certs_dir, now, names=("localhost",), *, valid=(-1, 1), key=None, self_signed=False
):
    """
    Replace server.pem and server.key in certs_dir with a certificate whose
    common name is "localhost", whose DNS subjectAltNames are names (no
    subjectAltName extension at all if names is empty), valid for the days
    valid[0] to valid[1] counted from now, signed by certs_dir's CA or, if
    self_signed, by its own key.  key defaults to a new P-256 key.
    """
    with open(os.path.join(certs_dir, CA_KEY), "rb") as f:
        ca_key = serialization.load_pem_private_key(f.read(), password=None)
    with open(os.path.join(certs_dir, CA_CERT), "rb") as f:
        ca = x509.load_pem_x509_certificate(f.read())
    key = key or ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject if self_signed else ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=valid[0]))
        .not_valid_after(now + datetime.timedelta(days=valid[1]))
    )
    if names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in names]),
            critical=False,
        )
    cert = builder.sign(key if self_signed else ca_key, hashes.SHA256())
    with open(os.path.join(certs_dir, SERVER_CERT), "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(certs_dir, SERVER_KEY), "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )


def serve_ca_certificate(certs_dir):
    """
    Make the server present the CA's own certificate (self-signed, trusted
    by the client, but naming no host) with the CA's key.
    """
    for source, target in ((CA_CERT, SERVER_CERT), (CA_KEY, SERVER_KEY)):
        with open(os.path.join(certs_dir, source), "rb") as f:
            data = f.read()
        with open(os.path.join(certs_dir, target), "wb") as f:
            f.write(data)


def replace_with_rsa_server_cert(certs_dir, now):
    """
    Replace the server certificate and key in certs_dir with an RSA pair
    signed by the same CA.  Key exchange without forward secrecy (plain RSA)
    needs an RSA certificate: with the usual ECDSA one no server could
    negotiate it, and a refusal would prove nothing about the cipher list.
    """
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    write_server_cert(certs_dir, now, key=key)


def openssl_reasons(failure):
    """
    The OpenSSL reason strings of a failure that must be an L{SSL.Error}.
    """
    failure.trap(SSL.Error)
    return [reason for _library, _function, reason in failure.value.args[0]]


class TLSTestCase(TestCase):
    def setUp(self):
        # Certificates are made relative to the real date (OpenSSL checks
        # them against the wall clock), so the suite passes on any day;
        # valid from a few minutes back, so a wall clock stepped back (as a
        # VM's can be) never finds one not yet valid ("certificate verify
        # failed" where a test expects another refusal).
        self.now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
        self.certs_dir = self.mktemp()
        write_certs(self.certs_dir, ["localhost"], ["127.0.0.1", "::1"], now=self.now)
        self.ca_path = os.path.join(self.certs_dir, CA_CERT)

    def assertTalked(self, connection):
        """
        Both application protocols received the other's greeting and
        neither connection was lost.
        """
        self.assertEqual(connection.server.received, CLIENT_GREETING)
        self.assertEqual(connection.client.received, SERVER_GREETING)
        self.assertIsNone(connection.server.lost_reason)
        self.assertIsNone(connection.client.lost_reason)

    def assertServerSaw(self, connection, reason):
        """
        The server's connection ended with this OpenSSL error reason.
        """
        self.assertIn(reason, openssl_reasons(connection.server.lost_reason))

    def assertClientMismatch(self, connection, mismatch):
        """
        The client's connection ended because the certificate did not name
        the host, as one mismatch of the given type.
        """
        connection.client.lost_reason.trap(VerificationError)
        errors = connection.client.lost_reason.value.errors
        self.assertEqual([type(e) for e in errors], [mismatch])

    def assertChainRefused(self):
        """The client, trusting only the CA, refuses the server's chain for "localhost"."""
        connection = Connection(server_options(self.certs_dir), client_options(self.ca_path, "localhost"))
        self.assertRefused(connection)
        self.assertIn("certificate verify failed", openssl_reasons(connection.client.lost_reason))

    def assertRefused(self, connection):
        """
        Neither application protocol received anything and both connections
        were lost.
        """
        self.assertEqual(connection.server.received, b"")
        self.assertEqual(connection.client.received, b"")
        self.assertIsNotNone(connection.server.lost_reason)
        self.assertIsNotNone(connection.client.lost_reason)


class HandshakeTests(TLSTestCase):
    def test_localhost(self):
        """
        A client trusting the CA and dialling "localhost" completes a TLS 1.3
        handshake, sends the name as SNI, and bytes flow both ways.
        """
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "localhost")
        )
        self.assertTalked(connection)
        self.assertEqual(
            connection.client_tls.getHandle().get_protocol_version_name(), "TLSv1.3"
        )
        server_name = connection.server_tls.getHandle().get_servername()
        self.assertEqual(server_name, b"localhost")

    def test_ipv4_address(self):
        """
        "127.0.0.1" is checked against the certificate's IP subjectAltNames;
        no SNI is sent for an address.
        """
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "127.0.0.1")
        )
        self.assertTalked(connection)
        self.assertIsNone(connection.server_tls.getHandle().get_servername())

    def test_ipv6_address(self):
        """
        "::1" is checked against the certificate's IP subjectAltNames too.
        """
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "::1")
        )
        self.assertTalked(connection)

    def test_wrong_ca(self):
        """
        A client trusting another CA (with the very same name) aborts the
        handshake: the server gets an "unknown ca" alert and no data.
        """
        other_dir = self.mktemp()
        write_certs(other_dir, ["localhost"], now=wall_now())
        connection = Connection(
            server_options(self.certs_dir),
            client_options(os.path.join(other_dir, CA_CERT), "localhost"),
        )
        self.assertRefused(connection)
        self.assertServerSaw(connection, "tlsv1 alert unknown ca")
        self.assertIn(
            "certificate verify failed", openssl_reasons(connection.client.lost_reason)
        )

    def test_wrong_hostname(self):
        """
        A certificate that does not name the host dialled is refused by the
        client before the server gets any data.
        """
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "chat.example")
        )
        self.assertRefused(connection)
        self.assertClientMismatch(connection, DNSMismatch)

    def test_wrong_address(self):
        """
        An address that is not among the IP subjectAltNames is refused, even
        though the certificate's DNS name is "localhost".
        """
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "127.0.0.2")
        )
        self.assertRefused(connection)
        self.assertClientMismatch(connection, IPAddressMismatch)

    def test_expired_certificate(self):
        """
        A server certificate that expired (signed by a CA that is still
        valid) is refused with a "certificate expired" alert.
        """
        expired_dir = self.mktemp()
        long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(
            days=100
        )
        write_certs(expired_dir, ["localhost"], now=long_ago, days=30)
        connection = Connection(
            server_options(expired_dir),
            client_options(os.path.join(expired_dir, CA_CERT), "localhost"),
        )
        self.assertRefused(connection)
        self.assertServerSaw(connection, "tls alert certificate expired")

    def test_tls11_client_refused(self):
        """
        A client that can only speak TLS 1.1 is refused by the server with
        "unsupported protocol", while that same client does complete a
        handshake with a server that allows TLS 1.1.
        """
        tls11 = weak_context(SSL.TLS1_1_VERSION, SSL.TLS1_1_VERSION, b"DEFAULT")
        permissive = weak_context(SSL.TLS1_1_VERSION, SSL.TLS1_3_VERSION, b"DEFAULT")
        permissive.use_certificate_file(os.path.join(self.certs_dir, SERVER_CERT))
        permissive.use_privatekey_file(os.path.join(self.certs_dir, SERVER_KEY))
        control = Connection(RawContext(permissive), RawContext(tls11))
        self.assertTalked(control)
        self.assertEqual(
            control.client_tls.getHandle().get_protocol_version_name(), "TLSv1.1"
        )

        connection = Connection(server_options(self.certs_dir), RawContext(tls11))
        self.assertRefused(connection)
        self.assertServerSaw(connection, "unsupported protocol")

    def test_tls11_refused_by_version_floor(self):
        """
        The server's TLS 1.2 floor holds on its own: with its security level
        lowered and every cipher allowed on its context, it still refuses a
        TLS 1.1 client.
        """
        options = server_options(self.certs_dir)
        options.getContext().set_cipher_list(b"ALL:@SECLEVEL=0")
        tls11 = weak_context(SSL.TLS1_1_VERSION, SSL.TLS1_1_VERSION, b"DEFAULT")
        connection = Connection(options, RawContext(tls11))
        self.assertRefused(connection)
        self.assertServerSaw(connection, "unsupported protocol")

    def test_cbc_cipher_refused(self):
        """
        A TLS 1.2 client offering only a forward-secret CBC suite is refused
        with "no shared cipher", though Twisted's default server accepts it.
        """
        client = tls12_client(self.ca_path, "ECDHE-ECDSA-AES128-SHA")
        self.assertTalked(Connection(twisted_default_server(self.certs_dir), client))

        connection = Connection(server_options(self.certs_dir), client)
        self.assertRefused(connection)
        self.assertServerSaw(connection, "no shared cipher")

    def test_non_forward_secret_cipher_refused(self):
        """
        A TLS 1.2 client offering only RSA key exchange (no forward secrecy)
        is refused with "no shared cipher", though Twisted's default server
        with the same RSA certificate accepts it.
        """
        replace_with_rsa_server_cert(self.certs_dir, self.now)
        client = tls12_client(self.ca_path, "AES128-GCM-SHA256")
        self.assertTalked(Connection(twisted_default_server(self.certs_dir), client))

        connection = Connection(server_options(self.certs_dir), client)
        self.assertRefused(connection)
        self.assertServerSaw(connection, "no shared cipher")

    def test_ecdhe_aes_gcm_accepted(self):
        """
        A TLS 1.2 client offering only ECDHE-ECDSA-AES128-GCM-SHA256 gets it.
        """
        client = tls12_client(self.ca_path, "ECDHE-ECDSA-AES128-GCM-SHA256")
        connection = Connection(server_options(self.certs_dir), client)
        self.assertTalked(connection)
        handle = connection.server_tls.getHandle()
        self.assertEqual(handle.get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(handle.get_cipher_name(), "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_ecdhe_rsa_accepted(self):
        """
        With an RSA certificate, a TLS 1.2 client gets an ECDHE-RSA suite.
        """
        replace_with_rsa_server_cert(self.certs_dir, self.now)
        client = tls12_client(self.ca_path, CIPHERS)
        connection = Connection(server_options(self.certs_dir), client)
        self.assertTalked(connection)
        cipher = connection.server_tls.getHandle().get_cipher_name()
        self.assertTrue(cipher.startswith("ECDHE-RSA-"), cipher)

    def test_client_offers_no_weak_ciphers(self):
        """
        The client does not offer RSA key exchange either: a TLS 1.2 server
        that only has that fails with "no shared cipher", though a client
        with Twisted's default ciphers connects to it.
        """
        replace_with_rsa_server_cert(self.certs_dir, self.now)
        weak_server = weak_context(
            SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION, b"AES128-GCM-SHA256"
        )
        weak_server.use_certificate_file(os.path.join(self.certs_dir, SERVER_CERT))
        weak_server.use_privatekey_file(os.path.join(self.certs_dir, SERVER_KEY))
        with open(self.ca_path, "rb") as f:
            ca = Certificate.loadPEM(f.read())
        self.assertTalked(
            Connection(
                RawContext(weak_server), optionsForClientTLS("localhost", trustRoot=ca)
            )
        )

        connection = Connection(
            RawContext(weak_server), client_options(self.ca_path, "localhost")
        )
        self.assertRefused(connection)
        self.assertServerSaw(connection, "no shared cipher")

    def test_chain_sent(self):
        """
        Certificates after the first in server.pem are sent as the chain.
        """
        cert_path = os.path.join(self.certs_dir, SERVER_CERT)
        with open(self.ca_path, "rb") as f:
            ca_pem = f.read()
        with open(cert_path, "ab") as f:
            f.write(ca_pem)
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "localhost")
        )
        self.assertTalked(connection)
        chain = connection.client_tls.getHandle().get_peer_cert_chain()
        self.assertEqual(
            [cert.get_subject().CN for cert in chain],
            ["localhost", "securechatd development CA"],
        )


class ServerIdentityTests(TLSTestCase):
    """
    The client refuses every server certificate that does not prove the
    host name it dialled, before any application data is sent: also those
    for which service_identity raises CertificateError rather than
    VerificationError, which Twisted's own check only logs.
    """

    def assertIdentityRefused(self, connection, error):
        """
        The handshake was aborted by the client's host name check, with a
        service_identity error of this type, and no data went either way.
        """
        self.assertRefused(connection)
        connection.client.lost_reason.trap(error)

    def test_common_name_only(self):
        """
        A certificate from the trusted CA with CN=localhost but no
        subjectAltName is refused: the common name is not a host name check.
        """
        write_server_cert(self.certs_dir, self.now, names=())
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "localhost")
        )
        self.assertIdentityRefused(connection, CertificateError)
        self.assertIn(
            "subjectAltName", connection.client.lost_reason.getErrorMessage()
        )

    def test_common_name_only_for_an_address(self):
        """
        Dialling an address, a certificate without subjectAltName is refused
        as well.
        """
        write_server_cert(self.certs_dir, self.now, names=())
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "127.0.0.1")
        )
        self.assertIdentityRefused(connection, CertificateError)

    def test_invalid_subject_alt_name(self):
        """
        A certificate whose DNS subjectAltName is an address (which
        service_identity refuses to read as a DNS name) is refused, although
        it also names "localhost".
        """
        write_server_cert(self.certs_dir, self.now, names=("localhost", "127.0.0.1"))
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "localhost")
        )
        self.assertIdentityRefused(connection, CertificateError)

    def test_ca_certificate_as_server_certificate(self):
        """
        The trusted CA's own self-signed certificate, presented with the
        CA's key, is refused (it is not for server authentication and names
        no host).
        """
        serve_ca_certificate(self.certs_dir)
        self.assertChainRefused()

    def test_trusted_self_signed_without_subject_alt_name(self):
        """
        A self-signed certificate the client trusts directly (its own CA
        file) is accepted if it names the host in a subjectAltName, and
        refused if it has only the common name.
        """
        server_pem = os.path.join(self.certs_dir, SERVER_CERT)
        write_server_cert(self.certs_dir, self.now, self_signed=True)
        self.assertTalked(
            Connection(
                server_options(self.certs_dir), client_options(server_pem, "localhost")
            )
        )

        write_server_cert(self.certs_dir, self.now, names=(), self_signed=True)
        connection = Connection(
            server_options(self.certs_dir), client_options(server_pem, "localhost")
        )
        self.assertIdentityRefused(connection, CertificateError)

    def test_wrong_subject_alt_name(self):
        """
        A certificate from the trusted CA whose subjectAltName is another
        host is refused, although its common name is "localhost".
        """
        write_server_cert(self.certs_dir, self.now, names=("chat.example",))
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "localhost")
        )
        self.assertIdentityRefused(connection, VerificationError)
        self.assertClientMismatch(connection, DNSMismatch)

    def test_expired_from_trusted_ca(self):
        """
        A certificate from the trusted (and valid) CA that expired ten days
        ago is refused with a "certificate expired" alert.
        """
        write_server_cert(self.certs_dir, self.now, valid=(-40, -10))
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "localhost")
        )
        self.assertRefused(connection)
        self.assertServerSaw(connection, "tls alert certificate expired")

    def test_expired_without_subject_alt_name(self):
        """
        An expired certificate without subjectAltName is refused too.
        """
        write_server_cert(self.certs_dir, self.now, names=(), valid=(-40, -10))
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "localhost")
        )
        self.assertRefused(connection)

    def test_self_signed(self):
        """
        A self-signed certificate naming "localhost" but not from the
        trusted CA is refused by the chain check.
        """
        write_server_cert(self.certs_dir, self.now, self_signed=True)
        self.assertChainRefused()

    def test_self_signed_without_subject_alt_name(self):
        """
        A self-signed certificate without subjectAltName, not from the
        trusted CA, is refused.
        """
        write_server_cert(self.certs_dir, self.now, names=(), self_signed=True)
        connection = Connection(
            server_options(self.certs_dir), client_options(self.ca_path, "localhost")
        )
        self.assertRefused(connection)


class ServerOptionsErrorTests(TLSTestCase):
    def setUp(self):
        super().setUp()
        self.cert_path = os.path.join(self.certs_dir, SERVER_CERT)
        self.key_path = os.path.join(self.certs_dir, SERVER_KEY)

    def test_missing_key(self):
        """A missing server.key is named, with the system's reason."""
        os.remove(self.key_path)
        error = self.assertRaises(CertError, server_options, self.certs_dir)
        self.assertEqual(
            str(error), f"cannot read {self.key_path}: No such file or directory"
        )

    def test_missing_certificate(self):
        """A missing server.pem is named, with the system's reason."""
        os.remove(self.cert_path)
        error = self.assertRaises(CertError, server_options, self.certs_dir)
        self.assertEqual(
            str(error), f"cannot read {self.cert_path}: No such file or directory"
        )

    def test_key_does_not_match(self):
        """
        The key of another certificate is refused, naming both files and
        showing no key material.
        """
        other_dir = self.mktemp()
        write_certs(other_dir, ["localhost"], now=wall_now())
        os.remove(self.key_path)
        os.rename(os.path.join(other_dir, SERVER_KEY), self.key_path)
        error = self.assertRaises(CertError, server_options, self.certs_dir)
        self.assertEqual(
            str(error),
            f"{self.key_path} is not the private key of the certificate in "
            f"{self.cert_path}",
        )

    def test_certificate_not_pem(self):
        """A server.pem without a PEM certificate is named."""
        with open(self.cert_path, "wb") as f:
            f.write(b"not a certificate\n")
        error = self.assertRaises(CertError, server_options, self.certs_dir)
        self.assertEqual(
            str(error), f"{self.cert_path} does not contain a PEM certificate"
        )

    def test_key_not_pem(self):
        """A server.key without a PEM private key is named."""
        with open(self.key_path, "wb") as f:
            f.write(b"not a key\n")
        error = self.assertRaises(CertError, server_options, self.certs_dir)
        self.assertEqual(
            str(error), f"{self.key_path} does not contain a PEM private key"
        )

    def test_encrypted_key(self):
        """A passphrase-protected server.key is named as such."""
        with open(self.key_path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
        with open(self.key_path, "wb") as f:
            f.write(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"secret"),
                )
            )
        error = self.assertRaises(CertError, server_options, self.certs_dir)
        self.assertEqual(
            str(error),
            f"{self.key_path} is an encrypted private key; securechatd needs it "
            f"unencrypted",
        )


class ClientOptionsErrorTests(TLSTestCase):
    def test_missing_ca(self):
        """A missing CA file is named, with the system's reason."""
        os.remove(self.ca_path)
        error = self.assertRaises(CertError, client_options, self.ca_path, "localhost")
        self.assertEqual(
            str(error), f"cannot read {self.ca_path}: No such file or directory"
        )

    def test_ca_not_pem(self):
        """A CA file without a PEM certificate is named."""
        with open(self.ca_path, "wb") as f:
            f.write(b"not a certificate\n")
        error = self.assertRaises(CertError, client_options, self.ca_path, "localhost")
        self.assertEqual(
            str(error), f"{self.ca_path} does not contain a PEM certificate"
        )


class ClientLibraryTests(TestCase):
    """
    The client library against the real daemon on 127.0.0.1: with a server
    certificate that does not prove "localhost", connecting fails with
    TLSHandshakeFailed and the daemon logs no login attempt, because the
    password was never sent.
    """

    def setUp(self):
        self.now = datetime.datetime.now(datetime.timezone.utc)
        self.certs_dir = self.mktemp()
        write_certs(self.certs_dir, ["localhost"], ["127.0.0.1", "::1"], now=self.now)
        self.security_events = []  # the daemon's audit events, logins included
        globalLogPublisher.addObserver(self.observe)
        self.addCleanup(globalLogPublisher.removeObserver, self.observe)

    def observe(self, event):
        if "security_event" in event:
            self.security_events.append(event["security_event"])

    @inlineCallbacks
    def log_in(self):
        """
        Start the daemon with the certificates in certs_dir, then connect a
        ChatClient (verifying "localhost") and log in; the outcome is the
        exception that stopped it.
        """
        port, _, _ = start_daemon(self, reactor, certs=self.certs_dir)
        ca_path = os.path.join(self.certs_dir, CA_CERT)
        client = ChatClient(
            "127.0.0.1",
            port,
            ca_path,
            hostname="localhost",
            reactor=reactor,
            reconnect=False,
        )
        self.addCleanup(client.close)
        attempt = client.connect()
        attempt.addCallback(lambda _: client.login("alice", "correct horse battery"))
        outcome = yield attempt.addErrback(lambda failure: failure.value)
        return outcome

    @inlineCallbacks
    def assertNoLogin(self):
        """
        Connecting fails with TLSHandshakeFailed and the daemon saw no login;
        returns the error's message.
        """
        outcome = yield self.log_in()
        self.assertEqual(self.security_events, [])
        self.assertIsInstance(outcome, TLSHandshakeFailed)
        return str(outcome)

    @inlineCallbacks
    def test_valid_certificate_logs_in(self):
        """
        The control: with the certificate write_certs made, the password
        reaches the daemon (a failed login for an unknown user is logged).
        """
        outcome = yield self.log_in()
        self.assertIsInstance(outcome, BadCredentials)
        self.assertEqual(self.security_events, ["login_failed"])

    @inlineCallbacks
    def test_common_name_only(self):
        """CN=localhost from the trusted CA, no subjectAltName: the bug."""
        write_server_cert(self.certs_dir, self.now, names=())
        message = yield self.assertNoLogin()
        self.assertIn("subjectAltName", message)

    @inlineCallbacks
    def test_wrong_subject_alt_name(self):
        """CN=localhost from the trusted CA, subjectAltName chat.example."""
        write_server_cert(self.certs_dir, self.now, names=("chat.example",))
        yield self.assertNoLogin()

    @inlineCallbacks
    def test_expired(self):
        """From the trusted CA, expired ten days ago."""
        write_server_cert(self.certs_dir, self.now, valid=(-40, -10))
        yield self.assertNoLogin()

    @inlineCallbacks
    def test_ca_certificate(self):
        """The trusted CA's own self-signed certificate."""
        serve_ca_certificate(self.certs_dir)
        yield self.assertNoLogin()

    @inlineCallbacks
    def test_self_signed(self):
        """Self-signed for localhost, not from the trusted CA."""
        write_server_cert(self.certs_dir, self.now, self_signed=True)
        yield self.assertNoLogin()
