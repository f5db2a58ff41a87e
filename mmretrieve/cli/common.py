"""What every command shares: the common options, logging, JSON output, exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_SKIPPED = 0, 1, 2, 3


def common_options() -> argparse.ArgumentParser:
    """Options that work before or after the subcommand. SUPPRESS keeps a subparser from resetting a
    value given earlier on the line (defaults are applied once, in ``main``)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--index-dir", default=argparse.SUPPRESS,
                        help="home of named indexes (default: $MMRETRIEVE_INDEX_DIR or ./indexes)")
    common.add_argument("--threads", type=int, default=argparse.SUPPRESS,
                        help="torch + FAISS threads (default: $MMRETRIEVE_THREADS, else 1 for search and the cores "
                             "left by decoder workers for batch work)")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (-vv: debug, and tracebacks on errors)")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="warnings and errors only")
    return common


COMMON_DEFAULTS = (("index_dir", None), ("threads", None), ("verbose", 0), ("quiet", False))


def setup_logging(verbosity: int) -> None:
    level = logging.INFO if verbosity == 0 else (logging.DEBUG if verbosity > 0 else logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("mmretrieve").setLevel(level)


def out_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def usage_error(msg: str) -> int:
    print(f"error: {msg}", file=sys.stderr)
    return EXIT_USAGE


def add_generation_args(p: argparse.ArgumentParser) -> None:
    """The options of the generative stages (search and eval share them)."""
    g = p.add_argument_group("generative stages (describe, listwise, pairwise, mllm)")
    g.add_argument("--describe", default=None, metavar="SPEC",
                   help='a model writes the target and the coarse stage searches for it, e.g. '
                        '"mllm:model=DIR,prompt=target,fuse=image,weight=0.5" (fuse: none, image, text, query)')
    g.add_argument("--vlm", default=None, metavar="MODEL",
                   help="the vision-language model (a local folder or hub id) of every generative stage, instead of "
                        "the preset's")
    g.add_argument("--vlm-api", default=None, metavar="URL",
                   help="an OpenAI-compatible endpoint (http://host:port/v1) for the generative stages instead")
    g.add_argument("--vlm-api-model", default=None, metavar="NAME", help="the model name the endpoint serves")
    g.add_argument("--vlm-api-key-env", default=None, metavar="VAR",
                   help="the environment variable that holds the endpoint's API key (the key is never stored)")


def pipeline_from_args(args):
    """The ``Pipeline`` of ``--pipeline`` / ``--rerank`` / ``--describe`` / ``--vlm*`` (None: none asked)."""
    from mmretrieve.rerank.pipeline import pipeline_from_options

    vlm = {"model": getattr(args, "vlm", None), "api": getattr(args, "vlm_api", None),
           "api_model": getattr(args, "vlm_api_model", None), "api_key_env": getattr(args, "vlm_api_key_env", None)}
    return pipeline_from_options(pipeline=getattr(args, "pipeline", None), rerank=getattr(args, "rerank", None),
                                 describe=getattr(args, "describe", None), vlm=vlm)
