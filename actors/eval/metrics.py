"""The metric families, one module each; ``actors.eval.scoring`` is the one entry point.

- ``choice``: multiple choice (VLMEvalKit extraction, MMBench CircularEval)
- ``yes_no``: POPE, MME and the generic yes/no extraction
- ``vqa_accuracy``: the official VQA accuracy and its answer normalisation
- ``open_answer``: ANLS, ChartQA relaxed accuracy, GQA exact match, ScienceQA
- ``grounding``: Acc@IoU>=0.5
- ``cider``: caption CIDEr-D
"""

from actors.eval.scoring import METRICS, score_benchmark

__all__ = ["METRICS", "score_benchmark"]
