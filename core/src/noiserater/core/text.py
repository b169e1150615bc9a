"""Client-supplied values quoted in error messages, cut to a bounded length: an error message must never
grow with its input (a 10 KB name would otherwise come back whole, and can overflow gRPC's metadata limit)."""

from __future__ import annotations

from collections.abc import Sequence

QUOTE_LIMIT = 64  # characters of a quoted value kept before the ellipsis


def clip(value: object, limit: int = QUOTE_LIMIT) -> str:
    """repr(value) (one line: newlines and control characters escaped), cut to `limit` characters with an
    ellipsis and the original length when longer."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, bytes):
        return f"{text[:limit]}... ({len(value)} bytes)"
    return f"{text[:limit]}... ({len(value) if isinstance(value, str) else len(text)} chars)"


def clip_shape(shape: Sequence[int], limit: int = QUOTE_LIMIT) -> str:
    """A shape as `[a, b, ...]`, cut to `limit` characters with the number of dimensions when longer."""
    text = str(list(shape))
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(shape)} dims)"
