"""What every source layout shares: how it is configured (:class:`Reading`), what it yields
(:class:`Sample` or :class:`Rejected`) and the context it reads with (:class:`Context`).

A layout turns the records of a public dataset, as published, into LLaVA turns
(``[{"from": "system"?}, {"from": "human"}, {"from": "gpt"}, ...]``) plus image references and,
for region data, pixel boxes. ``actors.data.rows`` makes raw rows of them (resolving images,
counting ratio copies) and quarantines every :class:`Rejected` with its reason.

Two kinds (``Layout.document``):

- record layouts (``sharegpt``, ``messages``, ``ultrachat``): ``read`` gets one record of a JSON
  array, a JSONL line or a Parquet row;
- document layouts (``coco_captions``, ``vqa``, ``textvqa``, ``ocrvqa``, ``docvqa``, ``refcoco``,
  ``vg_regions``): ``read`` gets the whole file (one JSON document) and yields many samples;
  ``Context.side`` holds the parsed ``data.sources[].annotations`` file when the layout has one.

Boxes: a sample's ``boxes`` are ``(image_index, x1, y1, x2, y2)`` in pixels of the original image;
its text names them by slot, ``<box:0>``, ``<box:1>``... The tiler replaces each slot with the box
in the model's canvas frame (``actors.data.regions``), once it knows the image's size and the
flavour's padding.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from actors.data import prompts

SYSTEM, HUMAN, GPT = "system", "human", "gpt"
IMAGE = "<image>"


@dataclass(frozen=True)
class Reading:
    """How one source's records are read (small and picklable: it travels to the parse tasks).

    ``columns``: the layout's names -> the dataset's own (``Layout.columns`` lists the names and
    their defaults); ``prompt``: the prompt kind (None: the layout's); ``seed``:
    ``data.prompt_seed``; ``annotations``: the side file's filesystem path, if any."""

    layout: str = "llava"
    columns: tuple[tuple[str, str], ...] = ()
    prompt: Optional[str] = None
    seed: int = 0
    annotations: Optional[str] = None


@dataclass
class Sample:
    """One good record: LLaVA turns, image references (relative to ``image_root``, or bytes) and
    pixel boxes named by ``<box:k>`` slots in the text."""

    id: str
    conversations: list[dict]
    images: list[Union[str, bytes]] = field(default_factory=list)
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)
    left_out: bool = False  # a record the layout leaves out by design (counted as subsampled_out)


@dataclass
class Rejected:
    """One bad record: quarantined with ``reason`` and ``detail`` (``raw``: what it was)."""

    id: str
    reason: str
    detail: str
    raw: Any = None


Item = Union[Sample, Rejected]


class Context:
    """What ``Layout.read`` reads with: the source's name, its columns, prompt and side file."""

    def __init__(self, source: str, layout: "Layout", reading: Reading, side: Any = None, prefix: str = ""):
        self.source, self.layout, self.reading, self.side = source, layout, reading, side
        self.prefix = prefix or source  # ``source`` or ``source:file_no``: ids of records without one
        self._names = {**layout.columns, **dict(reading.columns)}
        self.prompt = reading.prompt or layout.prompt

    def fallback(self, index: int) -> str:
        """The id of record ``index`` when it has none (``actors.data.rows``' rule)."""
        return f"{self.prefix}:{index}"

    def col(self, name: str) -> str:
        """The dataset's name for the layout's ``name``."""
        return self._names[name]

    def ask(self, key: str, kind: Optional[str] = None, **fields: Any) -> str:
        """The human text of prompt ``kind`` (default: the source's) for the row ``key``."""
        return prompts.render(kind or self.prompt, f"{self.source}:{key}", self.reading.seed, **fields)


class Layout:
    """One published layout. Subclasses set the class attributes and implement :meth:`read`."""

    name: str = ""
    document: bool = False  # True: ``read`` gets the whole file
    prompt: Optional[str] = None  # the default prompt kind (None: the records hold their questions)
    prompts: tuple[str, ...] = ()  # the kinds data.sources[].prompt may pick (default: the prompt alone)
    columns: dict[str, str] = {}  # the layout's names -> the published names (what ``columns`` remaps)
    annotations: str = "none"  # the side file: "none" | "optional" | "required"

    def prompt_kinds(self) -> tuple[str, ...]:
        return self.prompts or ((self.prompt,) if self.prompt else ())

    def decode(self, data: bytes) -> Any:
        """A document layout's file -> the parsed document (JSON; ``refcoco`` also reads pickles)."""
        return json.loads(data)

    def read(self, data: Any, index: int, ctx: Context) -> Iterator[Item]:
        """The samples of one record (record layouts) or of the whole document."""
        raise NotImplementedError


def turns(question: str, answer: str, image: bool = True) -> list[dict]:
    """One question and its answer as LLaVA turns (``<image>\\n`` before the question)."""
    return [{"from": HUMAN, "value": (IMAGE + "\n" if image else "") + question}, {"from": GPT, "value": answer}]


def most_common(answers: list[str]) -> Optional[str]:
    """The most frequent answer (the first seen among ties); None when there is none.

        >>> most_common(["2", "two", "2", "3"])
        '2'
    """
    counts: dict[str, int] = {}
    for a in answers:
        if isinstance(a, str) and a.strip():
            counts[a.strip()] = counts.get(a.strip(), 0) + 1
    return max(counts, key=counts.get) if counts else None


def as_id(value: Any) -> Optional[str]:
    """A published id (string or integer) as a string; None when it is neither."""
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        return None
    return str(value)
