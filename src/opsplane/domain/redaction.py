"""Log redaction (seed 003's "log masking"): secrets in host output are masked before the output
is stored, archived or streamed.

Patterns are regular expressions. A pattern without groups masks its whole match; a pattern with
groups masks only the groups, so ``password=hunter2`` becomes ``password=[REDACTED]`` and the
reader still sees which setting was there. Live output is matched line by line (see
``LineBuffer``): a pattern never spans a line break there.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import AnyStr, Generic

from opsplane.domain.errors import InvalidInput

MASK = "[REDACTED]"

# Every default pattern is linear in its input: it starts at a keyword (never at an unbounded
# run of characters that may precede one), and every repeat that another element follows is
# bounded or possessive, so a failed attempt costs a few dozen steps at most. The first pattern
# used to begin with ``[\w.-]*`` before its keyword: 8 KiB of letters took 2 s and 4 KiB of
# ``password`` repeated 80 s, on the event loop (bench/redaction.py).
#
# Each default pattern comes with its triggers: every match contains one of them (case-folded),
# so a window of input without any is skipped at the speed of ``str.find`` instead of being
# walked by the regular-expression engine one position at a time. An operator's own patterns
# have no triggers and are always matched.
_DEFAULTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # key=value or key: value (also JSON and YAML) where the key names a secret: the value. The
    # match starts at the keyword; what precedes it (``DB_``) is not masked either way.
    (
        r"(?i)(?:password|passwd|secret|token|api[_-]?key)[\w.-]{0,64}+[\"']?[ \t]{0,16}+[=:]"
        r"[ \t]{0,16}+[\"']?([^\s\"',;&]+)",
        ("passw", "secret", "token", "api"),
    ),
    # HTTP credentials: Authorization: Bearer …, Basic …, and a bare bearer token.
    (
        r"(?i)\bauthorization[\"']?[ \t]{0,16}+[=:][ \t]{0,16}+"
        r"(?:(?:bearer|basic|token|digest)[ \t]{1,16}+)?([^\s\"',;]+)",
        ("authorization",),
    ),
    (r"(?i)\bbearer[ \t]{1,16}+([A-Za-z0-9._~+/-]{8,}=*)", ("bearer",)),
    # AWS access key ids (long-term AKIA…, temporary ASIA…).
    (r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b", ("akia", "asia")),
    # A password in a URL: scheme://user:password@host.
    (r"(?i)\b[a-z][a-z0-9+.-]{0,31}+://[^/\s:@]{1,256}+:([^/\s@]{1,256})@", ("://",)),
    # opsplane's own credentials: API tokens (ops_…) and enrollment tokens (enr_…), 32 random
    # bytes in URL-safe base64 (security.tokens). The prefix stays, so a reader sees which kind.
    (r"(?<![\w-])(?:ops|enr)_([A-Za-z0-9_-]{43})(?![\w-])", ("ops_", "enr_")),
)
DEFAULT_REDACT_PATTERNS: tuple[str, ...] = tuple(pattern for pattern, _ in _DEFAULTS)
_TRIGGERS: dict[str, tuple[str, ...]] = dict(_DEFAULTS)

# What one pattern sees per call: input longer than ``WINDOW`` is matched in windows of that
# size that overlap by ``OVERLAP``, so that a pattern that backtracks (an operator's own) costs
# in proportion to the input, not to its square. A match that starts in a window's last
# ``OVERLAP`` is left to the next window, which starts there; one that reaches a window's end
# is matched again in a window that starts where it starts. So a match is found as if the
# input were matched whole when what decides it lies within ``OVERLAP`` of its start (every
# default pattern needs less than 200 characters) and it is shorter than ``WINDOW``; a longer
# one is masked up to its window's end.
WINDOW = 16 * 1024
OVERLAP = 1024


def _mask_match(match: re.Match[AnyStr], mask: AnyStr, value: AnyStr) -> AnyStr:
    """The text of ``match`` in ``value`` (what was matched may be its lower-cased copy), its
    groups masked, or all of it when the pattern has none."""
    whole = value[match.start() : match.end()]
    if match.re.groups == 0:
        return mask
    origin = match.start()
    pieces: list[AnyStr] = []
    pos = 0
    for index in range(1, match.re.groups + 1):
        start, end = match.span(index)
        if start < 0 or start - origin < pos:  # group did not take part, or nested
            continue
        pieces.append(whole[pos : start - origin])
        pieces.append(mask)
        pos = end - origin
    pieces.append(whole[pos:])
    return mask[:0].join(pieces)


def _mask_into(
    pieces: list[AnyStr], match: re.Match[AnyStr], mask: AnyStr, value: AnyStr, done: int
) -> int:
    """``_mask_match`` written straight into ``pieces`` (``value[:done]`` already there): the
    text up to each masked group, then the mask. Returns the new ``done``; what follows the
    last group is left for the next piece."""
    if match.re.groups == 0:
        pieces += (value[done : match.start()], mask)
        return match.end()
    for index in range(1, match.re.groups + 1):
        start, end = match.span(index)
        if start < 0 or start < done:  # group did not take part, or nested
            continue
        pieces += (value[done:start], mask)
        done = end
    return done


class _NextTrigger(Generic[AnyStr]):
    """Where the next trigger begins in a lower-cased copy of the input, at or after a position.
    Positions asked for only grow, so each trigger's text is searched once over the input."""

    def __init__(self, lowered: AnyStr, needles: Sequence[AnyStr]) -> None:
        self._lowered: AnyStr = lowered
        self._needles: list[AnyStr] = list(needles)
        self._found = [-1] * len(needles)  # the last position found, len(lowered) for none

    def __call__(self, pos: int) -> int:
        size = len(self._lowered)
        for index, at in enumerate(self._found):
            if at < pos:
                at = self._lowered.find(self._needles[index], pos)
                self._found[index] = at = size if at < 0 else at
        return min(self._found, default=size)


def _lower_text(value: str) -> str:
    """``value`` lower-cased, one character for one (U+0130 is the one that lowers to two)."""
    lowered = value.lower()
    return lowered if len(lowered) == len(value) else value.replace("\u0130", "i").lower()


def _sub(
    pattern: re.Pattern[AnyStr],
    value: AnyStr,
    mask: AnyStr,
    window: int,
    next_trigger: _NextTrigger[AnyStr] | None = None,
    subject: AnyStr | None = None,
) -> AnyStr:
    """``pattern.sub`` masking its matches in ``value``, matched ``window`` at a time; with
    ``next_trigger``, only the windows around a trigger are matched. ``subject``: what the
    pattern is matched against when not ``value`` itself (its lower-cased copy)."""
    size = len(value)
    if next_trigger is None and size <= window and subject is None:
        return pattern.sub(lambda m: _mask_match(m, mask, value), value)
    subject = value if subject is None else subject
    pieces: list[AnyStr] = []
    done = 0  # value[:done] is in pieces
    scanned = 0  # where the last match ended: the next one starts at or after it
    start = 0  # the window is value[start:start + window]
    while True:
        if next_trigger is not None:
            found = next_trigger(start)
            if found >= size:
                break
            start = max(start, found - OVERLAP)  # a match begins less than OVERLAP before it
        end = min(start + window, size)
        restart: int | None = None
        # pos/endpos rather than a slice: no copy, and a lookbehind or \b at the window's
        # start still sees the character before it.
        for match in pattern.finditer(subject, start, end):
            if end < size and match.start() >= end - OVERLAP:
                break  # what follows the window may change it: the next window starts here
            if end < size and match.end() == end and match.start() > start:
                restart = match.start()  # it may go on past the window: match it again
                break
            done = _mask_into(pieces, match, mask, value, done)
            scanned = match.end()
        if end == size:
            break
        start = max(end - OVERLAP if restart is None else restart, scanned)
    if not pieces:
        return value
    pieces.append(value[done:])
    return mask[:0].join(pieces)


class Redactor:
    """Masks configured patterns in text (run rows) and in bytes (live output, the archive).

    Bytes are matched with the same patterns compiled for bytes: ``\\w``, ``\\s`` and ``\\b``
    are ASCII there, which is what secrets are made of; the rest of the output keeps its
    original bytes, invalid UTF-8 included.
    """

    def __init__(self, patterns: Sequence[str], mask: str = MASK, window: int = WINDOW) -> None:
        if window <= OVERLAP:
            raise ValueError(f"the window must be longer than the overlap ({OVERLAP})")
        self.patterns = tuple(patterns)
        self._window = window
        self._mask = mask
        self._mask_bytes = mask.encode()
        # (pattern, triggers, matched against the lower-cased input)
        self._text: list[tuple[re.Pattern[str], tuple[str, ...], bool]] = []
        self._bytes: list[tuple[re.Pattern[bytes], tuple[bytes, ...], bool]] = []
        for pattern in self.patterns:
            triggers = _TRIGGERS.get(pattern, ())
            # A default pattern that ignores case is matched, case-sensitive, against the
            # lower-cased input (its literals are lower-case): the engine then skips positions
            # that cannot start a match instead of trying each one, about twice as fast.
            lowered = bool(triggers) and pattern.startswith("(?i)")
            source = pattern.removeprefix("(?i)") if lowered else pattern
            try:
                self._text.append((re.compile(source), triggers, lowered))
                self._bytes.append(
                    (re.compile(source.encode()), tuple(t.encode() for t in triggers), lowered)
                )
            except (re.error, UnicodeEncodeError) as e:
                raise InvalidInput(
                    f"redact pattern {pattern!r} is not a usable regular expression: {e}"
                ) from e

    @property
    def enabled(self) -> bool:
        return bool(self._text)

    def text(self, value: str) -> str:
        return self._apply(self._text, value, self._mask, _lower_text)

    def data(self, value: bytes) -> bytes:
        # Patterns on bytes ignore the case of ASCII letters only, as bytes.lower() does.
        return self._apply(self._bytes, value, self._mask_bytes, bytes.lower)

    def _apply(
        self,
        compiled: list[tuple[re.Pattern[AnyStr], tuple[AnyStr, ...], bool]],
        value: AnyStr,
        mask: AnyStr,
        lower: Callable[[AnyStr], AnyStr],
    ) -> AnyStr:
        lowered: AnyStr | None = None  # of ``value``, shared by the patterns until one masks
        for pattern, triggers, on_lowered in compiled:
            next_trigger = None
            if triggers:
                lowered = lower(value) if lowered is None else lowered
                next_trigger = _NextTrigger(lowered, triggers)
            subject = lowered if on_lowered else None
            redacted = _sub(pattern, value, mask, self._window, next_trigger, subject)
            if redacted is not value:
                value, lowered = redacted, None
        return value


class LineBuffer:
    """The part of one output stream after its last line break, held back until the line is
    complete, so that a secret split across two chunks is still matched as one line.

    A line longer than ``limit`` bytes is let through as it is (output with no line breaks at
    all must not be held forever); the caller also lets a held part through after a short
    while (see ``engine.ingest``) and when the run ends.
    """

    def __init__(self, limit: int = 8192) -> None:
        self._limit = limit
        self._held = bytearray()

    def __bool__(self) -> bool:
        return bool(self._held)

    def feed(self, data: bytes) -> bytes:
        """The complete lines of what was held plus ``data``; keeps the rest."""
        self._held += data
        cut = max(self._held.rfind(b"\n"), self._held.rfind(b"\r")) + 1
        if len(self._held) - cut > self._limit:
            cut = len(self._held)
        ready = bytes(self._held[:cut])
        del self._held[:cut]
        return ready

    def flush(self) -> bytes:
        """Everything held, complete line or not."""
        ready = bytes(self._held)
        self._held.clear()
        return ready

    def snapshot(self) -> bytes:
        return bytes(self._held)

    def restore(self, held: bytes) -> None:
        self._held[:] = held
