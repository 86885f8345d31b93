"""Write accounts (and resume tokens) into a new database before the daemon starts.

Run as a script by the daemon's interpreter with the same PYTHONPATH, so
that it imports the securechatd that twistd runs (same migrations, store
and hash). Every account gets the same bcrypt hash, made once at
the daemon's cost: a login costs the server exactly what it would after a
Register, but setting up 1000 accounts costs one hash instead of 1000.
Resume tokens are stored the way a Login stores them.

stdin: {"database", "cost", "password", "users": [...], "tokens": bool}
stdout: {"user": token or null, ...}
"""

import json
import secrets
import sys
import uuid

from twisted.internet import defer, task

from securechatd.server.passwords import PasswordHasher
from securechatd.store import Store
from securechatd.store.migrations import upgrade

# The bench also measures older trees (a "before" for a change): where these lived then.
try:
    from securechatd.server.passwords import token_hash
except ImportError:  # before 94eeea5
    from securechatd.server.accounts import token_hash
try:
    from securechatd.store.dialect import connect, open_pool
except ImportError:  # store/pool.py in older trees
    from securechatd.store.pool import connect, open_pool

TOKEN_LIFETIME = 30 * 86400


async def seed(reactor, request):
    path = request["database"]
    connection = connect(path)
    try:
        upgrade(connection, path, reactor.seconds())
    finally:
        connection.close()
    hashed = await PasswordHasher(request["cost"], defer.maybeDeferred).hash(request["password"])
    store = Store(open_pool(path, reactor=reactor))
    tokens = {}
    try:
        now = reactor.seconds()
        created = await defer.gatherResults(
            [store.create_user(user, hashed, now) for user in request["users"]]
        )
        if not all(created):
            raise SystemExit("seed: an account already exists")
        writes = []
        for user in request["users"]:
            tokens[user] = secrets.token_urlsafe(32) if request["tokens"] else None
            if tokens[user]:
                writes.append(
                    store.add_resume_token(
                        user, uuid.uuid4().hex, token_hash(tokens[user]), now, now + TOKEN_LIFETIME
                    )
                )
        await defer.gatherResults(writes)
    finally:
        store.close()
    json.dump(tokens, sys.stdout)


def main():
    request = json.load(sys.stdin)
    task.react(lambda reactor: defer.Deferred.fromCoroutine(seed(reactor, request)))


if __name__ == "__main__":
    main()
