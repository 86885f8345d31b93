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


def take_action(actions, session):
    """Presence and membership changes push to many others: each user gets so many (a TokenBucket)."""
    wait = actions.take(session.username)
    if wait:
        raise RateLimited(f"Too many changes; {retry_text(wait)}.")
