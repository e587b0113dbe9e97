"""BLEU and the METEOR substitute on hand-worked cases; the batch prior equals the scalar definitions."""

import math
import random

import numpy as np
import pytest

from rsitr.text import tokenize
from rsitr.text_similarity import PriorSimilarity, bleu, meteor, prior_similarity, stem


def words(text):
    return text.split()


# ------------------------------------------------------------------------------------------- BLEU


def test_bleu_of_an_identical_sentence_is_one():
    sentence = words("many green trees are around a small pond")
    assert bleu(sentence, [sentence]) == 1.0
    assert bleu(sentence, [sentence], smooth=False) == 1.0
    assert bleu(words("a pond"), [words("a pond")]) == 1.0  # orders longer than the sentence are left out


def test_bleu_ngram_overlap_by_hand():
    candidate, reference = words("the cat sat on the mat"), words("the cat is on the mat")
    # p1 = 5/6, p2 = 3/5, p3 = 1/4, p4 = 0/3; equal lengths, so no brevity penalty
    assert bleu(candidate, [reference], smooth=False) == 0.0
    # smoothed: p2 = 4/6, p3 = 2/5, p4 = 1/4  →  (5/6 · 4/6 · 2/5 · 1/4)^(1/4) = 18^(-1/4)
    assert bleu(candidate, [reference]) == pytest.approx(18 ** -0.25, abs=1e-12)
    # one word changed at the end: p1 = 4/5, p2 = 3/4, p3 = 2/3, p4 = 1/2
    assert bleu(words("a b c d e"), [words("a b c d f")], smooth=False) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_bleu_clips_by_the_most_generous_reference_and_picks_the_shorter_length_on_ties():
    # "the" ×3 is clipped to 2 (reference 2); bigram "the the" ×2 clipped to 1; no trigram
    refs = [words("the cat"), words("the the dog")]
    assert bleu(words("the the the"), refs, smooth=False) == 0.0
    assert bleu(words("the the the"), refs) == pytest.approx((2 / 3 * 2 / 3 * 1 / 2) ** (1 / 3), abs=1e-12)
    # references of 3 and 5 words are equally far from 4: the shorter one sets r = 3 < c, so no penalty
    assert bleu(words("a b c d"), [words("a b c"), words("a b c d e")]) == 1.0


def test_bleu_brevity_penalty_by_hand():
    assert bleu(words("the cat"), [words("the cat sat on the mat")]) == pytest.approx(math.exp(1 - 6 / 2), abs=1e-12)


# ----------------------------------------------------------------------------------------- METEOR


def test_stemmer_joins_inflections_and_leaves_short_words():
    assert stem("parked") == stem("parking") == stem("park") == "park"
    assert stem("buildings") == stem("building") == "build"
    assert (stem("trees"), stem("churches"), stem("cities")) == ("tree", "church", "city")
    assert (stem("grass"), stem("bus"), stem("red"), stem("ring"), stem("its")) == ("grass", "bus", "red", "ring", "its")


def test_meteor_identical_is_one_minus_the_one_chunk_penalty():
    assert meteor(words("a b c d"), [words("a b c d")]) == pytest.approx(1 - 0.5 * (1 / 4) ** 3, abs=1e-12)


def test_meteor_penalty_follows_the_number_of_chunks():
    # all four words match (P = R = 1, Fmean = 1) in 1, 2 or 4 chunks
    one = meteor(words("a b c d"), [words("a b c d")])
    two = meteor(words("a b c d"), [words("c d a b")])
    four = meteor(words("a b c d"), [words("d c b a")])
    assert two == pytest.approx(1 - 0.5 * (2 / 4) ** 3, abs=1e-12)
    assert four == pytest.approx(1 - 0.5 * (4 / 4) ** 3, abs=1e-12)
    assert one > two > four


def test_meteor_partial_match_by_hand():
    # m = 2, P = 2/3, R = 1/2, Fmean = 10PR / (R + 9P) = (10/3) / 6.5; one chunk: penalty 0.5 (1/2)^3
    want = (10 / 3) / 6.5 * (1 - 0.5 * (1 / 2) ** 3)
    assert meteor(words("a b x"), [words("a b c d")]) == pytest.approx(want, abs=1e-12)


def test_meteor_stem_stage_and_max_over_references():
    # no exact match, two stem matches in crossed order: P = R = 1, two chunks of one word
    assert meteor(words("parked cars"), [words("car parking")]) == pytest.approx(0.5, abs=1e-12)
    assert meteor(words("a b c d"), [words("x y"), words("a b c d")]) == pytest.approx(1 - 0.5 / 64, abs=1e-12)
    assert meteor(words("a b"), [words("x y")]) == 0.0


# ------------------------------------------------------------------------------------------ prior


def _corpus(seed=0, images=30):
    rng = random.Random(seed)
    vocabulary = ["a", "the", "two", "many", "green", "trees", "tree", "buildings", "building", "parked", "parking",
                  "cars", "car", "road", "river", "bridge", "near", "beside", "white", "red", "large", "small",
                  "houses", "of", "are", "is", "in", "on"]
    captions, owner = [], []
    for image in range(images):
        for _ in range(5):
            captions.append(" ".join(rng.choice(vocabulary) for _ in range(rng.randint(1, 12))) + " .")
            owner.append(image)
    captions[7] = captions[2]  # a duplicate caption on another image
    return captions, np.array(owner)


def test_batch_prior_equals_the_scalar_definitions():
    captions, owner = _corpus()
    train = np.array([c for c in range(len(captions)) if c % 6 != 5])
    prior = PriorSimilarity(captions, owner, train)
    caption_ids, image_ids = train[::3], np.array([0, 1, 5, 29, 0, 13])
    got = prior(caption_ids, image_ids)
    assert got.shape == (len(caption_ids), len(image_ids))
    for a, c in enumerate(caption_ids):
        for b, i in enumerate(image_ids):
            refs = [tokenize(captions[r]) for r in train if owner[r] == i]
            assert got[a, b] == pytest.approx(prior_similarity(tokenize(captions[c]), refs), abs=1e-6)
    assert np.all((got >= 0) & (got <= 1))


def test_prior_uses_training_captions_only():
    captions = ["a red roof", "a large parking lot with cars", "a red roof", "green trees"]
    owner = np.array([0, 1, 1, 2])
    prior = PriorSimilarity(captions, owner, [0, 1, 3])  # caption 2 (a copy of 0 on image 1) is held out
    s = prior([0], [0, 1, 2])[0]
    assert s[0] == pytest.approx(0.5 + 0.5 * (1 - 0.5 / 27))  # own image: identical reference
    assert s[1] < 0.2 and s[2] == 0.0
    with pytest.raises(ValueError, match="not training captions"):
        prior([2], [0])
    assert prior([0], [7])[0, 0] == 0.0  # an image without training captions has no reference


def test_bleu_weight_mixes_the_two_metrics():
    captions, owner = _corpus(seed=1, images=6)
    ids = np.arange(len(captions))
    only_bleu = PriorSimilarity(captions, owner, ids, bleu_weight=1.0)(ids[:8], np.arange(6))
    only_meteor = PriorSimilarity(captions, owner, ids, bleu_weight=0.0)(ids[:8], np.arange(6))
    mixed = PriorSimilarity(captions, owner, ids, bleu_weight=0.25)(ids[:8], np.arange(6))
    assert np.allclose(mixed, 0.25 * only_bleu + 0.75 * only_meteor, atol=1e-6)
    assert not np.allclose(only_bleu, only_meteor)
    with pytest.raises(ValueError, match="bleu_weight"):
        PriorSimilarity(captions, owner, ids, bleu_weight=1.5)
