"""EMD reranker numerics, solvers checked against each other, the pipeline's stage bookkeeping, errors."""

from __future__ import annotations

import numpy as np
import ot
import pytest
import torch
from PIL import Image

from mmretrieve import build_index, create_encoder, open_index
from mmretrieve.registry import UnknownNameError
from mmretrieve.rerank import RERANKERS, Pipeline, Reranker, RerankOutput, create_reranker, list_rerankers
from mmretrieve.rerank.ot import OTConvergenceError, emd_exact, emd_pot_sinkhorn, marginals, sinkhorn_batched
from mmretrieve.store import IndexWriter, Item


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _problem(K=6, n=9, m=9, d=16, seed=0, clustered=True):
    rng = np.random.default_rng(seed)
    if clustered:
        centres = _unit(rng.standard_normal((4, d)))
        Q = _unit(centres[rng.integers(0, 4, m)] + 0.4 * rng.standard_normal((m, d)))
        C = _unit(centres[rng.integers(0, 4, (K, n))] + 0.4 * rng.standard_normal((K, n, d)))
    else:
        Q = _unit(rng.standard_normal((m, d)))
        C = _unit(rng.standard_normal((K, n, d)))
    return Q.astype(np.float32), C.astype(np.float32)


# ---- marginals ---------------------------------------------------------------------------------------
def test_marginals_match_their_definitions():
    Q, C = _problem(K=3, n=4, m=5)
    S = np.einsum("knd,md->knm", C, Q)
    St, Qt, Ct = torch.tensor(S), torch.tensor(Q), torch.tensor(C)
    a, b = marginals(St, Qt, Ct, "uniform")
    np.testing.assert_allclose(a.numpy(), 1 / 4)
    np.testing.assert_allclose(b.numpy(), 1 / 5)
    a, b = marginals(St, Qt, Ct, "sc")
    dis = 1 - S
    np.testing.assert_allclose(a.numpy(), dis.sum(2) / dis.sum(2).sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_allclose(b.numpy(), dis.sum(1) / dis.sum(1).sum(1, keepdims=True), rtol=1e-5)
    a, b = marginals(St, Qt, Ct, "apc")
    qc = _unit(Q.mean(0))
    for k in range(3):
        cc = _unit(C[k].mean(0))
        wa = np.maximum(C[k] @ qc, 0)
        wb = np.maximum(Q @ cc, 0)
        np.testing.assert_allclose(a[k].numpy(), wa / wa.sum(), rtol=1e-5)
        np.testing.assert_allclose(b[k].numpy(), wb / wb.sum(), rtol=1e-5)


def test_apc_on_a_hand_made_patch_set():
    """Two query patches: one like the candidate, one opposite to it: APC gives the opposite one no mass."""
    e = np.eye(3, dtype=np.float32)
    Q = np.stack([e[0], -e[0]])  # query centre = normalised mean = 0 vector -> handled below
    Q = np.stack([e[0], _unit(e[0] * 0.2 + e[1])]).astype(np.float32)
    C = np.stack([[e[0], -e[0] * 0.0 + e[2]]]).astype(np.float32)  # candidate patches e0 and e2
    S = torch.tensor(np.einsum("knd,md->knm", C, Q))
    a, b = marginals(S, torch.tensor(Q), torch.tensor(C), "apc")
    qc = _unit(Q.mean(0))
    cc = _unit(C[0].mean(0))
    wa = np.maximum(C[0] @ qc, 0)
    wb = np.maximum(Q @ cc, 0)
    np.testing.assert_allclose(a[0].numpy(), wa / wa.sum(), rtol=1e-5)
    np.testing.assert_allclose(b[0].numpy(), wb / wb.sum(), rtol=1e-5)
    assert a[0, 0] > a[0, 1]  # the candidate patch that matches the query's centre weighs more
    # all weights clipped to zero -> uniform instead of a division by zero
    Cneg = -np.abs(C)
    Qpos = np.abs(Q)
    S2 = torch.tensor(np.einsum("knd,md->knm", Cneg, Qpos))
    a2, b2 = marginals(S2, torch.tensor(Qpos), torch.tensor(Cneg), "apc")
    np.testing.assert_allclose(a2.numpy(), 0.5)
    assert torch.isfinite(b2).all()


# ---- solvers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["uniform", "apc", "sc"])
def test_exact_matches_pot_directly(weights):
    Q, C = _problem()
    S = torch.tensor(np.einsum("knd,md->knm", C, Q))
    a, b = marginals(S, torch.tensor(Q), torch.tensor(C), weights)
    sims = emd_exact(S, a, b)
    for k in range(len(C)):
        A = a[k].double().numpy()
        B = b[k].double().numpy()
        T = ot.emd(A / A.sum(), B / B.sum(), 1 - S[k].double().numpy())
        assert sims[k] == pytest.approx(float((T * S[k].double().numpy()).sum()), abs=1e-9)
    assert np.allclose(emd_exact(S, a, b, threads=2), sims)


@pytest.mark.parametrize("clustered,reg,bound", [(True, 0.02, 0.01), (False, 0.05, 0.04)])
def test_sinkhorn_close_to_exact(clustered, reg, bound):
    """Entropic OT deviates from exact EMD by O(reg * log n) in value (measured here: 0.007 at reg 0.02,
    0.026 at reg 0.05); the torch and POT implementations of the same problem agree to 1e-4."""
    Q, C = _problem(K=8, n=16, m=16, seed=1, clustered=clustered)
    S = torch.tensor(np.einsum("knd,md->knm", C, Q), dtype=torch.float64)
    a, b = marginals(S, torch.tensor(Q, dtype=torch.float64), torch.tensor(C, dtype=torch.float64), "uniform")
    exact = emd_exact(S, a, b)
    tor = sinkhorn_batched(S, a, b, reg=reg, max_iter=20000, tol=1e-9, mode="log")
    assert np.abs(tor - exact).max() < bound, np.abs(tor - exact).max()
    pot = emd_pot_sinkhorn(S, a, b, reg=reg, max_iter=50000, tol=1e-7)
    np.testing.assert_allclose(tor, pot, atol=1e-4)
    # kernel and log modes solve the same problem
    ker = sinkhorn_batched(S, a, b, reg=0.05, max_iter=2000, tol=1e-10, mode="kernel")  # numpy backend
    ker_t = sinkhorn_batched(S, a, b, reg=0.05, max_iter=2000, tol=1e-10, mode="kernel", backend="torch")
    log = sinkhorn_batched(S, a, b, reg=0.05, max_iter=2000, tol=1e-10, mode="log")
    np.testing.assert_allclose(ker, log, atol=1e-6)
    np.testing.assert_allclose(ker, ker_t, atol=1e-9)

    # float32 batched on the default path stays close to the float64 answer
    f32 = sinkhorn_batched(S.float(), a.float(), b.float(), reg=0.05, max_iter=200, tol=1e-6)
    np.testing.assert_allclose(f32, ker, atol=2e-3)


def test_threaded_sinkhorn_equals_serial():
    Q, C = _problem(K=30, n=200, m=200, d=16, seed=2)  # large enough (1.2M cost entries) to be split
    S = torch.tensor(np.einsum("knd,md->knm", C, Q))
    a, b = marginals(S, torch.tensor(Q), torch.tensor(C), "apc")
    one, i1 = sinkhorn_batched(S, a, b, threads=1, return_info=True)
    three = sinkhorn_batched(S, a, b, threads=3)
    np.testing.assert_allclose(one, three, rtol=0, atol=1e-6)
    assert i1["mode"] == "kernel" and i1["iterations"] <= 50


@pytest.mark.filterwarnings("ignore::UserWarning:ot")  # as a user's process has it: POT's warning only printed
def test_pot_non_convergence_is_an_error():
    Q, C = _problem(K=1, n=30, m=30, d=8, clustered=False)
    S = torch.tensor(np.einsum("knd,md->knm", C, Q))
    a, b = marginals(S, torch.tensor(Q), torch.tensor(C), "uniform")
    with pytest.raises(OTConvergenceError, match="did not converge"):
        emd_exact(S, a, b, num_iter_max=3)


def test_identical_query_gets_the_top_emd_similarity():
    Q, C = _problem(K=10, seed=3)
    C[4] = Q  # candidate 4 is the query itself
    r = create_reranker("emd", solver="exact")
    for w in ["uniform", "apc", "sc"]:
        r.weights = w
        for solver in ["exact", "sinkhorn"]:
            sims = r.similarities(Q, C, solver=solver)
            assert int(np.argmax(sims)) == 4, (w, solver)


# ---- pipeline -----------------------------------------------------------------------------------------
class _Fixed(Reranker):
    """Scores candidates from a fixed table (registered only for this test module)."""

    name = "fixed"

    def __init__(self, *, table=None, k=100, alpha=1.0, norm="none"):
        super().__init__(k=k, alpha=alpha, norm=norm)
        self.table = table or {}

    def score(self, view, query, ids, scores):
        return RerankOutput(np.array([self.table.get(int(i), 0.0) for i in ids]), {int(i): {"seen": True} for i in ids})


RERANKERS.register("fixed", override=True)(_Fixed)


class _VecEncoder:
    def __init__(self, v):
        self.v = v

    def encode_texts(self, texts):
        return self.v[None]


def _toy_index(tmp_path, n=20):
    rng = np.random.default_rng(0)
    X = _unit(rng.standard_normal((n, 8))).astype(np.float32)
    with IndexWriter(tmp_path / "t", encoder_info={"name": "toy", "dim": 8, "modalities": ["text"]}, create=True) as w:
        w.add([Item(id=-1, key=f"i{j}", uri=f"toy://{j}") for j in range(n)], X)
    idx = open_index(tmp_path / "t")
    q = _unit(rng.standard_normal(8)).astype(np.float32)
    idx._encoder = _VecEncoder(q)
    return idx, X @ q


def test_pipeline_stage_ranks_and_tail_order(tmp_path):
    idx, coarse = _toy_index(tmp_path)
    coarse_order = list(np.argsort(-coarse, kind="stable"))
    # stage 1 re-scores the top 5 and reverses them; stage 2 re-scores the top 3 by id
    top5 = coarse_order[:5]
    s1 = _Fixed(table={int(i): float(r) for r, i in enumerate(top5)}, k=5)
    s2 = _Fixed(table={int(i): -float(i) for i in range(20)}, k=3)
    res = idx.search(text="x", k=10, pipeline=Pipeline([s1, s2], coarse_k=12))
    after1 = list(reversed(top5)) + coarse_order[5:12]
    after2 = sorted(after1[:3]) + after1[3:]
    assert res.ids == [int(i) for i in after2[:10]]
    assert res.stages == ["coarse", "fixed", "fixed#2"]
    for h in res:
        assert h.stage_ranks["coarse"] == coarse_order.index(h.id) + 1
        assert h.stage_ranks["fixed"] == after1.index(h.id) + 1
        assert h.stage_ranks["fixed#2"] == after2.index(h.id) + 1 == h.rank
    # items beyond the shortlist keep the coarse order and the coarse score's gaps, shifted below the head
    # so that the score falls with rank (each stage's own score is kept in stage_scores)
    tail = [h for h in res if h.id not in top5]
    assert [h.id for h in tail] == [int(i) for i in coarse_order[5:5 + len(tail)]]
    shift = tail[0].score - float(coarse[tail[0].id])
    assert [h.score - shift for h in tail] == pytest.approx([float(coarse[h.id]) for h in tail], abs=1e-6)
    assert all(h.stage_scores["coarse"] == pytest.approx(float(coarse[h.id]), abs=1e-6) for h in res)
    assert all(a.score > b.score for a, b in zip(res.hits, res.hits[1:]))
    assert "fixed" in res[0].stage_scores and res[0].extra == {"seen": True}


def test_fusion_alpha_and_normalisation(tmp_path):
    idx, coarse = _toy_index(tmp_path)
    table = {i: float(i % 7) for i in range(20)}
    res = idx.search(text="x", k=20, pipeline=Pipeline([_Fixed(table=table, k=20, alpha=0.3)]))
    for h in res:
        assert h.score == pytest.approx(0.3 * table[h.id] + 0.7 * coarse[h.id], abs=1e-6)
    res = idx.search(text="x", k=20, pipeline=Pipeline([_Fixed(table=table, k=20, alpha=0.5, norm="minmax")]))
    f = np.array([table[i] for i in range(20)])
    mm = lambda x: (x - x.min()) / (x.max() - x.min())  # noqa: E731
    expect = 0.5 * mm(f) + 0.5 * mm(coarse)
    assert res.ids == [int(i) for i in np.argsort(-expect, kind="stable")]


def test_k_larger_than_index_is_clamped(tmp_path):
    idx, _ = _toy_index(tmp_path, n=6)
    res = idx.search(text="x", k=50, pipeline=Pipeline([_Fixed(k=500)], coarse_k=1000))
    assert len(res) == 6


def test_bad_configs_give_clear_errors(tmp_path):
    assert "emd" in list_rerankers()
    with pytest.raises(UnknownNameError, match="unknown reranker 'emb'.*Did you mean 'emd'"):
        create_reranker("emb")
    with pytest.raises(ValueError, match="unknown option\\(s\\) 'kk' for reranker 'emd'; known: .*alpha"):
        create_reranker("emd", kk=3)
    with pytest.raises(ValueError, match="weights must be one of"):
        create_reranker("emd", weights="fancy")
    with pytest.raises(ValueError, match="solver must be one of"):
        Pipeline.from_specs(["emd:solver=magic"])
    with pytest.raises(ValueError, match="alpha must be in"):
        create_reranker("emd", alpha=3)
    with pytest.raises(ValueError, match="unknown key"):
        Pipeline.from_config({"stage": []})


def test_missing_patch_store_with_on_the_fly_disabled(photo_dir, embedded, sample_by_id):
    build_index("nopatch", photo_dir, encoder=embedded)
    idx = open_index("nopatch")
    pipe = Pipeline.from_specs(["emd:k=5,on_the_fly=false"])
    with pytest.raises(LookupError, match="has no patch store.*on-the-fly patch extraction is disabled"):
        idx.search(image=sample_by_id["chelsea"].path, k=3, pipeline=pipe)
    with pytest.raises(ValueError, match="needs an image or composed query"):
        idx.search(text="a cat", k=3, pipeline=Pipeline.from_specs(["emd:k=5"]))


# ---- EMD on real photos -------------------------------------------------------------------------------
def _crop(path, out, box_frac=(0.2, 0.15, 0.75, 0.8)):
    im = Image.open(path).convert("RGB")
    w, h = im.size
    l, t, r, b = box_frac
    im.crop((int(l * w), int(t * h), int(r * w), int(b * h))).save(out)
    return out


def test_emd_store_and_on_the_fly_agree_and_rank_the_source_first(photo_dir, embedded, sample_by_id, tmp_path):
    build_index("withp", photo_dir, encoder=embedded, patches=True)
    build_index("nop", photo_dir, encoder=embedded)
    q = _crop(sample_by_id["chelsea"].path, tmp_path / "crop.png")
    a = open_index("withp").search(image=q, k=5, pipeline="emd:k=20,solver=exact")
    b = open_index("nop").search(image=q, k=5, pipeline="emd:k=20,solver=exact")
    assert a.keys == b.keys  # fp16 store vs fresh features: the same ranking
    assert a[0].key.endswith("chelsea.png")
    fa, fb = a[0].stage_scores["emd"], b[0].stage_scores["emd"]
    assert fa == pytest.approx(fb, abs=2e-3)
    assert a.stages == ["coarse", "emd"] and "emd" in a.timings_ms


def test_emd_with_timm_patches_and_composed_query(photo_dir, tiny_clip, sample_by_id, tmp_path):
    build_index("tc", photo_dir, encoder=tiny_clip)
    idx = open_index("tc")
    spec = "emd:k=10,patches=timm:resnet18@random,solver=sinkhorn"
    res = idx.search(image=sample_by_id["coffee"].path, text="a red car", k=5, pipeline=spec)
    assert len(res) == 5 and res.stages == ["coarse", "emd"]
    assert all("emd" in h.stage_scores for h in res)


def test_timm_encoder_tiny_config_and_local_weights(tmp_path, samples):
    from safetensors.torch import save_file

    kw = dict(img_size=56, model_kwargs=dict(depth=2, embed_dim=32, num_heads=2))
    enc = create_encoder("timm:vit_small_patch14_dinov2.lvd142m@random", **kw)
    assert "text" not in enc.modalities and enc.patch_grid == 4
    P = enc.encode_patches([samples[0].path])
    assert P.shape == (1, 16, 32)
    np.testing.assert_allclose(np.linalg.norm(P, axis=-1), 1, atol=1e-4)
    f = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in enc.model.state_dict().items()}, str(f))
    enc2 = create_encoder(f"timm:vit_small_patch14_dinov2.lvd142m@{f}", cache=False, **kw)
    np.testing.assert_allclose(enc2.encode_images([samples[1].path]), enc.encode_images([samples[1].path]), atol=1e-6)
    from mmretrieve.encoders import EncoderError

    with pytest.raises(EncoderError, match="weights file not found"):
        create_encoder("timm:resnet18@/no/such/file.safetensors")


# ---- CLI and benchmarks -------------------------------------------------------------------------------
def test_cli_rerank_and_pipeline_preset(photo_dir, tmp_path, sample_by_id, capsys, embedded):
    import json

    from mmretrieve.cli import main

    home = str(tmp_path / "home")
    assert main(["index", "build", "p", str(photo_dir), "--patches", "--index-dir", home, "-q"]) == 0
    q = str(_crop(sample_by_id["chelsea"].path, tmp_path / "crop.png"))
    capsys.readouterr()
    assert main(["search", "p", "--image", q, "--rerank", "emd:k=20,alpha=0.7,weights=uniform", "-k", "3", "--json", "--index-dir", home]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stages"] == ["coarse", "emd"] and out["hits"][0]["key"].endswith("chelsea.png")
    assert out["query"]["pipeline"][0]["weights"] == "uniform"
    assert main(["search", "p", "--image", q, "--pipeline", "emd", "-k", "3", "--index-dir", home]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["rank", "score", "#coarse", "#emd", "key"]
    assert main(["search", "p", "--image", q, "--rerank", "emd:bogus=1", "--index-dir", home]) == 1
    assert "unknown option(s) 'bogus'" in capsys.readouterr().err


def test_bench_rerank_json_smoke(capsys):
    import json

    from mmretrieve.cli import main

    assert main(["bench", "rerank", "--json", "--queries", "1", "--repeat", "1", "-K", "12", "--patches", "16,25",
                 "--dim", "32", "--skip-pot-sinkhorn"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [r["patches"] for r in out["results"]] == [16, 25]
    for r in out["results"]:
        assert r["default_solver"] in ("sinkhorn", "exact")
        for s in r["solvers"]:
            assert {"solver", "ms_per_query", "top10_overlap", "kendall_tau"} <= set(s)
        assert r["solvers"][0]["top10_overlap"] == 1.0  # exact against itself


def test_bench_emd_ood_smoke(capsys):
    import json

    from mmretrieve.cli import main

    assert main(["bench", "emd-ood", "--json", "--encoder", "tiny-open-clip", "--queries", "3", "-K", "10"]) == 0
    out = json.loads(capsys.readouterr().out)
    (table,) = out["encoders"].values()
    assert table[0]["config"] == "coarse only" and len(table) == 7
    assert all(0 <= row["all/R@1"] <= row["all/R@5"] <= 100 for row in table)
