"""Bounded capture of a process's output: the head and the tail of each stream.

A command may print gigabytes; what is stored with its result must not. The beginning usually
says what the command set out to do and the end says how it finished, so both are kept and
only the middle is dropped.
"""

from __future__ import annotations

from opsplane.domain.errors import InvalidInput

DEFAULT_CAP = 64 * 1024

# A UTF-8 character is at most 4 bytes, so a cut can strand at most 3 continuation bytes.
_MAX_STRANDED_CONTINUATION = 3


class _StreamBuffer:
    __slots__ = ("head", "tail", "total")

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    @property
    def dropped(self) -> int:
        return self.total - len(self.head) - len(self.tail)


class OutputCapture:
    """Keeps the first and the last ``cap`` bytes of every stream fed to it.

    Memory stays at about ``2 * cap`` bytes per stream however much output arrives. Streams
    are named freely (the process runner uses ``"stdout"`` and ``"stderr"``); a stream that
    was never fed reads as empty.
    """

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        if cap <= 0:
            raise InvalidInput(f"output cap must be a positive number of bytes, got {cap}")
        self._cap = cap
        self._buffers: dict[str, _StreamBuffer] = {}

    @property
    def cap(self) -> int:
        """How many bytes are kept at each end of each stream."""
        return self._cap

    def feed(self, stream: str, data: bytes) -> None:
        """Record ``data`` as the next bytes written to ``stream``."""
        if not data:
            return
        buf = self._buffers.get(stream)
        if buf is None:
            buf = self._buffers[stream] = _StreamBuffer()
        buf.total += len(data)
        view = memoryview(data)
        room = self._cap - len(buf.head)
        if room > 0:
            buf.head += view[:room]
            view = view[room:]
        if not view:
            return
        if len(view) >= self._cap:
            buf.tail[:] = view[-self._cap :]
            return
        buf.tail += view
        excess = len(buf.tail) - self._cap
        if excess > 0:
            # Deleting from the front of a bytearray only advances its start offset in
            # CPython, so this stays cheap even when fed many small chunks.
            del buf.tail[:excess]

    def text(self, stream: str) -> str:
        """The captured output of ``stream`` as text, with a marker where bytes were dropped.

        Decoded as UTF-8 with invalid bytes replaced, so arbitrary binary output is safe.
        """
        buf = self._buffers.get(stream)
        if buf is None:
            return ""
        dropped = buf.dropped
        if dropped == 0:
            return (bytes(buf.head) + bytes(buf.tail)).decode("utf-8", errors="replace")
        tail = bytes(buf.tail)
        # The cut usually lands inside a multi-byte character; its leftover continuation
        # bytes would only decode as replacement characters, so count them as dropped.
        stranded = 0
        while (
            stranded < min(_MAX_STRANDED_CONTINUATION, len(tail)) and tail[stranded] & 0xC0 == 0x80
        ):
            stranded += 1
        # Likewise the head's last character, begun but not finished within the head.
        head = bytes(buf.head)
        kept = _complete_prefix(head)
        return (
            head[:kept].decode("utf-8", errors="replace")
            + f"\n... [{dropped + stranded + len(head) - kept} bytes truncated] ...\n"
            + tail[stranded:].decode("utf-8", errors="replace")
        )

    @property
    def truncated(self) -> bool:
        """Whether any stream lost bytes between its head and its tail."""
        return any(buf.dropped > 0 for buf in self._buffers.values())

    def total_bytes(self, stream: str) -> int:
        """How many bytes were fed to ``stream`` in all, kept or not."""
        buf = self._buffers.get(stream)
        return 0 if buf is None else buf.total


def _complete_prefix(data: bytes) -> int:
    """The length of ``data`` less a UTF-8 character begun in its last 3 bytes and not
    finished (invalid bytes are left to the decoder)."""
    for back in range(1, min(_MAX_STRANDED_CONTINUATION, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 == 0x80:
            continue  # a continuation byte: its lead is further back
        if byte >= 0xF0:
            needed = 4
        elif byte >= 0xE0:
            needed = 3
        elif byte >= 0xC0:
            needed = 2
        else:
            return len(data)  # ASCII: nothing begun
        return len(data) - back if back < needed else len(data)
    return len(data)
