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
