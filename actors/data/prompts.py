"""Per-task prompt templates: how a layout that holds no question text (captions, VQA, regions)
asks its question, as the LLaVA-1.5 / SPHINX training data phrase it.

A source picks its kind with ``data.sources[].prompt`` (default: its layout's, see
``actors.data.layouts``); each row takes ONE template of the kind, chosen by a hash of
``data.prompt_seed``, the source and the row's id, so a re-run asks the same question and the
manifest can list what a source was asked with (:func:`templates_of`).

Kinds and their fields (``{question}``, ``{options}``, ``{phrase}``, ``{box}``):

- ``short_answer``: ``{question}\\nAnswer the question using a single word or phrase.``
  (LLaVA-1.5's VQAv2 / GQA / OKVQA / OCR-VQA / TextVQA lines, the same as the eval prompts);
- ``multiple_choice``: ``{question}\\n{options}\\nAnswer with the option's letter from the given
  choices directly.`` with ``options`` = ``A. first\\nB. second`` (A-OKVQA, ScienceQA);
- ``caption``: LLaVA's brief-description instructions (its pretraining captions), e.g.
  ``Describe the image concisely.``;
- ``referring``: ``Please provide the bounding box coordinate of the region this sentence
  describes: {phrase}`` (LLaVA-1.5's RefCOCO lines; the answer is the box);
- ``region_caption``: ``Please provide a short description for this region: {box}`` (the answer
  is the phrase);
- ``grounded_caption``: a caption whose objects carry their boxes (``<p>dog</p>[0.10,...]``);
- ``ocr``: ``{question}`` with an instruction to read the text (TextVQA / DocVQA / OCR-VQA
  style questions), or a request to read all the text when there is no question.

    >>> render("short_answer", "k", question="What colour is the bus?")
    'What colour is the bus?\\nAnswer the question using a single word or phrase.'
    >>> options_text(["red", "blue"])
    'A. red\\nB. blue'
"""

from __future__ import annotations

import hashlib
import string

SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."

TEMPLATES: dict[str, tuple[str, ...]] = {
    "short_answer": ("{question}\n" + SHORT_INSTRUCTION,),
    "multiple_choice": ("{question}\n{options}\n" + MCQ_INSTRUCTION,),
    "caption": (  # LLaVA's brief-description list
        "Describe the image concisely.",
        "Provide a brief description of the given image.",
        "Offer a succinct explanation of the picture presented.",
        "Summarize the visual content of the image.",
        "Give a short and clear explanation of the subsequent image.",
        "Share a concise interpretation of the image provided.",
        "Present a compact description of the photo's key features.",
        "Relay a brief, clear account of the picture shown.",
        "Render a clear and concise summary of the photo.",
        "Write a terse but informative summary of the picture.",
        "Create a compact narrative representing the image presented.",
    ),
    "referring": ("Please provide the bounding box coordinate of the region this sentence describes: {phrase}",),
    "region_caption": ("Please provide a short description for this region: {box}",),
    "grounded_caption": (
        "Describe the image concisely. Include the bounding box for each mentioned object.",
        "Provide a one-sentence caption for the provided image, with the bounding box of each object it names.",
    ),
    "ocr": (
        "{question}\nRead the text in the image to answer. " + SHORT_INSTRUCTION,
    ),
}
# ``ocr`` without a question: read everything
READ_ALL = ("What is written in the image?", "Please read the text in this image.")

KINDS = tuple(TEMPLATES)


def pick(kind: str, key: str, seed: int = 0, templates: tuple[str, ...] = ()) -> str:
    """The template of ``kind`` for the row keyed ``key`` (``source:id``): deterministic in
    ``seed`` and ``key``."""
    choices = templates or TEMPLATES[kind]
    h = int.from_bytes(hashlib.sha1(f"{seed}:{key}".encode()).digest()[:8], "big")
    return choices[h % len(choices)]


def render(kind: str, key: str, seed: int = 0, **fields: str) -> str:
    """The human turn's text for one row (``<image>`` not included)."""
    if kind not in TEMPLATES:
        raise ValueError(f"prompt kind must be one of {KINDS}, got {kind!r}")
    if kind == "ocr" and not fields.get("question"):
        return pick(kind, key, seed, READ_ALL)
    return pick(kind, key, seed).format(**{k: v for k, v in fields.items() if v is not None})


def options_text(options: list[str]) -> str:
    """``["red", "blue"]`` -> ``A. red\\nB. blue`` (at most 26 options)."""
    return "\n".join(f"{letter}. {o}" for letter, o in zip(string.ascii_uppercase, options))


def letter(index: int) -> str:
    return string.ascii_uppercase[index]


def templates_of(kind: str) -> tuple[str, ...]:
    """Every template a row of ``kind`` may get (what the manifest lists per source)."""
    return TEMPLATES[kind] + (READ_ALL if kind == "ocr" else ())
