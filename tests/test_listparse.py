"""Reading listwise answers (issue 20): golden shapes, damaged answers, random text, and the random text
a tiny random VLM generates through the real ``generate``: never an exception, always a permutation."""

from __future__ import annotations

import random
import string

import pytest

from mmretrieve.rerank.listparse import parse_ranking, rank_window


@pytest.mark.parametrize("text, want, how", [
    ('{"reasoning": "the red one", "ranking": [3, 1, 2]}', [2, 0, 1], "json"),
    ('Analysis... candidate [2] is closest.\n```json\n{"reasoning": "x", "ranking": ["[2]", "3", 1]}\n```\nDone.', [1, 2, 0], "json"),
    ('Example: {"ranking": [1, 2, 3]}. My answer: {"ranking": [2, 3]}', [1, 2], "json"),  # the last object
    ('{"order": [4, 4, 9, 0, 1, 2.0, true]}', [3, 0, 1], "json"),  # repeats, out of range, bools dropped
    ("I rank them [3, 2, 1] because [3] is red.", [2, 1, 0], "list"),  # "[3]" alone is prose, not a ranking
    ("[2] > [4] > [1] > [3]", [1, 3, 0, 2], "chain"),
    ("Ranking: [2] > [9] > [1]", [1, 0], "chain"),
])
def test_answers_in_the_shapes_models_give(text, want, how):
    assert parse_ranking(text, 4) == (want, how)


@pytest.mark.parametrize("text", ["", "   ", "I cannot tell.", '{"ranking": "3,1,2"}', "{not json", "[]", "[7]",
                                  '{"ranking": [0, 99]}', "[" * 5000, "{" * 5000 + "}" * 5000])
def test_unreadable_answers_keep_the_window(text):
    got, how = parse_ranking(text, 4)
    assert got is None and how
    order, read, _ = rank_window([10, 11, 12, 13], text)
    assert order == [10, 11, 12, 13] and not read


def test_a_partial_ranking_keeps_the_rest_in_their_order():
    order, read, how = rank_window([10, 11, 12, 13, 14], '{"ranking": [4, 2]}')
    assert order == [13, 11, 10, 12, 14] and read and how == "json"


def test_random_text_never_raises_and_always_gives_a_permutation():
    rnd = random.Random(0)
    alphabet = string.printable + "[]{}\"'>,`" * 5
    window = list(range(100, 108))
    for _ in range(2000):
        text = "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 200)))
        order, _, _ = rank_window(window, text)
        assert sorted(order) == window


@pytest.mark.parametrize("family", ["qwen2_vl", "idefics3", "llava"])
def test_text_generated_by_a_tiny_random_vlm_is_read_without_error(family, tmp_path):
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mmretrieve.testing import write_tiny_vlm

    d = write_tiny_vlm(tmp_path / family, family)
    processor = AutoProcessor.from_pretrained(d)
    model = AutoModelForImageTextToText.from_pretrained(d).eval()
    tok = getattr(processor, "tokenizer", processor)
    prompt = 'Rank the candidates [1] to [5]. Answer {"ranking": [...]}'
    inputs = tok([prompt], return_tensors="pt")
    window = [7, 3, 9, 1, 5]
    for seed in range(6):
        torch.manual_seed(seed)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=48, do_sample=seed > 0, pad_token_id=tok.pad_token_id or 0)
        text = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        order, _, _ = rank_window(window, text)
        assert sorted(order) == sorted(window)


def test_a_runaway_answer_is_read_in_linear_time():
    """An unclosed fence followed by 100 KB of whitespace took 43 s with a lazy-body regex (review of issue
    20); the fence search is linear and only the answer's last MAX_ANSWER_CHARS are read."""
    import time

    from mmretrieve.rerank.listparse import MAX_ANSWER_CHARS

    for text in ["```json" + " " * 100_000, "```json" + "\n" * 100_000, "[" * 100_000, "{" * 50_000 + "}" * 50_000]:
        t0 = time.perf_counter()
        assert parse_ranking(text, 10)[0] is None
        assert time.perf_counter() - t0 < 5  # a guard against the quadratic case, not a performance target
    tail = '{"ranking": [2, 1]}'
    assert parse_ranking("x" * (2 * MAX_ANSWER_CHARS) + tail, 2) == ([1, 0], "json")
