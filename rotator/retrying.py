"""Retry policies: what to do when an attempt fails transiently, and for how long.

Built on tenacity, with the rules lg-rotate needs everywhere it retries:

* only errors the caller calls transient are retried; anything else propagates at once;
* exponential backoff with *full jitter* (a random wait between 0 and
  ``min(max_delay, base_delay * 2 ** (attempt - 1))``), so that many rotators that
  failed together do not retry together;
* a ``retry_after`` attribute on the exception (``TransientSourceError`` carries the
  server's ``Retry-After``) is a floor for the wait: the server asked for it;
* the budget (seconds, on a monotonic clock) is *the* bound: transient failures are
  retried until it is spent, however many attempts that takes. No wait ends past the
  deadline: when the jittered wait would cross it, the wait is shortened so that one
  last attempt starts a little before the deadline (:meth:`RetryPolicy.final_reserve`).
  ``max_attempts`` is an optional secondary cap (none by default). When the budget is
  spent, the server's ``Retry-After`` points past it, or the cap is reached, the policy
  gives up with :class:`RetriesExhausted`, which carries the last error for the caller to
  turn into its own error class (e.g. ``SourceUnavailableError``);
* each retry is logged at WARNING with the attempt count and the error's one-line
  message (lg-rotate messages never carry secrets; token-shaped text is redacted too).

``sleep``, ``clock`` and ``random`` are injectable so that tests neither sleep nor
depend on chance.
"""

from __future__ import annotations

import logging
import random as _random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import tenacity

from rotator.errors import LgRotateError
from rotator.tokens import REDACTED, TOKEN_SHAPED

T = TypeVar("T")

_LOGGER = logging.getLogger("lg_rotate.retrying")


class RetriesExhausted(Exception):  # noqa: N818 - it is an outcome, not a bug report
    """The retry budget ran out; ``last_error`` is the final transient failure.

    Not an :class:`~rotator.errors.LgRotateError` on purpose: the caller knows which
    error class and fix hint describe the situation, and must translate it.
    """

    def __init__(
        self, *, last_error: BaseException, attempts: int, elapsed: float, reason: str
    ) -> None:
        super().__init__(f"gave up after {attempts} attempt(s) in {elapsed:.1f}s: {reason}")
        self.last_error = last_error
        self.attempts = attempts
        self.elapsed = elapsed
        self.reason = reason


def describe_error(error: BaseException) -> str:
    """One line naming an error, safe for logs (token-shaped text redacted)."""
    text = error.one_line() if isinstance(error, LgRotateError) else str(error)
    text = " ".join(text.split()) or type(error).__name__
    return TOKEN_SHAPED.sub(REDACTED, text)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how long to retry; immutable, shareable between calls.

    ``budget`` is the whole retry budget in seconds, measured from the start of
    :meth:`call`; pass ``deadline=`` to :meth:`call` to bound it further (the rotation
    bounds it by the remaining TTL of a token it is delivering). ``max_attempts`` (None:
    no cap) is a secondary safety; the budget is what ends the retries.
    """

    max_attempts: int | None = None
    base_delay: float = 0.5
    max_delay: float = 8.0
    budget: float = 60.0
    sleep: Callable[[float], None] = field(default=time.sleep, repr=False)
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)
    random: Callable[[], float] = field(default=_random.random, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1 (or None: no cap)")
        if self.base_delay < 0 or self.max_delay < 0 or self.budget < 0:
            raise ValueError("delays and budget must not be negative")

    def backoff(self, attempt: int) -> float:
        """The jittered wait after failed attempt number ``attempt`` (1-based)."""
        ceiling = min(self.max_delay, self.base_delay * 2 ** min(attempt - 1, 30))
        return float(ceiling * self.random())

    def deadline_from_now(self) -> float:
        return self.clock() + self.budget

    @staticmethod
    def final_reserve(window: float) -> float:
        """Seconds kept for the last attempt of a ``window``-second budget (<= 1 s).

        A jittered wait that would cross the deadline is shortened to end this long
        before it, so the budget is used up to its end rather than abandoned early; with
        less than this left, the policy gives up.
        """
        return min(1.0, max(window, 0.0) / 10)

    def _of(self, attempt: int) -> str:
        return f"{attempt}" if self.max_attempts is None else f"{attempt} of {self.max_attempts}"

    def call(
        self,
        fn: Callable[[], T],
        *,
        is_transient: Callable[[BaseException], bool],
        describe: str,
        logger: logging.Logger | None = None,
        deadline: float | None = None,
    ) -> T:
        """Run ``fn`` until it succeeds, fails for good, or the budget runs out.

        ``describe`` names the operation in log lines ("mint a token from
        https://..."); it must not contain secrets. Non-transient errors propagate
        unchanged; exhaustion raises :class:`RetriesExhausted` chained to the last error.
        """
        log = logger or _LOGGER
        started = self.clock()
        own_deadline = started + self.budget
        limit = own_deadline if deadline is None else min(deadline, own_deadline)
        reserve = self.final_reserve(limit - started)
        # Decide once per failed attempt whether to go on and how long to wait, so
        # that tenacity's stop and wait hooks agree whatever order they run in.
        decisions: dict[int, tuple[float | None, str]] = {}
        last_scheduled = False  # the last attempt (just before the deadline) was granted

        def decide(state: tenacity.RetryCallState) -> tuple[float | None, str]:
            nonlocal last_scheduled
            number = state.attempt_number
            if number not in decisions:
                if last_scheduled:
                    decisions[number] = (None, "retry budget spent")
                else:
                    delay, reason, last = self._decide(state, limit=limit, reserve=reserve)
                    last_scheduled = last
                    decisions[number] = (delay, reason)
            return decisions[number]

        def stop(state: tenacity.RetryCallState) -> bool:
            return decide(state)[0] is None

        def wait(state: tenacity.RetryCallState) -> float:
            return decide(state)[0] or 0.0

        def before_sleep(state: tenacity.RetryCallState) -> None:
            error = _outcome_error(state)
            delay = decide(state)[0] or 0.0
            log.warning(
                "%s failed (attempt %s): %s; retrying in %.2fs",
                describe,
                self._of(state.attempt_number),
                describe_error(error),
                delay,
            )

        def exhausted(state: tenacity.RetryCallState) -> T:
            error = _outcome_error(state)
            reason = decide(state)[1]
            elapsed = self.clock() - started
            log.warning(
                "%s failed (attempt %s): %s; giving up (%s)",
                describe,
                self._of(state.attempt_number),
                describe_error(error),
                reason,
            )
            raise RetriesExhausted(
                last_error=error, attempts=state.attempt_number, elapsed=elapsed, reason=reason
            ) from error

        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=stop,
            wait=wait,
            sleep=self.sleep,
            before_sleep=before_sleep,
            retry_error_callback=exhausted,
            reraise=True,
        )
        return retrying(fn)

    def _decide(
        self, state: tenacity.RetryCallState, *, limit: float, reserve: float
    ) -> tuple[float | None, str, bool]:
        """``(delay, "", last)`` to retry after ``delay`` (``last``: the final attempt),
        or ``(None, reason, False)`` to give up."""
        number = state.attempt_number
        if self.max_attempts is not None and number >= self.max_attempts:
            return None, f"{self.max_attempts} attempts made", False
        delay = self.backoff(number)
        asked = getattr(_outcome_error(state), "retry_after", None)
        retry_after = float(asked) if isinstance(asked, int | float) and asked > 0 else 0.0
        delay = max(delay, retry_after)
        remaining = limit - self.clock()
        if retry_after and retry_after >= remaining:
            return None, f"the server asked to wait {retry_after:.1f}s, past the budget", False
        if remaining <= reserve or remaining <= 0:
            return None, "retry budget spent", False
        if delay > remaining - reserve:
            # The jittered wait would cross the deadline: wait less, and make one last
            # attempt just before it (never sooner than the server asked).
            return max(remaining - reserve, retry_after), "", True
        return delay, "", False


def _outcome_error(state: tenacity.RetryCallState) -> BaseException:
    outcome = state.outcome
    error = outcome.exception() if outcome is not None else None
    if not isinstance(error, BaseException):
        raise RuntimeError("the retry hook ran without a failed attempt")  # a bug
    return error


def retry_call(
    fn: Callable[[], T],
    *,
    is_transient: Callable[[BaseException], bool],
    describe: str,
    deadline: float | None = None,
    max_attempts: int | None = None,
    base_delay: float = 0.5,
    max_delay: float = 8.0,
    budget: float = 60.0,
    logger: logging.Logger | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Functional shortcut for ``RetryPolicy(...).call(fn, ...)``."""
    policy = RetryPolicy(
        max_attempts=max_attempts,
        base_delay=base_delay,
        max_delay=max_delay,
        budget=budget,
        sleep=sleep,
    )
    return policy.call(
        fn, is_transient=is_transient, describe=describe, logger=logger, deadline=deadline
    )
