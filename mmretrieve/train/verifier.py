"""LoRA adaptation of the yes/no verifier (SETR): the ``mllm`` reranker's model learns to answer its own
question, on its own prompts, with the loss on exactly what the reranker reads.

Every example's prompt is built by ``MLLMReranker.build`` (the verifier's template and chat format), and
the loss is the cross-entropy over the two logits [Yes, No] at the answer position (the last position,
left padding): P(yes) = softmax([Yes, No])[0] is the reranker's score. PEFT LoRA on the language model's
attention projections (``q_proj k_proj v_proj o_proj`` by default, found in the model), AdamW with a
linear schedule, autocast in bf16/fp16 on GPUs (fp32 on CPUs without native bf16), optional gradient
checkpointing. Held-out yes/no accuracy and the rerank Recall@1/5 of the adapted verifier against the
base one are measured after each epoch (and at the end).

Checkpoints (``OUT/checkpoints/step-N``: the trainable weights in safetensors, the optimizer, schedule,
step and RNG states as tensors, loaded with ``weights_only=True``) are written atomically, the last
``keep`` kept; the same command on the same ``OUT`` resumes from the last one and reaches the same
adapter as an uninterrupted run. The final adapter is a PEFT folder, ``OUT/adapter``, that
``--rerank "mllm:model=DIR,adapter=OUT/adapter"`` loads; ``OUT/run.json`` is the run record.

With ``accelerate`` installed, ``accelerate launch -m mmretrieve train verifier ...`` (or ``torchrun``)
trains data-parallel: each process takes its share of each step's examples.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmretrieve.errors import MissingDependencyError, MLLMError, TrainingError, UsageError
from mmretrieve.rerank.mllm import MLLMReranker, resolve_answer_ids
from mmretrieve.rerank.vlm import item_image, torch_dtype
from mmretrieve.train.data import Example, TrainData, build_data

log = logging.getLogger(__name__)

#: the language model's attention projections, found under the model's text tower
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
_TEXT_TOWERS = ("language_model", "text_model", "model.layers")
#: configuration keys that may change between a run and its resumption
_RESUMABLE_CHANGES = {"out", "save_every", "keep", "cache", "device", "log_every"}


@dataclass
class TrainConfig:
    model: str
    out: str
    data: str = "cirr"
    root: str | None = None
    file: str | None = None
    split: str = "train"
    categories: str | None = None
    index: str | None = None
    index_dir: str | None = None
    encoder: str = "embedded"
    cache: str | None = None
    negatives: int = 3
    random_negatives: int = 0
    balance: str = "repeat"
    rank: int = 16
    lora_alpha: float = 32.0
    dropout: float = 0.05
    target_modules: str | None = None
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    dtype: str = "auto"
    device: str | None = None
    seed: int = 0
    save_every: int = 500
    keep: int = 2
    val_queries: int = 50
    val_k: int = 10
    max_pixels: int | None = 448 * 448
    prompt: str = "yesno"
    log_every: int = 10

    def check(self) -> None:
        for name in ("rank", "epochs", "batch_size", "grad_accum", "save_every", "keep", "val_k", "log_every"):
            if int(getattr(self, name)) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise UsageError(f"--max-steps must be >= 1, got {self.max_steps}")
        if not (self.lr > 0) or not (0 <= self.dropout < 1):
            raise UsageError("--lr must be > 0 and --dropout in [0, 1)")


@dataclass
class State:
    step: int = 0
    metrics: list[dict[str, Any]] = field(default_factory=list)
    base: dict[str, Any] | None = None
    losses: list[float] = field(default_factory=list)


# ---- processes -----------------------------------------------------------------------------------------
class Dist:
    """One process, or one of several under ``accelerate launch`` / ``torchrun`` (with accelerate)."""

    def __init__(self, device: str | None) -> None:
        self.acc = None
        try:
            from accelerate import Accelerator
        except ImportError:
            Accelerator = None
        if Accelerator is not None and (device is None or str(device).startswith("cuda") or int(os.environ.get("WORLD_SIZE", "1")) > 1):
            self.acc = Accelerator(cpu=device == "cpu")
        if self.acc is not None:
            self.device, self.rank, self.world = self.acc.device, self.acc.process_index, self.acc.num_processes
        else:
            from mmretrieve.runtime import resolve_device

            self.device, self.rank, self.world = resolve_device(device), 0, 1
        self.main = self.rank == 0

    def prepare(self, model):
        return self.acc.prepare_model(model) if self.acc is not None and self.world > 1 else model

    def unwrap(self, model):
        return self.acc.unwrap_model(model) if self.acc is not None and self.world > 1 else model

    def no_sync(self, model, last: bool):
        if self.acc is None or self.world == 1 or last:
            return contextlib.nullcontext()
        return self.acc.no_sync(model)

    def backward(self, loss) -> None:
        loss.backward()

    def wait(self) -> None:
        if self.acc is not None and self.world > 1:
            self.acc.wait_for_everyone()

    def main_first(self):
        return self.acc.main_process_first() if self.acc is not None and self.world > 1 else contextlib.nullcontext()


# ---- the model -------------------------------------------------------------------------------------------
class _Verifier(MLLMReranker):
    """The reranker over the model being trained: its ``build`` makes every prompt, its ``score_prompts``
    every validation score (one source of truth for the template and the score)."""

    def attach(self, processor, model, yes_id: int, no_id: int, dev) -> None:
        self._loaded = (processor, model, yes_id, no_id, dev)


def target_module_names(model, requested: str | None) -> list[str]:
    """Full names of the linear layers LoRA adapts: leaf names ``requested`` (default: the attention
    projections) inside the language model. Raises ``TrainingError`` naming the candidates when none match."""
    leaves = [x.strip() for x in requested.split(",") if x.strip()] if requested else list(DEFAULT_TARGETS)
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    text = [n for n in linear if any(t in n for t in _TEXT_TOWERS)] or linear
    names = [n for n in text if n.rsplit(".", 1)[-1] in leaves]
    if not names:
        found = sorted({n.rsplit(".", 1)[-1] for n in text})
        raise TrainingError(f"no linear layer named {', '.join(leaves)} in the language model of this model; its linear "
                            f"layers are named: {', '.join(found[:30])}; pass --target-modules with some of them")
    return names


def load_model(cfg: TrainConfig, dev: torch.device):
    """Processor, base model (at the run's precision) with a fresh seeded LoRA adapter, answer ids."""
    try:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForImageTextToText, AutoProcessor
    except ImportError:
        raise MissingDependencyError("training needs transformers and peft: pip install 'mmretrieve[train]'") from None
    if not os.path.isdir(cfg.model):
        raise MLLMError(f"model folder not found: {cfg.model} (a local folder with the processor and weights)")
    dt = torch_dtype(cfg.dtype, dev)
    processor = AutoProcessor.from_pretrained(cfg.model)
    base = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dt)
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    for p in base.parameters():
        p.requires_grad_(False)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.dropout,
                      target_modules=target_module_names(base, cfg.target_modules), bias="none")
    torch.manual_seed(cfg.seed)
    model = get_peft_model(base, lcfg)
    for p in model.parameters():  # the adapter trains in fp32 under autocast
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    model.to(dev)
    return processor, model, dt


def _inputs(processor, texts, images, dev, float_dtype, kw) -> dict:
    batch = processor(text=texts, images=images if any(images) else None, padding=True, return_tensors="pt", **kw)
    batch = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in batch.items()}
    for k in ("pixel_values", "pixel_values_videos"):
        if k in batch:
            batch[k] = batch[k].to(float_dtype)
    return batch


def _autocast(dev: torch.device, dt):
    if dev.type == "cuda" and dt in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dt)
    if dev.type == "cpu" and dt == torch.bfloat16:
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def pair_logits(model, batch: dict, yes_id: int, no_id: int) -> torch.Tensor:
    """[logit(Yes), logit(No)] at the answer position (the last one: left padding), in fp32."""
    try:
        logits = model(**batch, logits_to_keep=1).logits[:, -1, :]
    except TypeError:  # models whose forward has no logits_to_keep
        logits = model(**batch).logits[:, -1, :]
    return logits[:, [yes_id, no_id]].float()


# ---- one step -----------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What a training run holds while it runs."""

    cfg: TrainConfig
    dist: Dist
    verifier: _Verifier
    processor: Any
    model: Any
    optimizer: Any
    scheduler: Any
    dtype: Any
    yes_id: int
    no_id: int
    images: dict = field(default_factory=dict)

    def image(self, path: str):
        im = self.images.get(path)
        if im is None:
            if len(self.images) > 4096:
                self.images.clear()
            im = self.images[path] = item_image(path, self.cfg.max_pixels)
        return im

    def prompts(self, exs: list[Example]) -> tuple[list[str], list[list]]:
        from mmretrieve.query import Query

        texts, images = [], []
        for e in exs:
            t, ims = self.verifier.build(Query(text=e.text, image=e.reference), self.image(e.reference), self.image(e.candidate))
            texts.append(t)
            images.append(ims)
        return texts, images


def train_step(run: Run, chunk: list[Example]) -> float:
    """One optimizer step over ``chunk`` (all processes' examples of the step; this one takes its share),
    in micro-batches of ``batch_size``; the loss is the weighted mean cross-entropy over the whole chunk."""
    cfg, dist, model = run.cfg, run.dist, run.model
    model.train()
    total_w = sum(e.weight for e in chunk)
    shard = chunk[dist.rank :: dist.world]
    micro = [shard[i : i + cfg.batch_size] for i in range(0, len(shard), cfg.batch_size)]
    float_dtype = next(model.parameters()).dtype
    seen = 0.0
    for j, mb in enumerate(micro):
        texts, images = run.prompts(mb)
        batch = _inputs(run.processor, texts, images, dist.device, float_dtype, run.verifier.processor_kwargs)
        labels = torch.tensor([0 if e.label else 1 for e in mb], device=dist.device)  # class 0: Yes
        w = torch.tensor([e.weight for e in mb], device=dist.device, dtype=torch.float32)
        with dist.no_sync(model, last=j == len(micro) - 1):
            with _autocast(dist.device, run.dtype):
                pair = pair_logits(model, batch, run.yes_id, run.no_id)
            ce = torch.nn.functional.cross_entropy(pair, labels, reduction="none")
            loss = (ce * w).sum() / total_w * dist.world
            dist.backward(loss)
        seen += float((ce.detach() * w).sum())
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return seen / max(total_w, 1e-12) * dist.world


# ---- validation -----------------------------------------------------------------------------------------------
def _recalls(ranks: list[int | None]) -> dict[str, float]:
    n = max(1, len(ranks))
    return {f"recall@{k}": round(100.0 * sum(1 for r in ranks if r is not None and r <= k) / n, 2) for k in (1, 5)}


def validate(run: Run, data: TrainData, adapted: bool = True) -> dict[str, Any]:
    """Held-out yes/no accuracy (threshold P(yes) = 0.5) and the rerank Recall@1/5 of the held-out queries'
    coarse shortlists, with the adapter (``adapted``) or without it (the base verifier)."""
    from mmretrieve.query import Query

    model = run.dist.unwrap(run.model)
    model.eval()
    ctx = contextlib.nullcontext() if adapted else model.disable_adapter()
    out: dict[str, Any] = {}
    with ctx, _autocast(run.dist.device, run.dtype):
        if data.val:
            p = run.verifier.score_prompts(*run.prompts(data.val))
            y = np.array([e.label for e in data.val], dtype=bool)
            hit = (p > 0.5) == y
            out["accuracy"] = round(float(hit.mean()), 4)
            out["accuracy_yes"] = round(float(hit[y].mean()), 4) if y.any() else None
            out["accuracy_no"] = round(float(hit[~y].mean()), 4) if (~y).any() else None
            out["balanced_accuracy"] = round(float(np.mean([a for a in (out["accuracy_yes"], out["accuracy_no"]) if a is not None])), 4)
        ranks = []
        for vq in data.val_queries:
            q = Query(text=vq.text, image=vq.reference)
            qimg = run.image(vq.reference)
            built = [run.verifier.build(q, qimg, run.image(p)) for p in vq.paths]
            s = run.verifier.score_prompts([t for t, _ in built], [i for _, i in built]) if built else np.zeros(0)
            order = [vq.shortlist[int(i)] for i in np.argsort(-s, kind="stable")]
            ranks.append(order.index(vq.target) + 1 if vq.target in order else None)
        if data.val_queries:
            out["rerank"] = _recalls(ranks)
    model.train()
    return out


def coarse_recalls(data: TrainData) -> dict[str, float]:
    return _recalls([vq.shortlist.index(vq.target) + 1 if vq.target in vq.shortlist else None for vq in data.val_queries])


# ---- checkpoints -------------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    py = random.getstate()
    out = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.asarray(np_state[1]).astype(np.int64)),
           "numpy_pos": int(np_state[2]), "python": [py[0], list(py[1]), py[2]]}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy"].numpy().astype(np.uint32), s["numpy_pos"], 0, 0.0))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    ck = out / "checkpoints"
    found = [p for p in ck.glob("step-*") if p.name[5:].isdigit() and (p / "state.json").is_file()] if ck.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def save_checkpoint(run: Run, out: Path, state: State, config: dict) -> Path:
    """``OUT/checkpoints/step-N``, written in a temporary folder and renamed into place; the oldest beyond
    ``keep`` are removed. Every process writes its own RNG state."""
    from safetensors.torch import save_file

    dist, model = run.dist, run.dist.unwrap(run.model)
    ck = out / "checkpoints"
    tmp = ck / f".tmp-step-{state.step}"
    if dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.wait()
    torch.save(_rng_state(), tmp / f"rng-{dist.rank}.pt")
    if dist.main:
        weights = {n: p.detach().to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(weights, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict()}, tmp / "state.pt")
        model.save_pretrained(str(tmp / "adapter"))
        (tmp / "state.json").write_text(json.dumps({**asdict(state), "config": config}, indent=1, default=str))
    dist.wait()
    final = ck / f"step-{state.step}"
    if dist.main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoints(out)[: -run.cfg.keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", final)
    dist.wait()
    return final


def load_checkpoint(run: Run, path: Path, config: dict) -> State:
    """Restore the adapter, optimizer, schedule and RNG states of ``path``; refuse a different configuration."""
    from safetensors.torch import load_file

    saved = json.loads((path / "state.json").read_text())
    before = saved.pop("config", None) if isinstance(saved, dict) else None
    if not isinstance(before, dict) or not before or not isinstance(saved.get("step"), int):
        raise ValueError("state.json holds no configuration or step")
    changed = sorted(k for k in set(before) | set(config) if k not in _RESUMABLE_CHANGES and before.get(k) != config.get(k))
    if changed:
        raise TrainingError(f"{path.parent.parent} holds a run with other settings ({', '.join(changed)}: "
                            f"{', '.join(f'{before.get(k)!r} -> {config.get(k)!r}' for k in changed[:4])}); resume it "
                            "with the same settings, or give another --out")
    weights = load_file(str(path / "trainable.safetensors"))
    model = run.dist.unwrap(run.model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                if n not in weights:
                    raise TrainingError(f"{path}: no saved weights for {n}; the checkpoint is not of this model")
                p.copy_(weights[n].to(p.device, p.dtype))
    st = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    run.optimizer.load_state_dict(st["optimizer"])
    run.scheduler.load_state_dict(st["scheduler"])
    rng = path / f"rng-{run.dist.rank}.pt"
    _set_rng_state(torch.load(rng if rng.is_file() else path / "rng-0.pt", weights_only=True))
    log.info("resuming from %s (step %d)", path, saved["step"])
    return State(**saved)


def resume(run: Run, found: list[Path], config: dict) -> State:
    """The state of the newest readable checkpoint of ``found`` (a fresh one when there is none). A damaged
    checkpoint (a truncated file, unreadable JSON) is named in a warning, moved aside (``step-N.damaged``)
    and the one before it is used; a checkpoint of other settings is refused (``TrainingError``)."""
    from safetensors import SafetensorError

    damaged = []
    for path in reversed(found):
        try:
            return load_checkpoint(run, path, config)
        except (SafetensorError, ValueError, KeyError, OSError, RuntimeError, EOFError) as e:
            if isinstance(e, TrainingError):
                raise
            log.warning("checkpoint %s is damaged (%s: %s); moved aside, trying the one before it", path,
                        type(e).__name__, e)
            damaged.append(f"{path.name}: {type(e).__name__}: {e}")
            if run.dist.main:
                aside = path.with_name(f"{path.name}.damaged")
                n = 1
                while aside.exists():
                    n += 1
                    aside = path.with_name(f"{path.name}.damaged-{n}")
                os.replace(path, aside)
            run.dist.wait()
    if damaged:
        raise TrainingError(f"{found[0].parent}: every checkpoint is damaged ({'; '.join(damaged)}); they were moved "
                            "aside as step-N.damaged: run the command again to start over")
    return State()


def save_adapter(run: Run, out: Path) -> Path:
    """The final PEFT adapter folder ``OUT/adapter`` (replaced whole)."""
    dest, tmp = out / "adapter", out / ".adapter.tmp"
    if run.dist.main:
        shutil.rmtree(tmp, ignore_errors=True)
        run.dist.unwrap(run.model).save_pretrained(str(tmp))
        if dest.exists():
            old = out / ".adapter.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, dest)
    run.dist.wait()
    return dest


# ---- the run --------------------------------------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for pkg in ("mmretrieve", "torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def _schedule(optimizer, warmup: int, total: int):
    def f(s: int) -> float:
        if s < warmup:
            return (s + 1) / (warmup + 1)
        return max(0.0, (total - s) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, f)


def setup(cfg: TrainConfig, total: int, dist: Dist) -> Run:
    processor, model, dt = load_model(cfg, dist.device)
    verifier = _Verifier(model=cfg.model, prompt=cfg.prompt, max_pixels=cfg.max_pixels, dtype="fp32")
    yes_id, no_id = resolve_answer_ids(getattr(processor, "tokenizer", processor), verifier.yes, verifier.no)
    verifier.attach(processor, model, yes_id, no_id, dist.device)
    model = dist.prepare(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return Run(cfg, dist, verifier, processor, model, optimizer, _schedule(optimizer, cfg.warmup_steps, total), dt,
               yes_id, no_id)


def plan(cfg: TrainConfig, n: int, world: int) -> tuple[int, int]:
    """(examples per optimizer step over all processes, steps per epoch); several processes drop an
    epoch's last incomplete step so that every one of them runs the same micro-batches."""
    per_step = cfg.batch_size * cfg.grad_accum * world
    per_epoch = math.ceil(n / per_step) if world == 1 else n // per_step
    if per_epoch < 1:
        raise TrainingError(f"{n} training examples do not fill one step of {per_step} ({world} processes); "
                            "lower --batch-size / --grad-accum or add data")
    return per_step, per_epoch


def write_record(out: Path, record: dict) -> None:
    tmp = out / ".run.json.tmp"
    tmp.write_text(json.dumps(record, indent=2, default=str))
    os.replace(tmp, out / "run.json")


def _open_index(cfg: TrainConfig):
    if not cfg.index:
        return None
    from mmretrieve.index import open_index

    return open_index(cfg.index, index_dir=cfg.index_dir)


def load_data(cfg: TrainConfig, dist: Dist | None = None) -> TrainData:
    ctx = dist.main_first() if dist is not None else contextlib.nullcontext()
    with ctx:  # the main process builds the cached gallery index; the others then open it
        return build_data(cfg.data, root=cfg.root, file=cfg.file, split=cfg.split, categories=cfg.categories,
                          index=_open_index(cfg), encoder=cfg.encoder, cache=cfg.cache, negatives=cfg.negatives,
                          random_negatives=cfg.random_negatives, balance=cfg.balance, val_queries=cfg.val_queries,
                          val_k=cfg.val_k, seed=cfg.seed)


def train_verifier(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a LoRA adapter of the verifier; returns the run record (also ``OUT/run.json``)."""
    cfg.check()
    t0 = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    dist = Dist(cfg.device)
    data = load_data(cfg, dist)
    per_step, per_epoch = plan(cfg, len(data.train), dist.world)
    total = cfg.max_steps or per_epoch * cfg.epochs
    run = setup(cfg, total, dist)
    config = {k: v for k, v in asdict(cfg).items()}
    state = resume(run, checkpoints(out), config)
    record = {"status": "running", "config": config, "versions": versions(), "processes": run.dist.world,
              "data": {"counts": data.counts, "fingerprints": data.fingerprints, "skipped": data.skipped,
                       "balance": cfg.balance},
              "steps": {"total": total, "per_epoch": per_epoch, "examples_per_step": per_step}}
    if state.base is None and run.dist.main:
        state.base = {"coarse": coarse_recalls(data), **validate(run, data, adapted=False)}
    _loop(run, data, state, out, config, record, per_step, per_epoch, total)
    adapter = save_adapter(run, out)
    record.update(status="finished", metrics=state.metrics, base=state.base, adapter=str(adapter),
                  time_s=round(time.perf_counter() - t0, 2), final_loss=state.losses[-1] if state.losses else None)
    if run.dist.main:
        write_record(out, record)
    return record


def _loop(run: Run, data: TrainData, state: State, out: Path, config: dict, record: dict, per_step: int,
          per_epoch: int, total: int) -> None:
    cfg, n = run.cfg, len(data.train)
    t0, start = time.perf_counter(), state.step
    while state.step < total:
        epoch, pos = divmod(state.step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
        chunk = [data.train[int(i)] for i in order[pos * per_step : (pos + 1) * per_step]]
        loss = train_step(run, chunk)
        state.step += 1
        state.losses.append(round(loss, 6))
        if run.dist.main and (state.step % cfg.log_every == 0 or state.step == total):
            rate = (state.step - start) / max(1e-9, time.perf_counter() - t0)
            log.info("step %d/%d epoch %d loss %.4f lr %.3g (%.2f steps/s)", state.step, total, epoch + 1, loss,
                     run.scheduler.get_last_lr()[0], rate)
        if pos + 1 == per_epoch or state.step == total:
            if run.dist.main:
                m = {"epoch": epoch + 1, "step": state.step, "loss": round(loss, 6), **validate(run, data)}
                state.metrics.append(m)
                log.info("validation after step %d: %s (base: %s)", state.step, m, state.base)
                write_record(out, {**record, "metrics": state.metrics, "base": state.base, "step": state.step})
            run.dist.wait()
        if state.step % cfg.save_every == 0 or state.step == total:
            save_checkpoint(run, out, state, config)
