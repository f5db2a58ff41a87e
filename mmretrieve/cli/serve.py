"""``mmretrieve serve NAME [NAME...]``: a warm HTTP API and web page over one or more indexes."""

from __future__ import annotations

from mmretrieve.cli.common import EXIT_OK


def cmd_serve(args) -> int:
    if getattr(args, "ray", False):
        return _serve_on_ray(args)
    from mmretrieve import settings
    from mmretrieve.serve.config import ServeConfig, check_bind
    from mmretrieve.serve.server import serve

    config = ServeConfig(
        indexes=list(args.names), index_dir=args.index_dir, host=args.host, port=args.port, workers=args.workers,
        token=args.token or settings.serve_token(), verify=not args.no_verify,
        max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_pixels=args.max_pixels, max_k=args.max_k,
        max_offset=args.max_offset, max_rerank_k=args.max_rerank_k, heavy_workers=args.heavy_workers,
        heavy_queue=args.heavy_queue, search_threads=args.search_threads, request_timeout_s=args.timeout,
        cors_origins=list(args.cors_origin or []), batching=not args.no_batching,
        batch_searches=not args.no_search_batching, batch_window_ms=args.batch_window_ms,
        reload_interval_s=args.reload_interval, torch_threads=args.torch_threads,
        mllm=args.mllm, adapter=args.adapter, vlm=args.vlm, vlm_api=args.vlm_api, vlm_api_model=args.vlm_api_model,
        vlm_api_key_env=args.vlm_api_key_env, max_generative_k=args.max_generative_k, header_timeout_s=args.header_timeout, body_min_rate=args.body_min_rate,
    )
    config.check()
    check_bind(config.host, config.token)  # refuse before anything loads
    serve(config, print_fn=print)
    return EXIT_OK


def _serve_on_ray(args) -> int:
    """``serve NAME --ray``: sharded vector search on Ray Serve (``mmretrieve.serve.ray_shards``), blocking."""
    from mmretrieve import settings
    from mmretrieve.errors import UsageError
    from mmretrieve.serve.config import check_bind
    from mmretrieve.serve.ray_shards import run

    if len(args.names) != 1:
        raise UsageError("serve --ray serves one index (give one NAME)")
    token = args.token or settings.serve_token()
    print(check_bind(args.host, token))  # refuse an open address without a token before Ray starts
    run(args.names[0], address=args.ray_address, host=args.host, port=args.port, blocking=True, token=token,
        shards=args.shards, replicas=args.replicas, gpus_per_replica=args.gpus_per_replica,
        cpus_per_replica=args.cpus_per_replica, index_dir=args.index_dir,
        verify=not args.no_verify)
    return EXIT_OK


def register(sub, common) -> None:
    s = sub.add_parser("serve", parents=[common], help="serve indexes over HTTP: a JSON API and a web page (needs mmretrieve[serve])")
    s.add_argument("names", nargs="+", metavar="NAME", help="index names (under the indexes home) or index folders")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; any other address needs --token)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    s.add_argument("--workers", type=int, default=1, help="worker processes, as uvicorn's --workers (each loads the indexes)")
    s.add_argument("--token", default=None,
                   help="API token clients send as 'Authorization: Bearer TOKEN' (default: $MMRETRIEVE_TOKEN)")
    s.add_argument("--no-verify", action="store_true", help="skip sha256 verification when opening index versions")
    s.add_argument("--max-upload-mb", type=float, default=10.0, help="largest uploaded image in MiB (default 10)")
    s.add_argument("--max-pixels", type=int, default=40_000_000, help="largest uploaded image in pixels (default 40M)")
    s.add_argument("--max-k", type=int, default=1000, help="most results per page (default 1000)")
    s.add_argument("--max-offset", type=int, default=10_000, help="deepest paging offset (default 10000)")
    s.add_argument("--max-rerank-k", type=int, default=200, help="most candidates one rerank stage may score (default 200)")
    s.add_argument("--heavy-workers", type=int, default=1, help="re-ranking requests run at once (default 1)")
    s.add_argument("--heavy-queue", type=int, default=8,
                   help="re-ranking requests that may wait; more are answered 503 with Retry-After (default 8)")
    s.add_argument("--search-threads", type=int, default=None, help="plain searches run at once (default: the cores)")
    s.add_argument("--timeout", type=float, default=30.0, help="seconds per request before a 504 (default 30)")
    s.add_argument("--header-timeout", type=float, default=5.0,
                   help="seconds a connection has to send a request's headers; idle ones are closed (default 5)")
    s.add_argument("--body-min-rate", type=int, default=4096,
                   help="bytes/s a request body must keep after its first 5 s, else 408 (default 4096)")
    s.add_argument("--cors-origin", action="append", default=None,
                   help="an origin allowed to call the API from its pages (repeatable; default: no CORS)")
    s.add_argument("--no-batching", action="store_true",
                   help="encode each query alone instead of batching concurrent ones (for comparison)")
    s.add_argument("--no-search-batching", action="store_true",
                   help="scan the index once per query instead of once per batch of concurrent queries (for comparison)")
    s.add_argument("--batch-window-ms", type=float, default=10.0,
                   help="under load, how long the encoder waits for more queries to batch (default 10 ms)")
    s.add_argument("--torch-threads", type=int, default=1,
                   help="torch threads for encoders and rerankers (default 1: faster under concurrent load on few "
                        "cores; --threads still sets FAISS's)")
    s.add_argument("--reload-interval", type=float, default=1.0,
                   help="seconds between checks for a new index version (0: never; default 1)")
    s.add_argument("--mllm", default=None, metavar="MODEL",
                   help="a vision-language model (local folder) that the mllm reranker may use (default: mllm off)")
    s.add_argument("--adapter", default=None, metavar="DIR",
                   help="a PEFT LoRA adapter (e.g. OUT/adapter of `mmretrieve train verifier`) the mllm reranker applies")
    g = s.add_argument_group("generative stages (describe, listwise, pairwise: the cotrr, describe-setr and "
                             "egocvr-pairwise presets, and listwise / pairwise rerank specs)")
    g.add_argument("--vlm", default=None, metavar="DIR",
                   help="the vision-language model (a local folder) of every generative stage, in every preset instead "
                        "of the model its YAML names, and of the mllm reranker when --mllm is not given (default: "
                        "presets keep their own model, usable only when it is a local folder)")
    g.add_argument("--vlm-api", default=None, metavar="URL",
                   help="an OpenAI-compatible endpoint (http://host:port/v1) for the describe, listwise and pairwise "
                        "stages instead")
    g.add_argument("--vlm-api-model", default=None, metavar="NAME", help="the model name the endpoint serves")
    g.add_argument("--vlm-api-key-env", default=None, metavar="VAR",
                   help="the environment variable that holds the endpoint's API key (the key is never stored)")
    g.add_argument("--max-generative-k", type=int, default=50,
                   help="most candidates one generative stage may re-rank per request (default 50)")
    r = s.add_argument_group("sharded search on Ray Serve (--ray; needs mmretrieve[ray]; vectors only: POST "
                             '{"vectors": [[...]], "k": 10} to /)')
    r.add_argument("--ray", action="store_true",
                   help="serve one index as shards of its segments on Ray Serve instead of the FastAPI service")
    r.add_argument("--shards", type=int, default=2, help="shards: contiguous segment ranges, balanced by rows (default 2)")
    r.add_argument("--replicas", type=int, default=1, help="replicas per shard (default 1)")
    r.add_argument("--gpus-per-replica", type=float, default=0, help="GPUs per shard replica (default 0)")
    r.add_argument("--cpus-per-replica", type=float, default=1,
                   help="CPUs Ray reserves per shard replica (default 1; fractions allowed, e.g. 0.5)")
    r.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="an existing Ray cluster to join (default: start Ray on this machine, loopback only)")
    s.set_defaults(func=cmd_serve)
