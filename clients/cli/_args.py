"""The command line's fast path: a plain command line, parsed without argparse.

Importing argparse (with ``re``, ``gettext`` and ``locale``) cost a submit more than everything else it
imports. ``parse`` runs the CLI's own definitions (``define``, which ``build_parser`` runs against argparse)
against a ``Recorder`` and reads the command line with them, the way argparse would, but only where the
reading is plain: options spelled out in full, values that do not look like options, one block of positional
arguments. For anything else (help, ``--version``, an abbreviation, a missing or bad value, an unknown option or
command, two exclusive options) it returns None, and argparse parses the command line instead, so every help
text, error message and exit code is still argparse's own. A test checks that the two agree wherever this one
answers.
"""

from __future__ import annotations

REMAINDER = "..."          # argparse.REMAINDER: every argument from the first positional on
SUPPRESS = "==SUPPRESS=="  # argparse.SUPPRESS
_BAD = object()            # a value argparse would refuse
# What the definitions may pass that changes nothing in parsing; any other keyword leaves the command to argparse.
_DESCRIPTIVE = frozenset({"help", "metavar", "description", "formatter_class", "prog", "version"})


class Arguments:
    """A parsed command line: one attribute per destination, as argparse's ``Namespace``."""

    def __init__(self, **values):
        self.__dict__.update(values)

    def __repr__(self) -> str:
        return f"Arguments({', '.join(f'{k}={v!r}' for k, v in sorted(vars(self).items()))})"


class _Action:
    __slots__ = ("kind", "dest", "nargs", "type", "default", "choices")

    def __init__(self, kind, dest, nargs, type, default, choices):
        self.kind, self.dest, self.nargs, self.type, self.default, self.choices = \
            kind, dest, nargs, type, default, choices


class Recorder:
    """Stands in for an ``ArgumentParser`` while the definitions run, and keeps what they add."""

    formatter_class = None

    def __init__(self, prefix_chars: str = "-", add_help: bool = True, **kwargs):
        # Options that start with anything but "-" (``labrun agent``'s "+") are argparse's to read.
        self.plain = prefix_chars == "-" and _DESCRIPTIVE.issuperset(kwargs)
        self.options: dict[str, _Action] = {}
        self.positionals: list[_Action] = []
        self.actions: list[_Action] = []
        self.exclusive: list[list[_Action]] = []
        self.defaults: dict = {}
        self.subcommands: _Subcommands | None = None
        if add_help:
            self.add_argument("-h", "--help", action="help")

    def add_argument(self, *strings, action="store", nargs=None, type=None, default=None, choices=None,
                     **kwargs) -> _Action:
        if action not in ("store", "store_true", "append", "help", "version") \
                or nargs not in (None, "+", REMAINDER) or not _DESCRIPTIVE.issuperset(kwargs):
            self.plain = False
        if action == "store_true":
            default = False if default is None else default
        elif action in ("help", "version"):
            default = SUPPRESS
        if strings[0].startswith("-"):
            long = [s for s in strings if s.startswith("--")]
            dest = (long or strings)[0].lstrip("-").replace("-", "_")
        else:
            dest = strings[0]
        recorded = _Action(action, SUPPRESS if action in ("help", "version") else dest, nargs, type, default,
                           choices)
        self.actions.append(recorded)
        if strings[0].startswith("-"):
            self.options.update(dict.fromkeys(strings, recorded))
        else:
            self.positionals.append(recorded)
        return recorded

    def set_defaults(self, **values) -> None:
        self.defaults.update(values)
        for action in self.actions:
            if action.dest in values:
                action.default = values[action.dest]

    def add_mutually_exclusive_group(self, **kwargs) -> "_Group":
        self.exclusive.append([])
        return _Group(self, self.exclusive[-1])

    def add_subparsers(self, dest=SUPPRESS, **kwargs) -> "_Subcommands":
        self.subcommands = _Subcommands(dest)
        self.actions.append(_Action("parsers", dest, None, None, None, None))
        return self.subcommands


class _Group:
    def __init__(self, parser: Recorder, members: list):
        self.parser, self.members = parser, members

    def add_argument(self, *strings, **kwargs) -> None:
        self.members.append(self.parser.add_argument(*strings, **kwargs))


class _Subcommands:
    def __init__(self, dest: str):
        self.dest = dest
        self.parsers: dict[str, Recorder] = {}

    def add_parser(self, name: str, **kwargs) -> Recorder:
        kwargs.pop("help", None)
        self.parsers[name] = Recorder(**kwargs)
        return self.parsers[name]


def parse(argv: list[str], define) -> Arguments | None:
    """``argv`` read as argparse reads it, or None when that needs argparse.

    ``define(parser, only)`` adds the top level's arguments, and subcommand ``only``'s, to ``parser``.
    """
    top = Recorder()
    define(top, "")   # no command is named "": the top level's own options
    values = _defaults(top)
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i = _option(top, argv, i, values, set())
        if i is None:
            return None
    if i == len(argv):
        return None
    command = argv[i]
    top = Recorder()
    define(top, command)
    sub = top.subcommands.parsers.get(command) if top.subcommands is not None else None
    if sub is None:
        return None
    values[top.subcommands.dest] = command
    sub_values = _defaults(sub)
    remainder = _read(sub, argv[i + 1:], sub_values)
    if remainder is None:
        return None
    # Before any "--", argparse refuses an abbreviation that could mean two options wherever it stands, even
    # among a run's own arguments: such a command line is argparse's.
    known = top.options.keys() | sub.options.keys()
    if any(_abbreviates(arg, known) for arg in remainder[:remainder.index("--") if "--" in remainder else None]):
        return None
    for key, value in sub.defaults.items():
        sub_values.setdefault(key, value)
    values.update(sub_values)
    return Arguments(**values)


def _defaults(parser: Recorder) -> dict:
    return {action.dest: action.default for action in parser.actions
            if action.dest != SUPPRESS and action.default != SUPPRESS}


def _option(parser: Recorder, args: list[str], j: int, values: dict, seen: set) -> int | None:
    """Read the option at ``args[j]`` (and its value) into ``values``; the index after it, or None."""
    name, equals, explicit = args[j].partition("=") if args[j].startswith("--") else (args[j], "", "")
    action = parser.options.get(name)
    if action is None or action.kind in ("help", "version"):
        return None
    if action.kind == "store_true":
        if equals:
            return None
        value = True
    else:
        if equals:
            if explicit == "--":   # argparse drops a "--" value, whatever the option
                return None
            string = explicit
        elif j + 1 < len(args) and not args[j + 1].startswith("-"):
            j += 1
            string = args[j]
        else:
            return None
        value = _converted(action, string)
        if value is _BAD:
            return None
        if action.kind == "append":
            value = [*(values.get(action.dest) or []), value]
    values[action.dest] = value
    seen.add(id(action))
    return j + 1


def _read(parser: Recorder, args: list[str], values: dict) -> list[str] | None:
    """Read a subcommand's ``args`` into ``values``; returns what its REMAINDER positional took ([] if none),
    or None."""
    if not parser.plain or len(parser.positionals) > 1:
        return None
    positional = parser.positionals[0] if parser.positionals else None
    remainder = positional is not None and positional.nargs == REMAINDER
    seen: set[int] = set()
    given: list[str] = []   # the positional's arguments
    ended = False           # an option came after them: more would be argparse's error
    taken: list[str] = []   # what the REMAINDER positional took
    j = 0
    while j < len(args):
        arg = args[j]
        if arg == "-" or arg == "--" and not remainder:
            return None
        if arg == "--" or not arg.startswith("-"):
            if remainder:
                taken = args[j:]
                break
            if positional is None or ended:
                return None
            given.append(arg)
            j += 1
            continue
        j = _option(parser, args, j, values, seen)
        if j is None:
            return None
        ended = bool(given)
    if any(sum(id(action) in seen for action in group) > 1 for group in parser.exclusive):
        return None
    if remainder:
        values[positional.dest] = taken
    elif positional is not None:
        if not given or positional.nargs is None and len(given) != 1:
            return None
        converted = [_converted(positional, string) for string in given]
        if _BAD in converted:
            return None
        values[positional.dest] = converted if positional.nargs == "+" else converted[0]
    for action in parser.actions:
        # argparse converts a default given as a string, as if it had been typed.
        if id(action) not in seen and action.type is not None and isinstance(action.default, str):
            values[action.dest] = _converted(action, action.default)
            if values[action.dest] is _BAD:
                return None
    return taken
def _converted(action: _Action, string: str):
    """The value ``string`` gives ``action``, or ``_BAD`` where argparse would say something about it."""
    try:
        value = action.type(string) if action.type is not None else string
    except Exception:   # noqa: BLE001 - argparse's to report, with its message
        return _BAD
    if action.choices is not None and value not in action.choices:
        return _BAD
    return value


def _abbreviates(arg: str, options) -> bool:
    """Whether argparse could take ``arg`` for an abbreviation of one of ``options`` (of two: an error)."""
    if len(arg) < 2 or arg[0] != "-" or arg in options or arg.split("=", 1)[0] in options:
        return False
    if arg[1] == "-":
        head = arg.split("=", 1)[0]
        return any(option.startswith(head) for option in options)
    return arg[:2] in options or any(option.startswith(arg) for option in options)
