"""Text from others (plan sources, registry records, artifact origins), made safe to print on a reviewer's terminal.

`escape_controls` shows control, bidi and zero-width characters as visible escapes (``\\x1b``, ``\\r``,
``\\u202e``); `has_controls` says whether a text holds any. Which characters, and why: docs/design/site-boundary.md.
Standard library only (pipelines code imports this).
"""

from __future__ import annotations

import re

__all__ = ["escape_controls", "has_controls"]

_UNSAFE = "\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060\u2066-\u2069\ufeff"
_UNSAFE_RE = re.compile(f"[{_UNSAFE}]")
_UNSAFE_OR_TAB_RE = re.compile(f"[\t{_UNSAFE}]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def escape_controls(text: object, keep_tabs: bool = False, limit: int | None = None) -> str:
    """`text` (any object, as ``str``) with every control or bidi character shown as an escape.

    Args:
        text: what to print; None becomes "".
        keep_tabs: keep tab characters as they are (source code); escaped otherwise.
        limit: cut the result to this many characters (an escape is never cut in half),
            marking the cut with "…".

    Returns:
        Printable text: no character in it moves the cursor, erases or reorders anything.
    """
    s = "" if text is None else str(text)
    out = (_UNSAFE_RE if keep_tabs else _UNSAFE_OR_TAB_RE).sub(_visible, s)
    if limit is not None and len(out) > limit:
        cut = out[:limit]
        tail = cut.rfind("\\")  # do not leave half an escape behind
        if tail >= 0 and tail > limit - 6:
            cut = cut[:tail]
        out = cut + "…"
    return out


def has_controls(text: object, allow_tabs: bool = True) -> bool:
    """Whether `text` holds any character `escape_controls` escapes.

    Args:
        text: what would be printed; None counts as "".
        allow_tabs: tab characters are fine (not counted).

    Returns:
        True when `text` holds a control, bidi or zero-width character.
    """
    s = "" if text is None else str(text)
    return bool((_UNSAFE_RE if allow_tabs else _UNSAFE_OR_TAB_RE).search(s))
