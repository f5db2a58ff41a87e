"""``mmretrieve``: the command line. Each subcommand is one function over the Python API, in one module
per command group (``index``, ``search``, ``serve``, ``eval``, ``bench``, ``misc``: demo and encoders).

    mmretrieve demo
    mmretrieve index build NAME SOURCE [--encoder E] [--factory F] [--patches] [--strict]
    mmretrieve index add NAME SOURCE | index rm NAME ITEM... | index info NAME | index list
    mmretrieve search NAME --text "..." | --image PATH [--text "..." --fusion sum] [-k N] [--json]
    mmretrieve serve NAME [NAME...] [--host H --port P --token T]
    mmretrieve eval cirr|fashioniq|circo|egocvr|captions|score ...
    mmretrieve bench ingest|search|encode|rerank|emd-ood|video|mllm [...]

Building the parser imports neither torch nor FAISS: ``--help`` and ``--version`` answer at once, and a
command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mmretrieve.cli.common import COMMON_DEFAULTS, EXIT_ERROR, EXIT_SKIPPED, common_options, setup_logging

log = logging.getLogger("mmretrieve.cli")

COMMAND_GROUPS = ("misc", "index", "search", "serve", "eval", "bench", "train")
#: commands that answer one query at a time: torch gets one thread by default (``runtime.default_threads``)
QUERY_COMMANDS = frozenset({"search", "serve"})


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from mmretrieve import __version__

    common = common_options()
    p = argparse.ArgumentParser(prog="mmretrieve", description="Multimodal retrieval and re-ranking.", parents=[common])
    p.add_argument("--version", action="version", version=f"mmretrieve {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True)
    for group in COMMAND_GROUPS:
        importlib.import_module(f"mmretrieve.cli.{group}").register(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    """The ``mmretrieve`` command. Standard output is flushed before it returns (also after ``--help``):
    a reader that left the pipe (``--json | head``) then ends the command quietly with SIGPIPE's status,
    instead of an error at the interpreter's exit."""
    try:
        try:
            return _run(argv)
        finally:
            _flush_stdout()
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        return _reader_gone()


def _run(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, default in COMMON_DEFAULTS:
        if not hasattr(args, name):
            setattr(args, name, default)
    setup_logging(-1 if args.quiet else args.verbose)
    try:
        from mmretrieve.runtime import set_threads

        set_threads(args.threads, workload="query" if args.cmd in QUERY_COMMANDS else "batch")
        return args.func(args)
    except BrokenPipeError as e:  # `mmretrieve ... | head`: the reader left; main ends quietly as Unix tools do
        if _stdout_reader_gone():
            raise
        return _report_error(e, args)  # a broken pipe elsewhere (a worker, a socket) is a real error
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for users; the traceback with -v
        return _report_error(e, args)


def _flush_stdout() -> None:
    if sys.stdout is not None and not getattr(sys.stdout, "closed", False):
        sys.stdout.flush()


#: what a shell reports for a command ended by SIGPIPE (128 + 13)
EXIT_SIGPIPE = 141


def _stdout_reader_gone() -> bool:
    """Whether standard output is a pipe whose reader has closed it (poll reports an error on its write
    end): a broken pipe elsewhere (a worker, a socket) is a real error and is reported as one."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def _reader_gone() -> int:
    """Standard output's reader closed the pipe: say nothing (the interpreter's last flush would report the
    broken pipe again, so standard output is pointed at /dev/null first) and exit as SIGPIPE would."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout replaced by an object without a file descriptor
        pass
    return EXIT_SIGPIPE


def _report_error(e: Exception, args) -> int:
    from mmretrieve.errors import SkippedInputsError
    from mmretrieve.results import printable

    if args.verbose:
        log.exception("failed")
    print(f"error: {printable(e)}", file=sys.stderr)
    if isinstance(e, SkippedInputsError):
        for s in e.report.skipped[:50]:
            print(f"  skipped {printable(s.uri)}: {printable(s.reason)}", file=sys.stderr)
        return EXIT_SKIPPED
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
