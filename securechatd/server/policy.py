"""What every service shares: its calling convention and the checks on common arguments.

Every public service method returns a Deferred, so a responder never needs
to know how a method is written. Most are coroutines wrapped by `deferred`;
the per-message hot path (MessageService.send, the membership check) is
written as plain callbacks because a coroutine costs as much as the rest of
the work around it.
"""

from functools import wraps

from twisted.internet.defer import Deferred

from securechatd.commands import InvalidArgument, RateLimited
from securechatd.server.throttle import retry_text


def deferred(coroutine_function):
    """Make an `async def` method return a Deferred, like the hand-written ones."""

    @wraps(coroutine_function)
    def run(*args, **kwargs):
        return Deferred.fromCoroutine(coroutine_function(*args, **kwargs))

    return run


def check_limit(limit, default_and_maximum):
    """A page size: the default for None, INVALID_ARGUMENT outside 1..maximum."""
    default, maximum = default_and_maximum
    if limit is None:
        return default
    if not 1 <= limit <= maximum:
        raise InvalidArgument(f"limit must be from 1 to {maximum}.")
    return limit


def check_id(value, name="conversation_id"):
    if value < 1:
        raise InvalidArgument(f"{name} must be a positive number.")
    return value


def take(bucket, key, too_many):
    """One of `key`'s tokens in the TokenBucket `bucket`, or RATE_LIMITED: "`too_many`; retry in N seconds."."""
    wait = bucket.take(key)
    if wait:
        raise RateLimited(f"{too_many}; {retry_text(wait)}.")


def take_action(actions, session):
    """Presence and membership changes push to many others: each user gets so many (a TokenBucket)."""
    take(actions, session.username, "Too many changes")
