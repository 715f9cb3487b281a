"""What every command line of the project shares: one-line errors and the flag names.

Flag names (the same thing has the same name in every command):
    --tokenizer-dir DIR   a tokenizer directory (vocab.json + merges.txt); --tokenizer is accepted too
    --out PATH            where a command writes (--output is accepted where it was a command's name)
    --num-workers N       worker processes (--workers is accepted too)
    --device NAME         auto (default) | cpu | cuda | cuda:N | mps: llm.hardware.device_from_name
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from llm.machine import DEVICE_HELP


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error: `error: <message> (see --help)` on stderr and exit status 2, where
    argparse itself prints the whole usage block first. Subcommand parsers are of this class too.

    add_argument takes `alias=(...)`: further flags for the same option, accepted but left out of --help
    (the names other commands used for it)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    def add_argument(self, *args, alias: tuple[str, ...] = (), **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        for flag in alias:
            # argparse has no public call for a hidden option string: register it on the same action, so it
            # parses (and counts for `required`) exactly as the documented flag, which alone --help shows
            self._option_string_actions[flag] = action
        return action


def add_device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help=DEVICE_HELP)


def add_tokenizer_dir(parser: Parser, help: str, *, required: bool = False) -> None:
    parser.add_argument("--tokenizer-dir", alias=("--tokenizer",), required=required, metavar="DIR", help=help)


def add_num_workers(parser: Parser, help: str = "worker processes (default: all cores)") -> None:
    parser.add_argument("--num-workers", alias=("--workers",), type=int, default=None, metavar="N", help=help)


def add_quantize(parser: Parser) -> None:
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="quantize the block linears on load (int4: groups of 64); see llm.quantize")
