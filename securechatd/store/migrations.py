"""Numbered schema migrations, applied in order at start-up and recorded.

Each engine has a folder of SQL files, `schema/<engine>/NNNN_what_it_does.sql`;
file N moves the schema from version N-1 to N. Never edit a released
migration: add the next file. Each runs in one transaction with its row in
`schema_version`, which is written first, so a script can read its own
`applied_at`. Before upgrading a database that already holds data, a copy is
written beside it (`<file>.before-v<N>`), so a failed or regretted upgrade
can be undone by hand.
"""

import os
import re
from importlib import resources

from securechatd.store import dialect


class MigrationError(Exception):
    """The database cannot be brought to this version of the schema."""


def load(folder):
    """[(number, description, script)] of the migration files in `folder`, numbered 1, 2, 3, ..."""
    found = []
    for entry in folder.iterdir():
        named = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if named is None:  # a misnamed migration would otherwise be skipped without a word
            raise MigrationError(f"{entry.name} in {folder} is not named NNNN_what_it_does.sql")
        found.append((int(named[1]), named[2].replace("_", " "), entry.read_text(encoding="utf-8")))
    found.sort()
    if [number for number, _, _ in found] != list(range(1, len(found) + 1)):
        raise MigrationError(f"the migrations in {folder} are not numbered 1 to {len(found)}")
    return found


MIGRATIONS = load(resources.files("securechatd.store") / "schema" / dialect.NAME)
LATEST = MIGRATIONS[-1][0]


def current_version(connection):
    connection.execute(
        "CREATE TABLE IF NOT EXISTS schema_version"
        " (version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    (version,) = connection.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return version


def _backup(connection, path, version):
    """Copy the database beside itself before changing a schema that holds data."""
    target = f"{path}.before-v{version}"
    if path == ":memory:" or os.path.exists(target):
        return
    os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # private from the start
    dialect.backup(connection, target)


def upgrade(connection, path, now, target=None):
    """Apply every migration above the database's version (up to `target`), each in its own transaction.

    Returns the list of versions applied. A database newer than this code is
    refused rather than used. Database errors are the driver's own.
    """
    version = current_version(connection)
    if version > LATEST:
        raise MigrationError(
            f"database {path} has schema version {version}, newer than this"
            f" securechatd understands ({LATEST}); upgrade securechatd"
        )
    pending = [m for m in MIGRATIONS if version < m[0] <= (LATEST if target is None else target)]
    if pending and version > 0:
        _backup(connection, path, version)
    for number, description, script in pending:
        connection.execute(dialect.BEGIN_WRITE)
        try:
            connection.execute(
                "INSERT INTO schema_version (version, description, applied_at) VALUES (?, ?, ?)",
                (number, description, now),
            )
            for statement in dialect.statements(script):
                connection.execute(statement)
            connection.execute("COMMIT")
        except BaseException:
            dialect.rollback(connection)
            raise
    return [m[0] for m in pending]


def prepare_database(path, durability, busy_timeout, now):
    """Connect to the database at `path`, bring its schema up to date, and close it.

    Returns the versions applied. Any problem (the driver's, the backup
    file's, a newer schema) is raised as a MigrationError naming the file.
    """
    try:
        connection = dialect.connect(path, durability, busy_timeout)
        try:
            return upgrade(connection, path, now)
        finally:
            connection.close()
    except (dialect.Error, OSError) as problem:
        raise MigrationError(f"database {path}: {problem}") from problem
