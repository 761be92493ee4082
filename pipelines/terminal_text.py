"""Text from others, made safe to print on a reviewer's terminal.

Plan sources, registry records (``published_by``) and the origins recorded with an
artifact request come from researchers or the coordinator. Printed raw, a carriage return,
an ANSI escape (``ESC[1A ESC[2K`` moves up and erases a line) or a bidirectional override
can make a pending artifact read "approved" or hide a line of a plan from the staff who
approve it. `escape_controls` shows every such character visibly instead (``\\x1b``,
``\\r``, ``\\u202e``); `has_controls` says whether a text holds any (``plans show`` warns).

Escaped: C0 controls (U+0000-U+001F, ESC and CR included), DEL, C1 controls
(U+0080-U+009F), the bidi embeddings, overrides and isolates (U+202A-U+202E,
U+2066-U+2069), the marks U+200E/U+200F/U+061C, the zero-width characters U+200B-U+200D,
U+2060, U+FEFF, and the line/paragraph separators U+2028/U+2029. A tab is kept where the
caller allows it (source code). Standard library only (pipelines code imports this).
"""

from __future__ import annotations

import re

__all__ = ["escape_controls", "has_controls"]

_UNSAFE = "\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060\u2066-\u2069\ufeff"
_UNSAFE_RE = re.compile(f"[{_UNSAFE}]")
_UNSAFE_OR_TAB_RE = re.compile(f"[\t{_UNSAFE}]")


def _visible(match: re.Match) -> str:
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
    """Whether `text` holds any character `escape_controls` escapes (tabs counted unless allowed)."""
    s = "" if text is None else str(text)
    return bool((_UNSAFE_RE if allow_tabs else _UNSAFE_OR_TAB_RE).search(s))
