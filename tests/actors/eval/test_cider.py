"""CIDEr-D, on hand-computed cases.

Source: tylin/coco-caption pycocoevalcap/cider/cider_scorer.py (precook n-grams 1..4, document
frequency over images' references, tf * (log N - log df), clipped similarity, gaussian length
penalty sigma 6 on bigram counts, mean over n, / #refs, x 10).
"""

import math

import pytest

from actors.eval.cider import cider_d, tokenize


def test_tokenize_drops_ptb_punctuation():
    assert tokenize("A dog, running!") == "a dog running"
    assert tokenize("It's red.") == "it 's red"


def test_identical_caption_unique_ngrams_by_hand():
    # Two images, one reference each, no shared n-gram: every df = 1, idf = log 2 for all n-grams.
    # Candidate == reference: each n's similarity = 1 (same vector), no length penalty -> mean 1,
    # / 1 ref, x 10 = 10.
    mean, per = cider_d(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]], tokenized=True)
    assert per == pytest.approx([10.0, 10.0])
    assert mean == pytest.approx(10.0)


def test_ngram_in_every_image_weighs_zero():
    # "a" is in both images' references: idf = log 2 - log 2 = 0, so a caption of "a" alone scores 0.
    _, per = cider_d(["a", "a"], [["a x"], ["a y"]], tokenized=True)
    assert per == [0.0, 0.0]


def test_partial_match_by_hand():
    # image 1 ref "a b", candidate "a c"; image 2 ref "d e". df: a, b, (a,b) = 1; d, e, (d,e) = 1.
    # idf of a seen n-gram = log 2; of an unseen one ("c", "a c") = log 2 - log 1 = log 2 as well.
    # unigrams: hyp {a: L, c: L}, ref {a: L, b: L} (L = log 2): clipped dot = L*L, norms sqrt2 L each
    #   -> 1/2; bigrams: hyp {(a,c)}, ref {(a,b)}: 0. n = 3, 4: no n-grams -> 0.
    # lengths (bigram counts) equal -> no penalty. score = (1/2 + 0 + 0 + 0) / 4 * 10 = 1.25
    _, per = cider_d(["a c", "d e"], [["a b"], ["d e"]], tokenized=True)
    assert per[0] == pytest.approx(1.25)
    assert per[1] == pytest.approx(10.0 * 2 / 4)  # n = 1, 2 match; 3, 4 empty -> 2/4 * 10 = 5


def test_length_penalty_counts_bigrams():
    # candidate 3 words longer than the reference: delta = 3 bigrams -> factor exp(-9 / 72)
    _, per = cider_d(["p q r s t", "z"], [["p q"], ["y z"]], tokenized=True)
    L = math.log(2)
    # unigrams: hyp p,q,r,s,t weights L each (all idf log 2), ref p,q: dot 2L^2, norms sqrt5 L, sqrt2 L
    uni = 2 / math.sqrt(10)
    # bigrams: hyp pq,qr,rs,st; ref pq: dot L^2, norms 2L, L -> 1/2
    expected = (uni + 0.5) * math.exp(-9 / 72) / 4 * 10
    assert per[0] == pytest.approx(expected)
