"""
Development certificates: a private CA and a server certificate it signs.

This is first-run and test tooling, not a PKI.  It lets a fresh install
speak TLS at once, with clients that trust ca.pem verifying both the chain
and the host name.  For a real deployment an operator replaces server.pem
and server.key with a certificate from their own CA; nothing here ever
overwrites a file, so a real certificate is never clobbered.

The keys are written unencrypted (PKCS8 PEM) because the daemon has to start
unattended: they are protected by being created 0600 in a 0700 directory,
not by a passphrase that would have to sit next to them anyway.
"""

import datetime
import ipaddress
import os
import re

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from service_identity import CertificateError
from service_identity.cryptography import extract_patterns

CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"

CA_NAME = "securechatd development CA"
CA_DAYS = 3650


class CertError(Exception):
    """
    A problem with certificate files.

    Its message is one sentence for an operator: which file, what is wrong.
    It never contains key material.
    """


# DNS names: labels of letters, digits and hyphens (a leading "*." for wildcards).
_HOSTNAME = re.compile(
    r"(\*\.)?(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?\Z"
)


def write_certs(directory, hostnames, ips=(), *, now, days=825):
    """
    Make a new development CA and a server certificate signed by it.

    @param directory: where to write ca.pem, ca.key, server.pem and
        server.key; created (0700) if missing.
    @param hostnames: DNS names for the server certificate's
        subjectAltName; the first is also its common name.
    @param ips: IP addresses (text or L{ipaddress} objects) for the
        subjectAltName.
    @param now: an aware UTC L{datetime.datetime} the certificates start
        at: the caller's clock (the reactor's time; tests pass a past time
        to get an expired certificate).
    @param days: how long the server certificate is valid; 825 days is the
        longest that Apple platforms accept for a TLS server certificate.

    @raise CertError: if a name could not be checked by clients, if any of
        the four files already exists (nothing is written then) or a file
        cannot be written.
    @return: the paths written, in the order ca.pem, ca.key, server.pem,
        server.key.
    """
    hostnames = list(hostnames)
    if not hostnames:
        raise CertError("a server certificate needs at least one hostname")
    for name in hostnames:
        if not _HOSTNAME.match(name):
            raise CertError(f"{name!r} is not a valid host name")
    addresses = [ipaddress.ip_address(ip) for ip in ips]

    paths = [
        os.path.join(directory, name)
        for name in (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY)
    ]
    for path in paths:
        if os.path.lexists(path):
            raise CertError(f"{path} already exists; refusing to overwrite it")

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_NAME)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    # (a common name is at most 64 characters; clients check the SANs anyway)
    server_cert = (
        _end_entity(ca_name, ca_key, server_key, hostnames[0][:64], ExtendedKeyUsageOID.SERVER_AUTH, now, days)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(name) for name in hostnames]
                + [x509.IPAddress(address) for address in addresses]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(server_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    try:
        # Read the names as the client will: one it cannot read (an address
        # given as a DNS name, "*.localhost") makes it refuse the certificate.
        extract_patterns(server_cert)
    except CertificateError as e:
        raise CertError(f"clients would refuse a certificate for these names: {e}")
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CertError(f"cannot create directory {directory}: {e.strerror}")

    contents = [
        (_cert_pem(ca_cert), 0o644),
        (_key_pem(ca_key), 0o600),
        (_cert_pem(server_cert), 0o644),
        (_key_pem(server_key), 0o600),
    ]
    written = []
    try:
        for path, (data, mode) in zip(paths, contents):
            _write_new(path, data, mode)
            written.append(path)
    except CertError:
        # Leave no half set behind (only files this call created), so that
        # ensure_dev_certs can simply be run again.
        for path in written:
            os.unlink(path)
        raise
    return written


def write_client_cert(directory, username, *, now, days=825, ca_dir=None):
    """
    Make a client certificate for the account username (mutual TLS),
    signed by the CA in ca_dir (ca.pem, ca.key; default: directory).

    Its subject's common name is the account name, which the daemon
    requires to be the account that logs in on the connection; its
    extended key usage is client authentication only, so it can never
    pass for a server.

    @raise CertError: if the CA cannot be read, if USERNAME.pem or
        USERNAME.key already exists (nothing is written then), or a file
        cannot be written.
    @return: the paths written: USERNAME.pem, USERNAME.key (0600).
    """
    ca_dir = ca_dir or directory
    ca_cert_path, ca_key_path = os.path.join(ca_dir, CA_CERT), os.path.join(ca_dir, CA_KEY)
    try:
        with open(ca_cert_path, "rb") as f:
            ca_cert = x509.load_pem_x509_certificate(f.read())
        with open(ca_key_path, "rb") as f:
            ca_key = serialization.load_pem_private_key(f.read(), password=None)
    except OSError as e:
        raise CertError(f"cannot read the CA ({e.filename}): {e.strerror}")
    except (ValueError, TypeError):
        raise CertError(f"{ca_cert_path} and {ca_key_path} are not a PEM certificate and its unencrypted key")
    paths = [os.path.join(directory, f"{username}.pem"), os.path.join(directory, f"{username}.key")]
    for path in paths:
        if os.path.lexists(path):
            raise CertError(f"{path} already exists; refusing to overwrite it")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _end_entity(ca_cert.subject, ca_key, key, username, ExtendedKeyUsageOID.CLIENT_AUTH, now, days)
        .sign(ca_key, hashes.SHA256())
    )
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as e:
        raise CertError(f"cannot create directory {directory}: {e.strerror}")
    _write_new(paths[1], _key_pem(key), 0o600)
    try:
        _write_new(paths[0], _cert_pem(cert), 0o644)
    except CertError:
        os.unlink(paths[1])
        raise
    return paths


def ensure_dev_certs(directory, now):
    """
    Make development certificates on first run; otherwise leave everything.

    @param now: the current time, an aware UTC L{datetime.datetime}.

    @return: L{True} if certificates were written, L{False} if server.pem
        and server.key were already there.
    @raise CertError: naming the missing file, if only some of the files
        exist: that is a broken or half-replaced setup for an operator to
        look at, and guessing could destroy a real key.
    """
    server_cert = os.path.join(directory, SERVER_CERT)
    server_key = os.path.join(directory, SERVER_KEY)
    have_cert = os.path.lexists(server_cert)
    have_key = os.path.lexists(server_key)
    if have_cert and have_key:
        return False
    if have_cert:
        raise CertError(f"{server_key} is missing although {server_cert} exists")
    if have_key:
        raise CertError(f"{server_cert} is missing although {server_key} exists")
    for name in (CA_CERT, CA_KEY):
        path = os.path.join(directory, name)
        if os.path.lexists(path):
            raise CertError(
                f"{server_cert} and {server_key} are missing although {path} "
                f"exists; remove the CA files to make new development "
                f"certificates"
            )
    write_certs(directory, ["localhost"], ["127.0.0.1", "::1"], now=now)
    return True


def _end_entity(ca_name, ca_key, key, common_name, usage, now, days):
    """A certificate builder for `key` under the CA: not a CA, signatures only, for one extended `usage`."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
    )


def _cert_pem(cert):
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key):
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_new(path, data, mode):
    """
    Write a file that must not exist yet, created with its final mode so a
    key is never readable by others, not even for a moment.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise CertError(f"{path} already exists; refusing to overwrite it")
    except OSError as e:
        raise CertError(f"cannot create {path}: {e.strerror}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        os.unlink(path)
        raise CertError(f"cannot write {path}: {e.strerror}")
