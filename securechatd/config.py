"""Settings: conf/securechatd.ini plus command-line overrides, validated once.

Every setting is declared here with its INI section, default and parser, so
the daemon, the admin CLI and the documented sample config cannot disagree.
A problem is reported as one sentence naming the setting.
"""

import configparser
import ipaddress
import os
from dataclasses import dataclass


class ConfigError(Exception):
    """A setting is missing, unknown or has a bad value."""


def _integer(low, high=None):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            bound = f"from {low} to {high}" if high is not None else f"of at least {low}"
            raise ValueError(f"must be a whole number {bound}, not {text!r}")
        return value

    return parse


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = -1
    if not value > 0:
        raise ValueError(f"must be a positive number of seconds, not {text!r}")
    return value


def _choice(*choices):
    def parse(text):
        if text not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {text!r}")
        return text

    return parse


def _text(text):
    if not text.strip():
        raise ValueError("must not be empty")
    return text.strip()


def _optional_text(text):
    return text.strip() or None


def _issuer(text):
    """An authenticator app's name for this server: 1 to 64 characters, no ':' (the URI's label separator)."""
    issuer = _text(text)
    if len(issuer) > 64 or ":" in issuer:
        raise ValueError(f"must be 1 to 64 characters without ':', not {text!r}")
    return issuer


def _address(text):
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise ValueError(f"must be an IP address such as 127.0.0.1 or ::, not {text!r}")


def _addresses(text):
    return tuple(_address(part) for part in text.replace(",", " ").split())


@dataclass(frozen=True)
class Settings:
    """Every setting of the daemon, with its default (see conf/securechatd.ini)."""

    interface: str = "127.0.0.1"
    port: int = 5599
    listen: str | None = None
    certs: str = "certs"
    signing_key: str | None = None  # None: <certs>/signing.key
    database: str = "securechatd.sqlite"
    durability: str = "normal"
    busy_timeout: float = 5.0
    bcrypt_cost: int = 12
    hash_threads: int = 2
    hash_nice: int = 10
    max_sessions: int = 10
    session_check: float = 2.0
    resume_token_lifetime: float = 30 * 86400
    login_failures_before_delay: int = 5
    login_max_delay: float = 900.0
    address_login_failures: int = 20
    address_failure_window: float = 3600.0
    registrations_per_address: int = 1
    registration_window: float = 600.0
    registration_exempt: tuple = ("127.0.0.1", "::1")
    max_message_bytes: int = 16 * 1024
    max_members: int = 1000
    delivery_window: int = 32
    max_pending: int = 10000
    plaintext: str = "refused"
    max_recipient_devices: int = 500
    staging_timeout: float = 120.0
    ping_after: float = 30.0
    drop_after: float = 90.0
    login_deadline: float = 60.0
    unauthenticated_per_address: int = 20
    max_connections: int = 10000
    commands_in_flight: int = 32
    max_unread_output: int = 1 << 20
    write_stall: float = 15.0
    box_bytes_before_login: int = 8 * 1024
    box_keys_before_login: int = 32
    box_bytes: int = 64 * 1024 + 2048
    box_keys: int = 64
    max_unanswered_pushes: int = 1000
    refusals_before_pause: int = 50
    refusal_pause: float = 5.0
    message_burst: int = 30
    message_rate: float = 10.0
    action_burst: int = 20
    action_rate: float = 1.0
    claim_burst: int = 50
    claim_rate: float = 0.1
    search_burst: int = 30
    search_rate: float = 0.5
    max_devices: int = 25
    max_one_time_prekeys: int = 200
    shutdown_grace: float = 10.0
    backlog: int = 1024
    registration: str = "open"
    audit_log: str | None = "securechatd-audit.jsonl"
    # account security (issue 13)
    two_factor: str = "optional"
    second_factor_timeout: float = 60.0
    enrolment_timeout: float = 600.0
    totp_key: str | None = None  # None: <certs>/totp.key
    totp_issuer: str = "securechatd"
    presence_scope: str = "contacts"
    invitations: str = "on"
    directory_prefix: int = 0
    client_certificates: str = "off"
    client_ca: str | None = None  # None: <certs>/ca.pem


# field name -> (INI section, INI key, parser of the INI/command-line text)
SCHEMA = {
    "interface": ("server", "interface", _address),
    "port": ("server", "port", _integer(0, 65535)),
    "listen": ("server", "listen", _optional_text),
    "certs": ("server", "certs", _text),
    "signing_key": ("server", "signing_key", _optional_text),
    "database": ("database", "path", _text),
    "durability": ("database", "durability", _choice("normal", "full")),
    "busy_timeout": ("database", "busy_timeout", _seconds),
    "bcrypt_cost": ("accounts", "bcrypt_cost", _integer(10, 20)),
    "hash_threads": ("accounts", "hash_threads", _integer(1, 64)),
    "hash_nice": ("accounts", "hash_nice", _integer(0, 19)),
    "max_sessions": ("accounts", "max_sessions", _integer(1)),
    "session_check": ("accounts", "session_check", _seconds),
    "resume_token_lifetime": ("accounts", "resume_token_lifetime", _seconds),
    "login_failures_before_delay": ("limits", "login_failures_before_delay", _integer(1)),
    "login_max_delay": ("limits", "login_max_delay", _seconds),
    "address_login_failures": ("limits", "address_login_failures", _integer(1)),
    "address_failure_window": ("limits", "address_failure_window", _seconds),
    "registrations_per_address": ("limits", "registrations_per_address", _integer(1)),
    "registration_window": ("limits", "registration_window", _seconds),
    "registration_exempt": ("limits", "registration_exempt", _addresses),
    "max_message_bytes": ("messages", "max_message_bytes", _integer(1, 60000)),
    "max_members": ("messages", "max_members", _integer(2, 1000)),
    "delivery_window": ("messages", "delivery_window", _integer(1, 10000)),
    "max_pending": ("messages", "max_pending", _integer(1)),
    "plaintext": ("messages", "plaintext", _choice("refused", "allowed")),
    "max_recipient_devices": ("messages", "max_recipient_devices", _integer(1, 1000)),
    "staging_timeout": ("messages", "staging_timeout", _seconds),
    "ping_after": ("connections", "ping_after", _seconds),
    "drop_after": ("connections", "drop_after", _seconds),
    "login_deadline": ("connections", "login_deadline", _seconds),
    "unauthenticated_per_address": ("connections", "unauthenticated_per_address", _integer(1)),
    "max_connections": ("connections", "max_connections", _integer(1)),
    "commands_in_flight": ("connections", "commands_in_flight", _integer(1, 10000)),
    "max_unread_output": ("connections", "max_unread_output", _integer(65536)),
    "write_stall": ("connections", "write_stall", _seconds),
    "box_bytes_before_login": ("connections", "box_bytes_before_login", _integer(512, 65535)),
    "box_keys_before_login": ("connections", "box_keys_before_login", _integer(4, 1000)),
    "box_bytes": ("connections", "box_bytes", _integer(4096, 1 << 20)),
    "box_keys": ("connections", "box_keys", _integer(8, 1000)),
    "max_unanswered_pushes": ("connections", "max_unanswered_pushes", _integer(1)),
    "refusals_before_pause": ("connections", "refusals_before_pause", _integer(1)),
    "refusal_pause": ("connections", "refusal_pause", _seconds),
    "message_burst": ("limits", "message_burst", _integer(1)),
    "message_rate": ("limits", "message_rate", _seconds),
    "action_burst": ("limits", "action_burst", _integer(1)),
    "action_rate": ("limits", "action_rate", _seconds),
    "claim_burst": ("limits", "claim_burst", _integer(1)),
    "claim_rate": ("limits", "claim_rate", _seconds),
    "search_burst": ("limits", "search_burst", _integer(1)),
    "search_rate": ("limits", "search_rate", _seconds),
    "max_devices": ("keys", "max_devices", _integer(1, 200)),
    "max_one_time_prekeys": ("keys", "max_one_time_prekeys", _integer(1, 10000)),
    "shutdown_grace": ("server", "shutdown_grace", _seconds),
    "backlog": ("server", "backlog", _integer(1, 65535)),
    "registration": ("accounts", "registration", _choice("open", "closed")),
    "audit_log": ("logging", "audit_log", _optional_text),
    "two_factor": ("accounts", "two_factor", _choice("optional", "required")),
    "second_factor_timeout": ("accounts", "second_factor_timeout", _seconds),
    "enrolment_timeout": ("accounts", "enrolment_timeout", _seconds),
    "totp_key": ("accounts", "totp_key", _optional_text),
    "totp_issuer": ("accounts", "totp_issuer", _issuer),
    "presence_scope": ("privacy", "presence", _choice("contacts", "everyone")),
    "invitations": ("privacy", "invitations", _choice("off", "on")),
    "directory_prefix": ("privacy", "directory_prefix", _integer(0, 32)),
    "client_certificates": ("server", "client_certificates", _choice("off", "allowed", "required")),
    "client_ca": ("server", "client_ca", _optional_text),
}


def signing_key_path(settings):
    """The server's Ed25519 signing key file (chain heads, account log tree heads)."""
    return settings.signing_key or os.path.join(settings.certs, "signing.key")


def totp_key_path(settings):
    """The key file that seals TOTP secrets: never the signing key (one key, one purpose)."""
    return settings.totp_key or os.path.join(settings.certs, "totp.key")


def client_ca_path(settings):
    """The CA whose client certificates the daemon accepts (mutual TLS)."""
    return settings.client_ca or os.path.join(settings.certs, "ca.pem")


def describe(name):
    section, key, _ = SCHEMA[name]
    return f"[{section}] {key}"


def _parse(name, text, where):
    try:
        return SCHEMA[name][2](text)
    except ValueError as problem:
        raise ConfigError(f"{where}: {problem}")


def load(path=None, overrides=None):
    """Settings from the INI file at `path` (if any), then `overrides` {field: text}."""
    values = {}
    if path is not None:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            with open(path, encoding="utf-8") as config_file:
                parser.read_file(config_file)
        except OSError as problem:
            raise ConfigError(f"config file {path}: {problem.strerror}")
        except (configparser.Error, UnicodeDecodeError) as problem:
            raise ConfigError(f"config file {path}: not a valid INI file ({problem.__class__.__name__})")
        by_key = {(section, key): name for name, (section, key, _) in SCHEMA.items()}
        for section in parser.sections():
            for key, text in parser.items(section):
                name = by_key.get((section, key))
                if name is None:
                    raise ConfigError(f"{path}: unknown setting [{section}] {key}")
                values[name] = _parse(name, text, f"{path}: {describe(name)}")
    for name, text in (overrides or {}).items():
        values[name] = _parse(name, text, f"--{name}")
    settings = Settings(**values)
    if settings.drop_after <= settings.ping_after:
        raise ConfigError(f"{describe('drop_after')} must be longer than {describe('ping_after')}")
    if os.path.abspath(signing_key_path(settings)) == os.path.abspath(totp_key_path(settings)):
        raise ConfigError(
            f"{describe('totp_key')} must be another file than {describe('signing_key')}: one key, one purpose"
        )
    return settings
