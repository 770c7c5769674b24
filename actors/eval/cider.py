"""Caption CIDEr-D as pycocoevalcap computes it (tylin/coco-caption ``pycocoevalcap/cider/cider_scorer.py``).

Per caption: n-gram (n = 1..4) counts of the candidate and of each reference; the document
frequency ``df(g)`` = number of *images* whose references contain g, over the evaluated set;
tf-idf weight ``count * (log(#images) - log(max(1, df)))``; per n the cosine-like similarity with
each reference, the candidate's weights clipped to the reference's
(``min(vec_hyp, vec_ref) * vec_ref / (|hyp| |ref|)``) and a gaussian length penalty
``exp(-delta^2 / (2 * 6^2))``; mean over n, mean over references, x 10. The corpus score is the
mean over images. Kept as written: the "length" the penalty compares counts **bigrams** (the
source adds ``term_freq`` when the n-gram index is 1), i.e. words - 1.

Tokenisation: pycocoevalcap runs the Stanford PTB tokenizer (Java) lower-cased and drops the
tokens ``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``. ``tokenize`` approximates it
without Java: lower-case, split off punctuation, drop those tokens (``it's`` -> ``it 's``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Sequence

N = 4
SIGMA = 6.0
_DROP = {"''", "'", "``", "`", "-lrb-", "-rrb-", "-lcb-", "-rcb-", ".", "?", "!", ",", ":", "-", "--", "...", ";",
         "(", ")", "{", "}", "[", "]", '"'}
_TOKEN = re.compile(r"'s\b|n't\b|'re\b|'ve\b|'ll\b|'d\b|'m\b|\.\.\.|--|\w+(?:[.,]\w+)*|[^\w\s]")


def tokenize(text: str) -> str:
    words = _TOKEN.findall(text.replace("\n", " ").lower())
    return " ".join(w for w in words if w not in _DROP)


def _ngrams(sentence: str, n: int = N) -> dict[tuple[str, ...], int]:
    words = sentence.split()
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]], *, n: int = N,
            sigma: float = SIGMA, tokenized: bool = False) -> tuple[float, list[float]]:
    """(corpus CIDEr-D, per-image scores): ``candidates[i]`` is image i's caption, ``references[i]``
    its reference captions. Scores are on pycocoevalcap's scale (papers print x 100)."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError("CIDEr needs one candidate and a non-empty reference list per image")
    prep = (lambda s: s) if tokenized else tokenize
    tests = [_ngrams(prep(c), n) for c in candidates]
    refs = [[_ngrams(prep(r), n) for r in rs] for rs in references]
    if any(not rs for rs in refs):
        raise ValueError("every image needs at least one reference caption")
    df: dict[tuple[str, ...], float] = defaultdict(float)
    for rs in refs:
        for g in {g for r in rs for g in r}:
            df[g] += 1
    ref_len = math.log(float(len(refs)))

    def vec(counts):
        v = [dict() for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (ref_len - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    def sim(vh, vr, nh, nr, lh, lr):
        delta = float(lh - lr)
        val = [0.0] * n
        for k in range(n):
            for g, w in vh[k].items():
                r = vr[k].get(g, 0.0)
                val[k] += min(w, r) * r
            if nh[k] != 0 and nr[k] != 0:
                val[k] /= nh[k] * nr[k]
            val[k] *= math.e ** (-(delta ** 2) / (2 * sigma ** 2))
        return val

    scores = []
    for test, rs in zip(tests, refs):
        vh, nh, lh = vec(test)
        total = [0.0] * n
        for r in rs:
            vr, nr, lr = vec(r)
            total = [a + b for a, b in zip(total, sim(vh, vr, nh, nr, lh, lr))]
        scores.append(sum(total) / n / len(rs) * 10.0)
    return sum(scores) / len(scores), scores
