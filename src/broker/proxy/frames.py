"""Cheap peeks into kernel WebSocket messages, for the hot path.

The bridge never decodes a message. These helpers look only where the
answer is: the channel and header parts of ``v1.kernel.websocket.jupyter.org``
binary frames (located through the offset table), or a substring search in
JSON text frames. Kernel output payloads are never parsed.

v1 binary layout: u64 little-endian ``n`` (number of offsets), then ``n``
u64 offsets; part 0 (offsets[0]..offsets[1]) is the channel name, part 1 the
header JSON, then parent header, metadata, content and buffers.
"""

from __future__ import annotations

_CHANNELS = {"shell", "iopub", "stdin", "control"}
_BIN_CHANNELS = {c.encode(): c for c in _CHANNELS}
_KEY = '"channel"'


def _part(raw: bytes, index: int) -> bytes:
    """Part ``index`` of a v1 frame, or b"" when the frame is malformed."""
    if len(raw) < 8 * (index + 3):
        return b""
    count = int.from_bytes(raw[:8], "little")
    if count < index + 2 or count > 1024:
        return b""
    at = 8 * (index + 1)
    start = int.from_bytes(raw[at:at + 8], "little")
    end = int.from_bytes(raw[at + 8:at + 16], "little")
    return raw[start:end] if start <= end <= len(raw) else b""


def binary_channel(raw: bytes) -> str:
    """The channel of a v1 frame (``other`` when unknown)."""
    return _BIN_CHANNELS.get(_part(raw, 0), "other")


def binary_header_has(raw: bytes, needle: bytes) -> bool:
    """Whether the header part of a v1 frame contains ``needle``."""
    return needle in _part(raw, 1)


def text_channel(text: str, from_end: bool) -> str:
    """The top-level ``channel`` of a JSON frame, by substring search.

    jupyter_server adds ``channel`` last to the messages it sends, so kernel
    output is searched from the end (a few bytes, however large the output);
    clients put it anywhere, but their messages are small.
    """
    at = text.rfind(_KEY) if from_end else text.find(_KEY)
    if at < 0:
        return "other"
    start = text.find('"', at + len(_KEY))
    end = text.find('"', start + 1) if start >= 0 else -1
    if end < 0 or end - start > 12:
        return "other"
    value = text[start + 1:end]
    return value if value in _CHANNELS else "other"
