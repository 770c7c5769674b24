"""Source layouts: how a dataset's records are laid out, beside the container ``format``
(``data.sources[].layout``; docs/interfaces.md "Source layouts").

``llava`` (the default) is read by ``actors.data.rows`` itself; every other layout is one module
here and one line in :data:`LAYOUTS`. ``actors.data.layouts.base`` says what a layout yields.
"""

from __future__ import annotations

from typing import Any, Optional

from actors.data.layouts.base import Context, Layout, Reading, Rejected, Sample
from actors.data.layouts.coco_captions import CocoCaptions
from actors.data.layouts.docvqa import DocVqa
from actors.data.layouts.messages import Messages
from actors.data.layouts.ocrvqa import OcrVqa
from actors.data.layouts.refcoco import RefCoco
from actors.data.layouts.sharegpt import ShareGPT
from actors.data.layouts.textvqa import TextVqa
from actors.data.layouts.ultrachat import UltraChat
from actors.data.layouts.vg_regions import VgRegions
from actors.data.layouts.vqa import Vqa

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    ShareGPT(), Messages(), UltraChat(),  # conversations
    CocoCaptions(), Vqa(), TextVqa(), OcrVqa(), DocVqa(),  # annotation files: captions, questions
    RefCoco(), VgRegions(),  # regions: boxes
)}
NAMES = ("llava", *LAYOUTS)

__all__ = ["LAYOUTS", "NAMES", "Context", "Layout", "Reading", "Rejected", "Sample", "get", "load_side"]


def get(name: str) -> Layout:
    """The layout called ``name`` (not ``llava``: ``actors.data.rows`` reads that one)."""
    if name not in LAYOUTS:
        raise ValueError(f"layout must be one of {NAMES}, got {name!r}")
    return LAYOUTS[name]


_SIDE: dict[str, Any] = {}  # the last annotations file read in this process (they can be large)


def load_side(filesystem: Optional[Any], reading: Reading) -> Any:
    """The parsed ``annotations`` file of ``reading`` (None without one), read once per process.

    A file that does not parse stops the stage with an error naming it: every record of the
    source depends on it."""
    path = reading.annotations
    if path is None or filesystem is None:
        return None
    if path not in _SIDE:
        with filesystem.open_input_file(path) as f:
            data = f.read()
        try:
            side = get(reading.layout).decode(data)
        except Exception as err:  # noqa: BLE001 - named for the user
            from models.errors import UserError

            raise UserError(f"annotations file {path} of layout {reading.layout!r} does not parse: "
                            f"{type(err).__name__}: {err}") from None
        _SIDE.clear()
        _SIDE[path] = side
    return _SIDE[path]
