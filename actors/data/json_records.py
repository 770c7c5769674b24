"""Reading JSON that may be hostile, record by record: what ``actors.data.rows`` needs to lose
only the records that are bad (docs/security.md).

- :func:`array_items` yields the records of a JSON array; a record that does not parse becomes a
  :class:`Broken` of its own when its end can be found (brackets and strings alone), else the rest
  of the file becomes ONE ``Broken`` (``rest`` = True). A file that parses whole costs one
  ``json.loads``.
- :func:`quarantine_reason` names the reason for what reading one record raised.

    >>> [type(x).__name__ for x in array_items(b'[{"a": 1}, {"b": 1e}, {"c": [')]
    ['dict', 'Broken', 'Broken']
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterator, Optional, Union


def quarantine_reason(err: BaseException) -> str:
    """``too_deep`` (RecursionError), ``invalid_text`` (not UTF-8 / lone surrogate),
    ``invalid_number`` (an integer over Python's 4300-digit limit), ``invalid_json`` (other parse
    errors), else ``unexpected_error``."""
    if isinstance(err, RecursionError):
        return "too_deep"
    if isinstance(err, UnicodeError):
        return "invalid_text"
    if isinstance(err, json.JSONDecodeError):
        return "invalid_json"
    if isinstance(err, ValueError) and "integer string conversion" in str(err):
        return "invalid_number"
    if isinstance(err, ValueError):
        return "invalid_json"
    return "unexpected_error"


def error_detail(where: str, err: BaseException) -> str:
    """``where: ExceptionType: message`` (the type is what ``unexpected_error`` rows are sorted by)."""
    if isinstance(err, RecursionError):
        return f"{where}: nested deeper than this reader allows ({err})"
    return f"{where}: {type(err).__name__}: {err}"


class Broken:
    """A part of a JSON array that does not parse: one record, or (``rest``) the rest of the file."""

    def __init__(self, reason: str, detail: str, text: str, rest: bool):
        self.reason, self.detail, self.text, self.rest = reason, detail, text, rest


_UNREAD = object()
_WS = re.compile(r"[ \t\n\r]*")
_SCALAR_END = re.compile(r"[,\]]")
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]')  # strings and brackets: finds a value's end


def array_items(data: bytes) -> Iterator[Union[Any, "Broken"]]:
    """The records of a JSON array (a :class:`Broken` for each part that does not parse), in order;
    a file holding one object yields it alone."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:  # keep the bad bytes as lone surrogates: only their records are lost
        text = data.decode("utf-8", "surrogateescape")
    try:
        whole = json.loads(text)
    except Exception:  # noqa: BLE001 - read it record by record below
        whole = _UNREAD
    if whole is not _UNREAD:
        yield from whole if isinstance(whole, list) else [whole]
        return
    decoder = json.JSONDecoder()
    at = _WS.match(text, 0).end()
    if text[at:at + 1] != "[":
        yield Broken("invalid_json", "not a JSON array or object", text, rest=True)
        return
    at = _WS.match(text, at + 1).end()
    while at < len(text) and text[at] != "]":
        try:
            item, end = decoder.raw_decode(text, at)
            yield item
        except Exception as err:  # noqa: BLE001 - this record is lost; find where it ends
            end = _value_end(text, at)
            where = f"record at byte {len(text[:at].encode('utf-8', 'surrogateescape'))} " \
                    f"(line {text.count(chr(10), 0, at) + 1})"
            if end is None:
                yield Broken("invalid_json", f"unreadable from the {where} to the end of the file: "
                             f"{type(err).__name__}: {err}", text[at:], rest=True)
                return
            yield Broken(quarantine_reason(err), error_detail(where, err), text[at:end], rest=False)
        at = _WS.match(text, end).end()
        if text[at:at + 1] == ",":
            at = _WS.match(text, at + 1).end()
        elif text[at:at + 1] != "]":
            yield Broken("invalid_json", f"expected ',' or ']' at byte {at}: the rest of the file is unreadable",
                         text[at:], rest=True)
            return


def _value_end(text: str, at: int) -> Optional[int]:
    """Where the JSON value at ``at`` ends (after its closing bracket or string), by brackets and
    strings alone; None when the text ends first. A scalar ends at the next ``,`` or ``]``."""
    if text[at] not in "[{\"":
        m = _SCALAR_END.search(text, at)
        return m.start() if m else None
    depth = 0
    for m in _TOKEN.finditer(text, at):
        tok = m.group()
        if tok[0] == '"':
            if depth == 0:
                return m.end()
            continue
        depth += 1 if tok in "[{" else -1
        if depth == 0:
            return m.end()
    return None


