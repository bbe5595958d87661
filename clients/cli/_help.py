"""argparse's help formatter for the CLI's parser, imported only when argparse parses (help, errors, completion,
and command lines the fast path leaves to it)."""

from __future__ import annotations

import argparse
import os
import sys


class Formatter(argparse.HelpFormatter):
    """argparse's, with the terminal's width found without importing shutil (argparse makes a formatter for
    every argument it adds, and shutil, with what it imports, costs a submit more than the rest of argparse's
    set-up)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None):
        if width is None:
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                try:
                    width = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)
