"""One exception type for mistakes a user can fix (bad data, bad flags), reported without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserInputError(Exception):
    """A user mistake. The message is complete: what is wrong, where, what was expected, how to fix it."""


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """Run `fn`; on `UserInputError` print the message to stderr and exit with status 2 (no traceback)."""
    try:
        return fn()
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
