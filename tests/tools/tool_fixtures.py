"""Tools and environments the tool tests name as module:attribute (tests/ is on the path)."""

import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first integer.
        b: The second integer.
    """
    return a + b


def divide(a: float, b: float) -> float:
    """Divide a by b.

    Args:
        a: The dividend.
        b: The divisor.
    """
    return a / b


def slow(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "done"


def spin() -> str:
    """Loop forever in Python code, swallowing ordinary exceptions."""
    while True:
        try:
            sum(range(1000))
        except Exception:  # a careless tool: the timeout must still stop it
            pass


MATH_TOOLS = [add, divide]


class Counter:
    """A stateful environment: a counter the model increments; later user turns come from the state."""

    def reset(self, state):
        self.value = (state or {}).get("start", 0)
        self.turns = list((state or {}).get("user_turns", []))

    def increment(self, by: int) -> dict:
        """Add to the counter.

        Args:
            by: How much to add (positive).
        """
        if by <= 0:
            return {"error": f"by must be positive, got {by}"}
        self.value += by
        return {"value": self.value}

    def next_user_message(self):
        return self.turns.pop(0) if self.turns else None

    def final_state(self):
        return {"value": self.value}
