"""The ``paramtransfer`` command: pretrain | run | compare | demo | bench | report | modelset | rank | auto.

Bad input (unknown method or arch, class range outside the dataset, missing data, bad shots, a
malformed ``--set``, a source that does not fit) ends with one line on stderr and exit code 2.

One module per subcommand, each with its ``add_parser(sub)`` (the argparse definition) and its
``command(args)`` (the handler), registered in :data:`COMMANDS` below:

  pretrain              cli/pretrain.py   train a source model once and cache it
  run                   cli/run.py        one method, one learning rate, one seed -> OUT/result.json
  compare, demo         cli/compare.py    methods x learning rates x seeds (demo: the default comparison)
  report                cli/report.py     rebuild tables, plots and benchmark reports from results alone
  bench                 cli/bench.py      the benchmark suites and report.md beside the papers' numbers
  modelset build|eval   cli/modelset.py   LPS model sets: build one, evaluate LPS on it
  rank                  cli/rank.py       rank candidate sources for a target (LPS, LogME, LEEP, NCE, ...)
  auto                  cli/auto.py       rank sources, race source x method x lr, train the winner

cli/common.py holds what two or more of them share: the source/target/output/executor flags, the
``--set`` help text and :func:`~paramtransfer.cli.common.parse_sets`, the flag value parsers, the
output-folder check and the one-line-error parser class. This module holds the entry point
:func:`main` (``paramtransfer = "paramtransfer.cli:main"``), :func:`build_parser`, the dispatch, and
:func:`_explicit_flags` (which flags were typed; it parses again with the whole parser, so it lives
beside :func:`build_parser`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from types import ModuleType

from paramtransfer.cli import auto, bench, compare, modelset, pretrain, rank, report, run
from paramtransfer.cli.common import _Parser
from paramtransfer.errors import UserError

# command -> the module with its add_parser and command, in the order `paramtransfer --help` lists them.
# compare.add_parser defines both compare and demo (one parser definition, two defaults).
COMMANDS: dict[str, ModuleType] = {
    "pretrain": pretrain,
    "compare": compare,
    "demo": compare,
    "run": run,
    "report": report,
    "bench": bench,
    "modelset": modelset,
    "rank": rank,
    "auto": auto,
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="paramtransfer",
        description="Parameter-based deep transfer learning: transfer a source network to a small "
        "target task and compare strategies with the baselines.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in dict.fromkeys(COMMANDS.values()):
        module.add_parser(sub)
    return parser


def _explicit_flags(argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags given on the command line (parsed again with no defaults at all), so
    that a flag given with its default value still counts as given."""
    parser = build_parser()
    stack = [parser]
    while stack:
        p = stack.pop()
        p._defaults.clear()  # set_defaults(...)
        for action in p._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return set(vars(parser.parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; bad input is one ``paramtransfer: error: ...`` line on stderr and exit code 2.

    A closed stdout (``paramtransfer compare ... | head -1``: the reader went away) is one error line and
    exit code 2 as well (the table of bad inputs expects 2), never a BrokenPipeError traceback.
    """
    try:
        try:
            code = _dispatch(argv)
        except SystemExit:  # --help: argparse prints, then exits 0
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # inside the try: a closed stdout shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _drop_stdout()
        print(
            "paramtransfer: error: the output pipe was closed before the output was written (e.g. by "
            "`| head`); read the written files under --out, or send stdout to a file",
            file=sys.stderr,
        )
        return 2


def _drop_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (e.g. captured in tests)
        pass


def _dispatch(argv: Sequence[str] | None) -> int:
    try:
        args = build_parser().parse_args(argv)
        args._explicit = _explicit_flags(argv)
        import paramtransfer  # noqa: F401  (registers methods)

        COMMANDS[args.command].command(args)
    except UserError as err:
        print(f"paramtransfer: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("paramtransfer: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0
