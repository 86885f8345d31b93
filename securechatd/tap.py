"""`twistd securechatd`: command-line options and the service tree.

makeService is synchronous and runs before the reactor: it creates missing
development certificates, upgrades the database schema, and builds the
services. Any problem there stops start-up with one line and exit status 1.
"""

import os
import signal
from datetime import datetime, timezone
import sys
from functools import partial

from twisted.application.internet import TimerService
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint, serverFromString
from twisted.internet.defer import maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage

from securechatd import certs, config, secretbox, tls
from securechatd.server.account_log import AccountLog, AccountLogService
from securechatd.server.accounts import AccountService
from securechatd.server.actions import ActionChecker
from securechatd.server.chain import ChainService, HeadSigner, load_server_key
from securechatd.server.conversations import ConversationService
from securechatd.server.hub import Hub
from securechatd.server.encrypted import EncryptedService
from securechatd.server.device_events import LoggingKeyService
from securechatd.server.membership import MembershipChecker
from securechatd.server.messages import MessageService
from securechatd.server.passwords import HashThreadPool, PasswordHasher
from securechatd.server.presence import PresenceService
from securechatd.server.receipts import ReceiptService
from securechatd.server.security import SecurityService
from securechatd.server.twofactor import TwoFactor
from securechatd.server.connection import AdmittingTLSFactory, ChatFactory, ConnectionLimits
from securechatd.server.services import (
    AuditLogService,
    ListenerService,
    SequentialMultiService,
    StoreService,
    ThreadPoolService,
)
from securechatd.server.throttle import LoginThrottle, TokenBucket, WindowCounter
from securechatd.store import MigrationError, Store, StoreError, open_pool, prepare_database
from securechatd.store.twofactor import two_factor_users

log = Logger()


def _fail(problem):
    """Stop start-up with one line on stderr and exit status 1: no traceback."""
    sys.stderr.write(f"securechatd: {problem}\n")
    raise SystemExit(1)


class Options(usage.Options):
    """Every option can also be set in the config file; the command line wins."""

    optParameters = [
        ["config", "c", None, "INI file with settings (see conf/securechatd.ini)."],
        ["port", "p", None, "TCP port to listen on [default: 5599]."],
        ["interface", "i", None, "IP address to listen on [default: 127.0.0.1]."],
        ["listen", None, None, "Server endpoint string instead of port/interface (e.g. systemd:domain=INET6:index=0)."],
        ["database", "d", None, "SQLite database file [default: securechatd.sqlite]."],
        ["certs", None, None, "Directory with ca.pem, server.pem, server.key [default: certs]."],
    ]

    def postOptions(self):
        overrides = {
            name: self[name]
            for name in ("port", "interface", "listen", "database", "certs")
            if self[name] is not None
        }
        try:
            self["settings"] = config.load(self["config"], overrides)
        except config.ConfigError as problem:
            raise usage.UsageError(str(problem))


def _endpoint(settings, reactor):
    if settings.listen:
        try:
            return serverFromString(reactor, settings.listen), settings.listen
        except Exception as problem:  # the parser raises several kinds for a bad string
            raise config.ConfigError(
                f"{config.describe('listen')} (--listen): {settings.listen!r} is not a"
                f" server endpoint string ({problem})"
            )
    endpoint_type = TCP6ServerEndpoint if ":" in settings.interface else TCP4ServerEndpoint
    endpoint = endpoint_type(reactor, settings.port, backlog=settings.backlog, interface=settings.interface)
    return endpoint, f"{settings.interface} port {settings.port}"


def _prepare_database(settings, reactor):
    applied = prepare_database(settings.database, settings.durability, settings.busy_timeout, reactor.seconds())
    if applied:
        log.info(
            "database {path}: applied schema migrations {versions}",
            path=settings.database,
            versions=applied,
        )


def make_hub(settings, store, hasher, clock, server_key, run_in_thread=maybeDeferred, totp_key=None):
    """Every service of the daemon, wired together, for `settings` (also used by the tests).

    `server_key` (Ed25519) signs the conversations' chain heads and the
    account log's tree heads (each under its own label). `totp_key` (32
    bytes, another key) seals TOTP secrets (None, for tests: a new random key).
    `run_in_thread` checks signatures of chain links and membership states
    and signs the account log's heads (build: a thread pool; the default, for
    tests, runs them at once). Chain heads are signed on the store's thread.
    """
    account_log = AccountLog(store, clock, server_key, run_in_thread)
    two_factor = TwoFactor(
        store,
        clock,
        totp_key or os.urandom(secretbox.KEY_BYTES),
        settings.two_factor == "required",
        account_log,
        config.totp_key_path(settings),
        settings.totp_issuer,
    )
    signed_actions = ActionChecker(store, clock, run_in_thread)
    accounts = AccountService(
        store,
        hasher,
        clock,
        LoginThrottle(
            clock,
            settings.login_failures_before_delay,
            settings.login_max_delay,
            settings.address_login_failures,
            settings.address_failure_window,
        ),
        WindowCounter(clock, settings.registrations_per_address, settings.registration_window),
        registration_exempt=settings.registration_exempt,
        max_sessions=settings.max_sessions,
        token_lifetime=settings.resume_token_lifetime,
        registration_open=settings.registration == "open",
        log=account_log,
        two_factor=two_factor,
        actions=signed_actions,
        second_factor_timeout=settings.second_factor_timeout,
        enrolment_timeout=settings.enrolment_timeout,
    )
    actions = TokenBucket(clock, settings.action_burst, settings.action_rate)
    plaintext_allowed = settings.plaintext == "allowed"
    conversations = ConversationService(
        store,
        accounts.registry,
        clock,
        actions,
        settings.max_members,
        MembershipChecker(store, run_in_thread),
        plaintext_allowed,
        invitations=settings.invitations == "on",
    )
    message_rate = TokenBucket(clock, settings.message_burst, settings.message_rate)  # plaintext and encrypted
    messages = MessageService(
        store,
        conversations,
        accounts.registry,
        clock,
        message_rate,
        settings.max_message_bytes,
        settings.max_pending,
        plaintext_allowed,
    )
    heads = HeadSigner(store, server_key)
    encrypted = EncryptedService(
        store,
        conversations,
        accounts.registry,
        clock,
        message_rate,
        settings.max_message_bytes,
        settings.max_pending,
        settings.max_recipient_devices,
        settings.staging_timeout,
    )
    receipts = ReceiptService(store, conversations, accounts.registry, clock)
    presence = PresenceService(
        store,
        accounts.registry,
        clock,
        actions,
        TokenBucket(clock, settings.search_burst, settings.search_rate),
        settings.presence_scope,
        settings.directory_prefix,
    )
    hub = Hub(
        accounts,
        conversations,
        messages,
        receipts,
        presence,
        clock,
        settings.delivery_window,
        settings.max_pending,
        encrypted,
    )
    hub.keys = LoggingKeyService(
        account_log,
        store,
        accounts.registry,
        clock,
        run_in_thread,
        actions,
        TokenBucket(clock, settings.claim_burst, settings.claim_rate),
        settings.max_devices,
        settings.max_one_time_prekeys,
        presence.look_up,
    )
    hub.chain = ChainService(store, conversations, accounts.registry, clock, heads, run_in_thread, actions)
    hub.account_log = account_log
    hub.security = SecurityService(accounts, two_factor, signed_actions, account_log, clock)
    return hub


def build(settings, reactor):
    """The daemon's service tree for `settings` (raises on bad certs or database)."""
    if certs.ensure_dev_certs(settings.certs, datetime.fromtimestamp(reactor.seconds(), timezone.utc)):
        log.warn(
            "Created DEVELOPMENT certificates in {directory}: a new CA (ca.pem) and a"
            " server certificate for localhost, 127.0.0.1 and ::1. Clients must trust"
            " {directory}/ca.pem. For a real deployment put your own server.pem and"
            " server.key there.",
            directory=settings.certs,
        )
    server_tls = tls.server_options(settings.certs, settings.client_certificates, config.client_ca_path(settings))
    _prepare_database(settings, reactor)
    totp_key = secretbox.load_or_create_key(
        config.totp_key_path(settings), two_factor_users(settings.database, settings.busy_timeout)
    )
    store = Store(open_pool(settings.database, settings.durability, settings.busy_timeout, reactor))
    hash_pool = HashThreadPool(
        settings.hash_nice, minthreads=0, maxthreads=settings.hash_threads, name="securechatd-bcrypt"
    )
    hasher = PasswordHasher(settings.bcrypt_cost, partial(deferToThreadPool, reactor, hash_pool))
    server_key = load_server_key(config.signing_key_path(settings))
    hub = make_hub(
        settings,
        store,
        hasher,
        reactor,
        server_key,
        partial(deferToThreadPool, reactor, reactor.getThreadPool()),
        totp_key,
    )
    factory = ChatFactory(hub, reactor, ConnectionLimits.from_settings(settings))
    endpoint, where = _endpoint(settings, reactor)
    daemon = SequentialMultiService()
    if settings.audit_log:
        AuditLogService(settings.audit_log).setServiceParent(daemon)
    ThreadPoolService(hash_pool).setServiceParent(daemon)
    StoreService(store, reactor, before_close=[hub.encrypted.flush_acknowledged]).setServiceParent(daemon)
    AccountLogService(hub.account_log).setServiceParent(daemon)
    checks = TimerService(settings.session_check, _check_sessions, hub)
    checks.clock = reactor
    checks.setServiceParent(daemon)
    listener = ListenerService(
        endpoint, AdmittingTLSFactory(server_tls, False, factory), where, reactor, settings.shutdown_grace
    )
    listener.setName("listener")
    listener.setServiceParent(daemon)
    return daemon


def _check_sessions(hub):
    """One round of Hub.check_sessions; a failure is logged and the next round tries again."""
    hub.check_sessions().addErrback(lambda failure: log.failure("checking sessions", failure))


def _stop_on_sigterm(reactor):
    """SIGTERM stops the reactor (so services drain) and twistd then exits 0.

    (Twisted's own handler makes twistd end itself with the signal, which
    service managers and scripts read as a crash.)
    """

    def stop(signum, frame):
        log.info("SIGTERM: shutting down")
        reactor.callFromThread(reactor.stop)

    signal.signal(signal.SIGTERM, stop)


def makeService(options, reactor=None):
    if reactor is None:
        from twisted.internet import reactor
    try:
        daemon = build(options["settings"], reactor)
    except (config.ConfigError, certs.CertError, MigrationError, StoreError, OSError, secretbox.KeyFileError) as problem:
        _fail(problem)
    reactor.callWhenRunning(_stop_on_sigterm, reactor)
    return daemon
