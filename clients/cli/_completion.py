"""Shell completion: ``labrun completion bash|zsh`` prints a script; the script asks ``labrun __complete``.

The scripts stay tiny and know nothing of labrun: they hand the words typed so far to
the hidden ``__complete`` command, which walks the real argument parser (so completion
never drifts from the options) and asks the agent for run and array ids where a run is
expected. Completing never starts an agent, and prints nothing when none answers.
"""

from __future__ import annotations

import argparse
import os
from typing import Callable, Iterable

# Subcommands whose positional arguments are runs (or arrays), and options whose values are.
RUN_COMMANDS = frozenset({"show", "logs", "cancel", "wait", "metrics", "download", "rm"})
RUN_OPTIONS = frozenset({"--after", "--afterok"})
# How many recent runs to offer: a completion list of thousands helps nobody.
MAX_RUNS = 200

BASH = """\
# labrun completion for bash: eval "$(labrun completion bash)", or save it as
# /etc/bash_completion.d/labrun (~/.local/share/bash-completion/completions/labrun for one user).
_labrun() {
    local IFS=$'\\n'
    COMPREPLY=($(labrun __complete -- "${COMP_WORDS[@]:1:COMP_CWORD}" 2>/dev/null))
}
complete -o default -o nosort -F _labrun labrun
"""

ZSH = """\
#compdef labrun
# labrun completion for zsh: eval "$(labrun completion zsh)", or save it as _labrun in a directory of $fpath.
_labrun() {
    local -a candidates
    candidates=("${(@f)$(labrun __complete -- "${(@)words[2,CURRENT]}" 2>/dev/null)}")
    candidates=(${candidates:#})
    if (( ${#candidates} )); then
        compadd -Q -a candidates
    else
        _files
    fi
}
if [[ "$funcstack[1]" == "_labrun" ]]; then _labrun "$@"; else compdef _labrun labrun; fi
"""


def script(shell: str) -> str:
    return {"bash": BASH, "zsh": ZSH}[shell]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _visible(parser: argparse.ArgumentParser) -> set[str]:
    """Subcommands with help (``__complete`` has none, so it is never offered)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return {choice.dest for choice in action._choices_actions}
    return set()


def _takes_value(parser: argparse.ArgumentParser, option: str) -> argparse.Action | None:
    action = parser._option_string_actions.get(option)
    return action if action is not None and action.nargs != 0 else None


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings if o.startswith("--"))


def candidates(parser: argparse.ArgumentParser, words: list[str], workspace: Callable[[], object]) -> list[str]:
    """What may come in place of the last of ``words`` (the word being typed), after the ones before it."""
    if words and words[0] == "--":
        words = words[1:]
    *before, current = words or [""]
    command, command_at, skip = None, None, False
    subcommands = _subcommands(parser)
    for i, word in enumerate(before):
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = _takes_value(parser, word) is not None
        else:
            command, command_at = word, i
            break
    if command is None:
        if current.startswith("-"):
            return _prefixed(_options(parser), current)
        return _prefixed(sorted(_visible(parser)), current)
    sub = subcommands.get(command)
    rest = before[command_at + 1:]
    if sub is None or "--" in rest:
        return []   # an unknown command, or the run's own command line: the shell completes files
    previous = rest[-1] if rest else None
    if previous is not None and (action := _takes_value(sub, previous)) is not None:
        if previous in RUN_OPTIONS:
            return _prefixed(_run_ids(workspace, before), current)
        return _prefixed(sorted(action.choices), current) if action.choices else []
    if current.startswith("-"):
        return _prefixed(_options(sub), current)
    if command in RUN_COMMANDS:
        return _prefixed(_run_ids(workspace, before), current)
    return []


def _prefixed(words: Iterable[str], prefix: str) -> list[str]:
    return [w for w in words if w.startswith(prefix)]


def _run_ids(workspace: Callable[[], object], words: list[str]) -> list[str]:
    """Recent run ids and array ids, newest first; nothing when no agent answers (never start one)."""
    os.environ["LABRUN_NO_AUTOSTART"] = "1"
    try:
        runs = []
        for run in workspace().list_runs(all=True):
            runs.append(run)
            if len(runs) >= MAX_RUNS:
                break
    except Exception:   # completion must never print a traceback into the user's prompt
        return []
    ids: list[str] = []
    for run in runs:
        array = run.get("array")
        if array and array["id"] not in ids:
            ids.append(array["id"])
        ids.append(run["run_id"])
    return ids
