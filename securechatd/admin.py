"""`securechatd-admin`: certificates, accounts, two-factor login, the server's signing key; safe while the daemon runs.

Account commands open the same SQLite database as the daemon (WAL mode and a
busy timeout let both write) and apply the same rules and bcrypt cost.
"""

import getpass
import ipaddress
import os
import secrets
import sys
from datetime import datetime, timezone

from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from twisted.internet import reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.python import usage

from securechatd import audit, certs, config
from securechatd.commands import ChatError
from securechatd.e2ee.transcript import readable_key_id, server_key_id
from securechatd.server.accounts import normalize_username
from securechatd.server.chain import load_server_key
from securechatd.server.passwords import token_hash
from securechatd.server.passwords import PasswordHasher, check_rule
from securechatd.store import MigrationError, Store, StoreError, open_pool, prepare_database
from securechatd.store.account_log import Logged, NewEvent


class AdminError(Exception):
    """A problem to report in one line, exit status 1."""


class CertsOptions(usage.Options):
    synopsis = "--dir DIR --hostname NAME [--hostname NAME ...] [--ip ADDR ...] | --dir DIR --client USER"
    longdesc = (
        "Make a new CA and a server certificate signed by it; or, with --client, a client certificate"
        " for an account (mutual TLS), signed by the CA in DIR. Never overwrites files."
    )
    optParameters = [
        ["dir", None, "certs", "Directory to write ca.pem, ca.key, server.pem, server.key (or USER.pem, USER.key)."],
        ["client", None, None, "Make a client certificate for this account instead (key mode 0600)."],
    ]

    def __init__(self):
        super().__init__()
        self["hostname"] = []
        self["ip"] = []

    def opt_hostname(self, name):
        """DNS name the certificate is valid for (repeatable); addresses go in --ip."""
        try:
            ipaddress.ip_address(name)
        except ValueError:
            self["hostname"].append(name)
        else:
            raise usage.UsageError(f"--hostname: {name!r} is an IP address; give it with --ip")

    def opt_ip(self, address):
        """IP address the certificate is valid for (repeatable)."""
        try:
            self["ip"].append(str(ipaddress.ip_address(address)))
        except ValueError:
            raise usage.UsageError(f"--ip: {address!r} is not an IP address")

    def postOptions(self):
        if self["client"] is not None:
            if self["hostname"] or self["ip"]:
                raise usage.UsageError("--client makes a client certificate: it takes no --hostname or --ip")
            self["client"] = _username(self["client"])
        elif not self["hostname"]:
            raise usage.UsageError("--hostname is required")


class UserOptions(usage.Options):
    def parseArgs(self, username):
        self["username"] = username


class AddUserOptions(UserOptions):
    synopsis = "NAME"
    longdesc = "Create an account; the password is read without echo (or one line of stdin)."


class PasswdOptions(UserOptions):
    synopsis = "NAME"
    longdesc = "Set a user's password and revoke their resume tokens."


class DelUserOptions(UserOptions):
    synopsis = "NAME"
    longdesc = "Delete an account."


class InviteOptions(usage.Options):
    longdesc = "Print a single-use registration invitation (for [accounts] registration = closed)."
    optParameters = [["days", None, 7.0, "Days until the invitation expires.", float]]  # (defaults are not coerced)

    def postOptions(self):
        if not self["days"] > 0:
            raise usage.UsageError("--days must be a positive number")


class UsersOptions(usage.Options):
    longdesc = "List registered users."
    optParameters = [["prefix", None, "", "Only names starting with this."]]


class TwoFactorOptions(UserOptions):
    synopsis = "NAME [--disable]"
    longdesc = (
        "Show whether a user's two-factor login is on; with --disable, switch it off (for a user who lost"
        " their authenticator and their recovery codes). The user's account log records it."
    )
    optFlags = [["disable", None, "Switch the user's two-factor login off."]]

    def parseArgs(self, username, *rest):
        """NAME, and --disable before or after it (`2fa USER --disable`, as the docs spell it)."""
        for argument in rest:
            if argument != "--disable":
                raise usage.UsageError(f"unexpected argument {argument!r}")
            self["disable"] = True
        self["username"] = username


class ServerKeyOptions(usage.Options):
    longdesc = (
        "Print the server's signing key (it signs the chains of encrypted conversations and the account log's"
        " tree heads) and its key id: publish them so that users, securechatd-verify and securechatd-verify-log"
        " can check what the server signed."
    )


class Options(usage.Options):
    synopsis = "[--config FILE] [--database PATH] COMMAND [options]"
    optParameters = [
        ["config", "c", None, "The daemon's INI file (for the database path and bcrypt cost)."],
        ["database", "d", None, "SQLite database file (overrides the config file)."],
    ]
    subCommands = [
        ["certs", None, CertsOptions, "Make a CA and a server certificate."],
        ["adduser", None, AddUserOptions, "Create a user."],
        ["passwd", None, PasswdOptions, "Set a user's password."],
        ["deluser", None, DelUserOptions, "Delete a user."],
        ["users", None, UsersOptions, "List users."],
        ["invite", None, InviteOptions, "Make a registration invitation."],
        ["server-key", None, ServerKeyOptions, "Print the server's signing key and its id."],
        ["2fa", None, TwoFactorOptions, "Show or switch off a user's two-factor login."],
    ]

    def postOptions(self):
        if self.subCommand is None:
            raise usage.UsageError("a command is required")


def read_password(prompt, stdin=None):
    """A new password: twice without echo on a terminal, else one line of stdin."""
    stdin = stdin or sys.stdin
    if stdin.isatty():
        password = getpass.getpass(prompt)
        if getpass.getpass("Again: ") != password:
            raise AdminError("the passwords do not match")
    else:
        password = stdin.readline().rstrip("\r\n")
    try:
        check_rule(password)
    except ChatError as problem:
        raise AdminError(str(problem))
    return password


def _print_server_key(settings, out):
    path = config.signing_key_path(settings)
    if not os.path.exists(path):
        raise AdminError(f"no signing key at {path} yet: the daemon makes it when it first starts")
    public = load_server_key(path).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key_id = server_key_id(public)
    out.write(f"key    {public.hex()}\nkey id {readable_key_id(key_id)}\n")


def _username(name):
    try:
        return normalize_username(name)
    except ChatError as problem:
        raise AdminError(str(problem))


async def _accounts(reactor, settings, command, options, out):
    prepare_database(settings.database, settings.durability, settings.busy_timeout, reactor.seconds())
    store = Store(open_pool(settings.database, settings.durability, settings.busy_timeout, reactor))
    try:
        if command == "users":
            for name in await store.list_users(options["prefix"]):
                out.write(name + "\n")
            return
        if command == "invite":
            invite = secrets.token_urlsafe(24)
            now = reactor.seconds()
            await store.add_invite(token_hash(invite), now, now + options["days"] * 86400)
            audit.record(settings.audit_log, "admin_invite", reactor.seconds(), method="admin")
            out.write(invite + "\n")
            return
        username = _username(options["username"])
        if command == "2fa":
            await _two_factor(reactor, settings, store, username, options["disable"], out)
            return
        if command == "deluser":
            if not await store.delete_user(username, reactor.seconds()):
                raise AdminError(f"no such user: {username}")
            audit.record(settings.audit_log, "admin_deluser", reactor.seconds(), target=username, method="admin")
            out.write(f"deleted {username}\n")
            return
        password = read_password(f"Password for {username}: ")
        hasher = PasswordHasher(settings.bcrypt_cost, deferToThread)
        hashed = await hasher.hash(password)
        if command == "adduser":
            if not await store.create_user(username, hashed, reactor.seconds()):
                raise AdminError(f"the username {username} is taken")
            audit.record(settings.audit_log, "admin_adduser", reactor.seconds(), target=username, method="admin")
            out.write(f"created {username}\n")
        elif isinstance(
            await store.change_password(
                username, hashed, reactor.seconds(), None, NewEvent("password_change", target="admin")
            ),
            Logged,
        ):
            audit.record(settings.audit_log, "admin_passwd", reactor.seconds(), target=username, method="admin")
            out.write(f"password changed for {username}; their resume tokens are revoked\n")
        else:
            raise AdminError(f"no such user: {username}")
    finally:
        store.close()


async def _two_factor(reactor, settings, store, username, disable, out):
    """`2fa USER [--disable]`: the user's two-factor login, switched off and logged if asked."""
    if await store.get_credentials(username) is None:
        raise AdminError(f"no such user: {username}")
    state = await store.two_factor(username)
    if not disable:
        on = state is not None and state.enabled
        out.write(f"two-factor login {'on' if on else 'off'} for {username}")
        out.write(f", {state.recovery_left} recovery codes left\n" if on else "\n")
        return
    event = NewEvent("second_factor_off", target="admin")
    if await store.disable_two_factor(username, event, reactor.seconds()) is None:
        raise AdminError(f"two-factor login is not on for {username}")
    audit.record(settings.audit_log, "admin_2fa_disable", reactor.seconds(), target=username, method="admin")
    out.write(f"two-factor login switched off for {username}; they log in with their password alone\n")


def run(argv, out=sys.stdout):
    """Run one admin command; returns the exit status."""
    options = Options()
    try:
        options.parseOptions(argv)
        overrides = {"database": options["database"]} if options["database"] else {}
        settings = config.load(options["config"], overrides)
        command, sub = options.subCommand, options.subOptions
        if command == "certs":
            now = datetime.fromtimestamp(reactor.seconds(), timezone.utc)
            if sub["client"] is not None:
                written = certs.write_client_cert(sub["dir"], sub["client"], now=now)
            else:
                written = certs.write_certs(sub["dir"], sub["hostname"], sub["ip"], now=now)
            for path in written:
                out.write(f"wrote {path}\n")
            return 0
        if command == "server-key":
            _print_server_key(settings, out)
            return 0
        task.react(lambda reactor: Deferred.fromCoroutine(_reported(reactor, settings, command, sub, out)))
    except SystemExit as exit:
        return exit.code
    except _REPORTED as problem:
        return _report(problem)
    return 0


_REPORTED = (
    usage.UsageError,
    config.ConfigError,
    certs.CertError,
    AdminError,
    MigrationError,
    StoreError,
    OSError,
)


def _report(problem):
    sys.stderr.write(f"securechatd-admin: {problem}\n")
    return 1


async def _reported(reactor, settings, command, options, out):
    """Run an account command under task.react, reporting expected problems in one line."""
    try:
        await _accounts(reactor, settings, command, options, out)
    except _REPORTED as problem:
        raise SystemExit(_report(problem))


def main():
    sys.exit(run(sys.argv[1:]))
