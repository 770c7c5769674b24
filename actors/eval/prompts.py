"""Per-benchmark prompts, phrased as the LLaVA / SPHINX evaluations phrase them, as OpenAI messages.

The output is one user message: an ``{"type": "image", "index": i}`` part per image, then the text
starting with a newline (LLaVA's ``<image>\\n{question}``); ``models.conversation.build_prompt``
turns it into the SPHINX template serving uses. Styles:

- ``mcq`` (MMBench, SEED, AI2D, ScienceQA-IMG as VLMEvalKit TSVs; LLaVA
  ``llava/eval/model_vqa_mmbench.py`` with ``--single-pred-prompt``)::

      {hint}\\n{question}\\nA. {A}\\nB. {B}\\nAnswer with the option's letter from the given choices directly.

  (the hint line only when there is one);
- ``short`` (VQAv2, TextVQA, GQA, DocVQA, ChartQA, OCR-VQA, POPE, MME; LLaMA2-Accessory
  ``accessory/eval_mm/annotations/annotation_config.json`` ``"{}\\nAnswer the question using a
  single word or phrase."``, = LLaVA's question files): ``{question}\\nAnswer the question using a
  single word or phrase.``;
- ``grounding`` (RefCOCO/+/g, the same config's ``miou0.5`` prompt): ``Please provide the bounding
  box coordinate of the region this sentence describes: {question}.``;
- ``caption`` (lmms-eval ``tasks/coco_cap``): ``Provide a one-sentence caption for the provided image.``;
- ``vlmevalkit_mcq`` (VLMEvalKit ``ImageMCQDataset.build_prompt``): ``Hint: ..\\nQuestion: ..\\nOptions:\\nA. ..\\n
  Please select the correct answer from the options above. \\n``;
- ``plain``: the question as it is.

An instruction already at the end of the question (LLaVA's question files carry it) is not added twice.
"""

from __future__ import annotations

from typing import Optional

from actors.eval.benchmark_file import Question

MCQ_INSTRUCTION = "Answer with the option's letter from the given choices directly."
SHORT_INSTRUCTION = "Answer the question using a single word or phrase."
GROUNDING_TEMPLATE = "Please provide the bounding box coordinate of the region this sentence describes: {}."
CAPTION_PROMPT = "Provide a one-sentence caption for the provided image."
STYLES = ("mcq", "short", "grounding", "caption", "vlmevalkit_mcq", "plain")

# The prompt style each metric's benchmarks are asked in (scoring.METRICS names).
STYLE_FOR_METRIC = {
    "mcq": "mcq", "mcq_circular": "mcq", "scienceqa": "mcq",
    "vqa": "short", "anls": "short", "relaxed_accuracy": "short", "exact_match": "short", "first_word": "plain",
    "yes_no": "short", "pope": "short", "mme": "short",
    "grounding": "grounding", "cider": "caption",
}


def _with_instruction(text: str, instruction: str) -> str:
    return text if text.rstrip().endswith(instruction) else f"{text}\n{instruction}"


def prompt_text(question: Question, style: str) -> str:
    q = question.question
    if style == "mcq":
        text = (question.hint + "\n" + q) if question.hint else q
        for letter, option in question.options.items():
            text += f"\n{letter}. {option}"
        return _with_instruction(text, MCQ_INSTRUCTION)
    if style == "short":
        return _with_instruction(q, SHORT_INSTRUCTION)
    if style == "grounding":
        return GROUNDING_TEMPLATE.format(q)
    if style == "caption":
        return CAPTION_PROMPT
    if style == "vlmevalkit_mcq":
        text = f"Hint: {question.hint}\n" if question.hint else ""
        text += f"Question: {q}\n"
        if question.options:
            text += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in question.options.items())
            text += "Please select the correct answer from the options above. \n"
        return text
    if style == "plain":
        return q
    raise ValueError(f"prompt style must be one of {STYLES}, got {style!r}")


def build_messages(question: Question, style: str, system: Optional[str] = None) -> list[dict]:
    """OpenAI-style ``messages`` for one question (images first, then the text)."""
    content: list[dict] = [{"type": "image", "index": i} for i in range(len(question.images))]
    text = prompt_text(question, style)
    content.append({"type": "text", "text": ("\n" + text) if question.images else text})
    messages = [{"role": "user", "content": content}]
    return ([{"role": "system", "content": system}] if system else []) + messages
