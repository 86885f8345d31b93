"""
TLS settings for both ends of a securechatd connection.

The whole AMP connection is wrapped in TLS (AMP's own StartTLS does not check
host names).  Both ends require TLS 1.2 or later and forward-secret AEAD
cipher suites; the client verifies the server's chain up to one configured CA
and the host name it dialled.
"""

import ipaddress
import os
import weakref

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from securechatd.certs import SERVER_CERT, SERVER_KEY, CertError

# Mozilla's "intermediate" TLS 1.2 suites, keeping only ECDHE key exchange
# with AES-GCM or ChaCha20-Poly1305.  Twisted's default list is not used
# because it still accepts suites without forward secrecy (RSA key exchange)
# and CBC-mode suites.  This string only governs TLS 1.2: OpenSSL's TLS 1.3
# suites are all AEAD and forward secret, so its defaults stay.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

_ACCEPTABLE_CIPHERS = AcceptableCiphers.fromOpenSSLCipherString(CIPHERS)


def server_options(certs_dir, client_certificates="off", client_ca=None):
    """
    Build the server's TLS options from certs_dir/server.pem and server.key.

    server.pem holds the server certificate, optionally followed by the
    intermediate certificates that complete its chain.  Everything is
    checked here, at start-up, so a bad file stops the daemon with one clear
    sentence instead of failing each handshake later.

    client_certificates "allowed" or "required" asks clients for a
    certificate issued by the CA in client_ca (mutual TLS): one that does
    not verify fails the handshake, and with "required" so does none.
    Which account a verified certificate may log in as is peer_account's.

    @raise CertError: if a file is missing, unreadable or not PEM, or the
        key does not belong to the certificate.
    """
    cert_path = os.path.join(certs_dir, SERVER_CERT)
    key_path = os.path.join(certs_dir, SERVER_KEY)
    leaf, *chain = _load_certificates(cert_path)
    key = _load_private_key(key_path)
    if _public_der(key.public_key()) != _public_der(leaf.public_key()):
        raise CertError(
            f"{key_path} is not the private key of the certificate in {cert_path}"
        )
    clients = {}
    if client_certificates != "off":
        clients = dict(
            verify=True,
            caCerts=[crypto.X509.from_cryptography(ca) for ca in _load_certificates(client_ca)],
            requireCertificate=client_certificates == "required",
        )
    return CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(leaf),
        extraCertChain=[crypto.X509.from_cryptography(cert) for cert in chain],
        raiseMinimumTo=TLSVersion.TLSv1_2,
        acceptableCiphers=_ACCEPTABLE_CIPHERS,
        **clients,
    )


def peer_account(transport):
    """
    The account a TLS connection's client certificate names (its subject's
    common name, lower case), or None without one.  The server verified it
    against client_ca during the handshake (server_options), so only a
    certificate that CA issued gets here; one without a common name names
    "" (no account).
    """
    get_peer_certificate = getattr(transport, "getPeerCertificate", None)
    if get_peer_certificate is None:
        return None
    certificate = get_peer_certificate()
    if certificate is None:
        return None
    names = certificate.to_cryptography().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return names[0].value.lower() if names else ""


def client_options(ca_path, hostname, client_cert=None, client_key=None):
    """
    Build client TLS options that trust only the CA certificate in ca_path
    and check that the server's certificate names hostname; with
    client_cert and client_key (PEM files), present that certificate
    (mutual TLS).

    hostname may be a DNS name or an IPv4/IPv6 address literal: it is
    matched against the certificate's DNS or IP subjectAltNames (via
    service_identity) and, as the TLS RFCs require, no SNI is sent for an
    address.  A certificate without subjectAltName is refused: the common
    name is never used.

    @raise CertError: if ca_path is missing, unreadable or not a PEM
        certificate.
    """
    data = _read(ca_path)
    try:
        trust_root = Certificate.loadPEM(data)
    except crypto.Error:
        raise CertError(f"{ca_path} does not contain a PEM certificate")
    client = {}
    if client_cert is not None:
        try:
            client["clientCertificate"] = PrivateCertificate.loadPEM(_read(client_cert) + b"\n" + _read(client_key))
        except (crypto.Error, ValueError):
            raise CertError(f"{client_cert} and {client_key} are not a PEM certificate and its key")
    options = optionsForClientTLS(
        hostname,
        trustRoot=trust_root,
        **client,
        extraCertificateOptions={
            "raiseMinimumTo": TLSVersion.TLSv1_2,
            "acceptableCiphers": _ACCEPTABLE_CIPHERS,
        },
    )
    return _StrictHostCheck(options, hostname)


@implementer(IOpenSSLClientConnectionCreator)
class _StrictHostCheck:
    """
    Twisted's client options with a host name check that fails closed.

    Twisted's own check refuses the handshake only on VerificationError;
    for service_identity's CertificateError (a certificate without
    subjectAltName, or with one it cannot read) it logs the error and lets
    the handshake succeed, so the client would send its password to a
    server that proved no name.  Any exception of the check refuses here.
    """

    def __init__(self, options, hostname):
        self._options = options
        try:
            ipaddress.ip_address(hostname)
        except ValueError:
            self._check = lambda cert: verify_certificate_hostname(cert, hostname)
        else:
            self._check = lambda cert: verify_certificate_ip_address(cert, hostname)

    def clientConnectionForTLS(self, tls_protocol):
        connection = self._options.clientConnectionForTLS(tls_protocol)
        # Replaces the verify callback Twisted just set (same flags).
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            self._verify_callback(weakref.ref(tls_protocol)),
        )
        return connection

    def _verify_callback(self, tls_protocol):
        """
        OpenSSL's verify callback: keep its verdict on the chain, and on the
        server's own certificate (depth 0) also require the host name.  A
        refusal aborts the handshake before any application data is sent,
        with the reason reported to the application's connectionLost.
        (A weak reference, so connection and protocol make no cycle.)
        """

        def verify(connection, cert, error_number, depth, ok):
            if not ok or depth != 0:
                return ok
            try:
                self._check(cert.to_cryptography())
            except Exception:
                protocol = tls_protocol()
                if protocol is not None:
                    protocol.failVerification(Failure())
                return False
            return True

        return verify


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertError(f"cannot read {path}: {e.strerror}")


def _load_certificates(path):
    try:
        return x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise CertError(f"{path} does not contain a PEM certificate")


def _load_private_key(path):
    try:
        return serialization.load_pem_private_key(_read(path), password=None)
    except TypeError:
        # Raised for an encrypted key when no password is given.
        raise CertError(
            f"{path} is an encrypted private key; securechatd needs it unencrypted"
        )
    except (ValueError, UnsupportedAlgorithm):
        raise CertError(f"{path} does not contain a PEM private key")


def _public_der(public_key):
    return public_key.public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
