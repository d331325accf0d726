"""Text from outside (file names, tensor names, HTTP reasons) made safe to print.

A file name may hold a newline, a tab or a terminal escape sequence; printed
raw it would split a one-line error in two, break `classify`'s one line per
image, or drive the user's terminal. `printable` shows such characters as
escapes, as `ls` and `git` quote names.
"""

from __future__ import annotations

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0"}


def printable(text) -> str:
    """`text` (any object: it is turned into `str` first) with every
    character that is not printable shown as an escape: `\\n`, `\\t`, `\\r`,
    `\\x1b`, `\\u200b`, ... Bytes that were not valid in the file system's
    encoding (`os.fsdecode`'s surrogate escapes) show as the byte, `\\xff`.

        printable("a\\tb\\x1b[31m")   # 'a\\\\tb\\\\x1b[31m'
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _NAMED:
        return _NAMED[ch]
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode
        return f"\\x{code - 0xDC00:02x}"
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
