"""``mmretrieve train verifier``: LoRA adaptation of the ``mllm`` yes/no verifier (SETR). See docs/training.md.

    mmretrieve train verifier --model DIR --data cirr --root CIRR --out runs/v1
    accelerate launch -m mmretrieve train verifier ...   # data-parallel over the machine's GPUs
"""

from __future__ import annotations

from mmretrieve.cli.common import EXIT_OK, out_json


def cmd_verifier(args) -> int:
    from mmretrieve.train.verifier import TrainConfig, train_verifier

    cfg = TrainConfig(
        model=args.model, out=args.out, data=args.data, root=args.root, file=args.file, split=args.split,
        categories=args.categories, index=args.index, index_dir=args.index_dir, encoder=args.encoder, cache=args.cache,
        negatives=args.negatives, random_negatives=args.random_negatives, balance=args.balance, rank=args.rank,
        lora_alpha=args.lora_alpha, dropout=args.dropout, target_modules=args.target_modules, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, epochs=args.epochs, max_steps=args.max_steps,
        batch_size=args.batch_size, grad_accum=args.grad_accum, max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, device=args.device, seed=args.seed,
        save_every=args.save_every, keep=args.keep, val_queries=args.val_queries, val_k=args.val_k,
        max_pixels=args.max_pixels or None, prompt=args.prompt, log_every=args.log_every,
    )
    rec = train_verifier(cfg)
    if rec.get("processes", 1) > 1 and not _is_main():
        return EXIT_OK
    if args.json:
        out_json({k: rec.get(k) for k in ("status", "adapter", "steps", "metrics", "base", "time_s")}
                 | {"skipped": len(rec["data"]["skipped"])})
        return EXIT_OK
    c = rec["data"]["counts"]
    print(f"trained {rec['steps']['total']} steps on {c['train_examples']} examples ({c['triplets_used']} triplets, "
          f"{c['triplets_skipped']} skipped) in {rec['time_s']:.1f} s")
    base = rec.get("base") or {}
    last = (rec.get("metrics") or [{}])[-1]
    for name, m in (("base", base), ("adapted", last)):
        rr = m.get("rerank", {})
        print(f"{name:8s} accuracy {m.get('accuracy', float('nan')):.3f}  rerank R@1 {rr.get('recall@1', float('nan')):.1f}"
              f"  R@5 {rr.get('recall@5', float('nan')):.1f}")
    print(f"adapter: {rec['adapter']}  (--rerank \"mllm:model={args.model},adapter={rec['adapter']}\")")
    return EXIT_OK


def _is_main() -> bool:
    import os

    return os.environ.get("RANK", "0") == "0"


def register(sub, common) -> None:
    t = sub.add_parser("train", parents=[common], help="train models of the pipeline (verifier: LoRA on the mllm stage)")
    ts = t.add_subparsers(dest="train_cmd", required=True)
    v = ts.add_parser("verifier", parents=[common], help="LoRA-adapt the mllm yes/no verifier on composed-retrieval triplets",
                      description="Adapt the mllm verifier with LoRA on triplets (reference, text, target) and mined "
                                  "hard negatives; the result is a PEFT folder OUT/adapter for "
                                  "--rerank \"mllm:model=DIR,adapter=OUT/adapter\". Re-running resumes.")
    v.add_argument("--model", required=True, help="the vision-language model folder (as mllm:model=)")
    v.add_argument("--data", required=True, choices=["cirr", "fashioniq", "jsonl"], help="where the triplets come from")
    v.add_argument("--root", default=None, help="the dataset's top folder (cirr, fashioniq), in its official layout")
    v.add_argument("--file", default=None,
                   help='a JSONL file of {"reference", "text", "target", "negatives"?} (paths or --index item keys)')
    v.add_argument("--split", default="train", help="the benchmark split to train on (default: train)")
    v.add_argument("--categories", default=None, help="FashionIQ categories, comma-separated (default: all)")
    v.add_argument("--index", default=None, metavar="NAME",
                   help="an existing index of the images (its keys name them; its coarse stage mines the negatives) "
                        "instead of indexing them in the feature cache")
    v.add_argument("--encoder", default="embedded", help="encoder of the index built for mining (default: embedded)")
    v.add_argument("--cache", default=None, help="gallery feature cache (default $MMRETRIEVE_CACHE/eval)")
    v.add_argument("--out", required=True, help="run folder: checkpoints/, adapter/, run.json (re-running resumes)")
    d = v.add_argument_group("examples")
    d.add_argument("--negatives", type=int, default=3, help="hard negatives per triplet from the coarse stage (default 3)")
    d.add_argument("--random-negatives", type=int, default=0, help="random negatives per triplet (default 0)")
    d.add_argument("--balance", default="repeat", choices=["repeat", "weight", "none"],
                   help="make yes:no even: repeat the positive once per negative (default), weight its loss, or none")
    d.add_argument("--val-queries", type=int, default=50, help="triplets held out for validation (default 50)")
    d.add_argument("--val-k", type=int, default=10, help="shortlist re-ranked per held-out query (default 10)")
    d.add_argument("--max-pixels", type=int, default=448 * 448, help="cap on each image's pixels (default 448*448; 0: none)")
    d.add_argument("--prompt", default="yesno", help="the verifier's prompt preset (default yesno, as mllm:prompt=)")
    o = v.add_argument_group("training")
    o.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    o.add_argument("--lora-alpha", type=float, default=32.0, help="LoRA alpha (default 32)")
    o.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (default 0.05)")
    o.add_argument("--target-modules", default=None,
                   help="comma-separated linear layer names in the language model (default q_proj,k_proj,v_proj,o_proj)")
    o.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default 1e-4)")
    o.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default 0)")
    o.add_argument("--warmup-steps", type=int, default=0, help="linear warm-up steps, then linear decay (default 0)")
    o.add_argument("--epochs", type=int, default=1, help="passes over the training examples (default 1)")
    o.add_argument("--max-steps", type=int, default=None, help="optimizer steps in all (overrides --epochs)")
    o.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch per process (default 4)")
    o.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    o.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (default 1.0; 0: none)")
    o.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    o.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="base model precision (default auto: bf16/fp16 on GPUs, fp32 on CPUs without native bf16)")
    o.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: a GPU if there is one)")
    o.add_argument("--seed", type=int, default=0, help="data order, held-out split and adapter initialisation (default 0)")
    o.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (default 500)")
    o.add_argument("--keep", type=int, default=2, help="checkpoints kept (default 2)")
    o.add_argument("--log-every", type=int, default=10, help="log the loss every N steps (default 10)")
    v.add_argument("--json", action="store_true", help="print the run's summary as JSON")
    v.set_defaults(func=cmd_verifier)
