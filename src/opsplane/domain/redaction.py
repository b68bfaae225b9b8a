"""Log redaction (seed 003's "log masking"): secrets in host output are masked before the output
is stored, archived or streamed.

Patterns are regular expressions. A pattern without groups masks its whole match; a pattern with
groups masks only the groups, so ``password=hunter2`` becomes ``password=[REDACTED]`` and the
reader still sees which setting was there. Live output is matched line by line (see
``LineBuffer``): a pattern never spans a line break there.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import AnyStr

from opsplane.domain.errors import InvalidInput

MASK = "[REDACTED]"

DEFAULT_REDACT_PATTERNS: tuple[str, ...] = (
    # key=value or key: value (also JSON and YAML) where the key names a secret: the value.
    r"(?i)[\w.-]*(?:password|passwd|secret|token|api[_-]?key)[\w.-]*[\"']?[ \t]*[=:][ \t]*"
    r"[\"']?([^\s\"',;&]+)",
    # HTTP credentials: Authorization: Bearer …, Basic …, and a bare bearer token.
    r"(?i)\bauthorization[\"']?[ \t]*[=:][ \t]*(?:(?:bearer|basic|token|digest)[ \t]+)?"
    r"([^\s\"',;]+)",
    r"(?i)\bbearer[ \t]+([A-Za-z0-9._~+/-]{8,}=*)",
    # AWS access key ids (long-term AKIA…, temporary ASIA…).
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b",
    # A password in a URL: scheme://user:password@host.
    r"(?i)\b[a-z][a-z0-9+.-]*://[^/\s:@]+:([^/\s@]+)@",
)


def _mask_match(match: re.Match[AnyStr], mask: AnyStr) -> AnyStr:
    whole = match.group(0)
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


class Redactor:
    """Masks configured patterns in text (run rows) and in bytes (live output, the archive).

    Bytes are matched with the same patterns compiled for bytes: ``\\w``, ``\\s`` and ``\\b``
    are ASCII there, which is what secrets are made of; the rest of the output keeps its
    original bytes, invalid UTF-8 included.
    """

    def __init__(self, patterns: Sequence[str], mask: str = MASK) -> None:
        self.patterns = tuple(patterns)
        self._mask = mask
        self._mask_bytes = mask.encode()
        self._text: list[re.Pattern[str]] = []
        self._bytes: list[re.Pattern[bytes]] = []
        for pattern in self.patterns:
            try:
                self._text.append(re.compile(pattern))
                self._bytes.append(re.compile(pattern.encode()))
            except (re.error, UnicodeEncodeError) as e:
                raise InvalidInput(
                    f"redact pattern {pattern!r} is not a usable regular expression: {e}"
                ) from e

    @property
    def enabled(self) -> bool:
        return bool(self._text)

    def text(self, value: str) -> str:
        for pattern in self._text:
            value = pattern.sub(lambda m: _mask_match(m, self._mask), value)
        return value

    def data(self, value: bytes) -> bytes:
        for pattern in self._bytes:
            value = pattern.sub(lambda m: _mask_match(m, self._mask_bytes), value)
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
