"""Every command shown in README.md and docs/*.md, run far enough to validate its arguments and config.

A documented command must not rot. Commands are read from the docs, so commands added later are
covered without touching this file:

- every line of a ``bash``/``sh``/``shell``/``console`` fenced block (an unknown program fails
  unless ``NOT_RUNNABLE`` says why it cannot be checked here);
- lines of other non-code fenced blocks (which mix commands with output) and inline code spans
  whose program is one we know (``python``, ``torchrun``, ``make``, ``sbatch``, our scripts and
  console scripts).

How each is checked: ``launch.train`` (also under ``torchrun``, ``launch/run.sh`` and ``sbatch``)
with ``--check``, which loads and validates the config and arguments and exits; ``launch.plan`` as
is (it only builds the model on the meta device); ``make`` targets with ``make -n``, then each
Python command of the recipe like a documented one; ``pytest`` by its paths; any other module or
console script with its arguments plus ``--help`` (argparse checks option values on the way and
must answer with its usage). ``[--opt value]`` optional arguments are included; values the shell
computes (``$(nproc)``, ``$N``) are taken as 1.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import runpy
import shlex
import signal
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
CODE_BLOCKS = {"python", "py", "toml", "json", "yaml", "ini", "text", "diff"}  # never commands
# Programs a documented command may start with that cannot be validated here, and why.
NOT_RUNNABLE = {
    "pip": "installs packages: needs a package index and changes the environment",
    "git": "works on a repository (clone, pull): nothing of ours to validate",
    "cd": "changes directory only",
    "export": "sets an environment variable only",
    "srun": "needs a SLURM cluster (its payload, launch/run.sh, is checked via sbatch)",
}
CONSOLE_SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("scripts", {})
OPERATORS = {"|", "||", "&&", ";", "&"}
REDIRECTS = {">", ">>", "<", ">&", "&>", "2>"}


@dataclass(frozen=True)
class Command:
    where: str  # doc:line
    words: tuple[str, ...]
    complete: bool  # a fenced command to run as written; False: a mention in prose (checked with --help)

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def _split(line: str) -> list[list[str]]:
    """Shell words of one line, as separate commands at | && ; (redirections and VAR=value dropped)."""
    line = re.sub(r"\[(--[^\[\]]*)\]", r"\1", line)  # "[--tp 2]" documents an optional argument: check it too
    line = re.sub(r"\$\([^()]*\)|\$\{?\w+\}?", "1", line)  # a value the shell computes ($(nproc), $N): 1
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, skip = [], [], False
    for w in lexer:
        if skip:
            skip = False
        elif w in OPERATORS:
            commands.append(words)
            words = []
        elif w in REDIRECTS:
            skip = True
        elif not words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", w):
            continue
        else:
            words.append(w)
    return [c for c in commands + [words] if c]


def _known_program(word: str) -> bool:
    return (word in ("python", "python3", "torchrun", "make", "sbatch", "bash") or word in CONSOLE_SCRIPTS
            or word.endswith(("/python", "/python3", "/torchrun")) or _is_launcher(word))


def _is_launcher(word: str) -> bool:
    return word.endswith((".sh", ".sbatch")) and (ROOT / word).is_file()


def documented_commands() -> list[Command]:
    found: dict[tuple, Command] = {}

    def add(where: str, text: str, every_line: bool, in_block: bool = True) -> None:
        try:
            commands = _split(text)
        except ValueError as e:  # unbalanced quotes: output or prose, unless it is in a shell block
            if every_line:
                raise ValueError(f"{where}: {e}: {text}") from None
            return
        for words in commands:
            if not words:
                continue
            if every_line or (_known_program(words[0]) and not (words[0] == "torchrun" and "-m" not in words)):
                found.setdefault((tuple(words), in_block), Command(where, tuple(words), complete=in_block))

    for doc in DOCS:
        lines = doc.read_text().splitlines()
        lang, pending, i = None, "", 0
        for n, raw in enumerate(lines, 1):
            if raw.startswith("```"):
                lang = raw[3:].strip().lower() if lang is None else None
                continue
            where = f"{doc.relative_to(ROOT)}:{n}"
            if lang is None:  # prose: inline code spans (torchrun fragments without a program are prose)
                for span in re.findall(r"`([^`]+)`", raw):
                    add(where, span, every_line=False, in_block=False)
                continue
            if lang in CODE_BLOCKS:
                continue
            text = raw.strip()
            text = text[2:] if text.startswith("$ ") else text
            if text.endswith("\\"):
                pending += text[:-1] + " "
                continue
            text, pending = pending + text, ""
            if text and not text.startswith("#"):
                add(where, text, every_line=lang in SHELL_BLOCKS)
    return list(found.values())


def _run(argv: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def _deadline(seconds: int, what: str):
    """A program that ignores --help would start its real work: stop it instead of hanging the suite."""
    def expire(*_):
        raise TimeoutError(f"{what} did not answer --help within {seconds} s (does it parse its arguments?)")

    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _exit_code(call, argv0: str, args: list[str]) -> tuple[object, str]:
    """Run ``call()`` in this process with ``sys.argv = [argv0, *args]``; its exit code and output."""
    out = io.StringIO()
    saved = sys.argv
    sys.argv = [argv0, *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = call()
    except SystemExit as e:  # argparse's --help and its errors
        code = e.code
    finally:
        sys.argv = saved
    return code, out.getvalue()


def _check_help(call, argv0: str, args: list[str]) -> None:
    """``args`` plus --help must print a usage and exit 0: the program parsed every option before it."""
    with _deadline(60, argv0):
        code, out = _exit_code(call, argv0, args + ["--help"])
    assert code in (0, None) and "usage" in out.lower(), f"{argv0} {shlex.join(args)} --help failed ({code}):\n{out}"


OUR_PACKAGES = {"launch", "mano_dist", "tests"}


def _check_module_help(module: str, args: list[str]) -> None:
    if module.split(".")[0] not in OUR_PACKAGES:
        # Another project's program in its own process: importing pip here turned off setuptools'
        # distutils shim for the rest of this worker, so a later torch.compile in it (the fused
        # CPU step's test) could not build its kernels.
        r = _run([sys.executable, "-m", module, *args, "--help"], timeout=60)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), \
            f"python -m {module} {shlex.join(args)} --help failed ({r.returncode}):\n{r.stdout}{r.stderr}"
        return

    def run():
        with warnings.catch_warnings():  # runpy warns when the module was imported before (by another check)
            warnings.simplefilter("ignore", RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)

    _check_help(run, module, args)


def _check_main(module: str, args: list[str]) -> None:
    code, out = _exit_code(lambda: importlib.import_module(module).main(args), module, args)
    assert code in (0, None), f"python -m {module} {shlex.join(args)} exited {code}:\n{out}"


def check_module(module: str, args: list[str], complete: bool = True) -> None:
    """``complete``: a command to run as written; else a mention in prose (checked with --help)."""
    if module == "launch.train" and complete:
        _check_main(module, args + ["--check"])
    elif module == "launch.plan" and complete:
        _check_main(module, args)
    elif module == "pytest":
        paths = [a.split("::")[0] for a in args if not a.startswith("-") and "/" in a]
        assert all((ROOT / p).exists() for p in paths), f"pytest paths missing: {paths}"
    else:
        _check_module_help(module, args)


def check_python(words: list[str], complete: bool = True) -> None:
    if words[1:2] == ["-m"]:
        check_module(words[2], words[3:], complete)
    else:
        assert (ROOT / words[1]).is_file(), f"no script {words[1]}"
        _check_help(lambda: runpy.run_path(str(ROOT / words[1]), run_name="__main__"), words[1], words[2:])


def check_torchrun(words: list[str], complete: bool = True) -> None:
    from torch.distributed.run import get_args_parser

    args = get_args_parser().parse_args(words[1:])  # torchrun's own options, as torchrun parses them
    assert args.module, f"torchrun without -m: {words}"
    check_module(args.training_script, list(args.training_script_args), complete)


def forwarded_module(script: Path) -> str:
    """The Python module a launcher script hands its arguments to (following scripts it calls)."""
    text = script.read_text()
    if m := re.search(r'-m\s+([\w.]+)\s+"\$@"', text):
        return m.group(1)
    m = re.search(r'(\S+\.sh)\s+"\$@"', text)
    assert m, f"{script.name} forwards its arguments to no module"
    return forwarded_module(ROOT / m.group(1))


def check_script(script: str, args: list[str]) -> None:
    path = ROOT / script
    assert path.is_file(), f"no script {script}"
    r = _run(["bash", "-n", str(path)])
    assert r.returncode == 0, f"{script}: bash syntax error:\n{r.stderr}"
    check_module(forwarded_module(path), args)


def check_make(words: list[str]) -> None:
    r = _run(["make", "-n", *words[1:]])
    assert r.returncode == 0, f"make -n {' '.join(words[1:])}:\n{r.stderr}"
    for line in r.stdout.splitlines():  # the recipe's Python commands, checked like documented ones
        for recipe in _split(line):
            if recipe and recipe[0].endswith(("python", "python3", "torchrun")):
                check(recipe)


def check(words: list[str], complete: bool = True) -> None:
    head = words[0]
    if head in NOT_RUNNABLE:
        return
    if head in ("python", "python3") or head.endswith(("/python", "/python3")):
        check_python(words, complete)
    elif head == "torchrun" or head.endswith("/torchrun"):
        check_torchrun(words, complete)
    elif head == "make":
        check_make(words)
    elif head == "sbatch":
        i = next(i for i, w in enumerate(words) if (ROOT / w).is_file())  # sbatch's own options come first
        check_script(words[i], words[i + 1:])
    elif head == "bash":
        check_script(words[1], words[2:])
    elif head in CONSOLE_SCRIPTS:
        module, func = CONSOLE_SCRIPTS[head].split(":")
        _check_help(lambda: getattr(importlib.import_module(module), func)(), head, words[1:])
    elif _is_launcher(head):
        check_script(head, words[1:])
    else:
        pytest.fail(f"unknown program {head!r}: teach tests/test_docs_commands.py to check it, or add it "
                    f"to NOT_RUNNABLE with the reason it cannot be checked")


COMMANDS = documented_commands()


def test_the_docs_show_commands():
    """The parser finds the commands we know are there (a broken parser must not pass vacuously)."""
    text = [shlex.join(c.words) for c in COMMANDS]
    assert len(COMMANDS) >= 20
    assert any("launch.train" in t and "parallel.tp=2" in t for t in text)
    assert any(t.startswith("sbatch") for t in text) and any(t.startswith("make bench") for t in text)


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command(command: Command, monkeypatch):
    monkeypatch.chdir(ROOT)
    check(list(command.words), command.complete)


@pytest.mark.parametrize("words, message", [
    (["python", "-m", "launch.train", "--config", "configs/llama_1b.toml", "--set", "parallel.tp=3"], "must"),
    (["python", "-m", "launch.train", "--config", "configs/nope.toml"], "does not exist"),
    (["make", "no-such-target"], "make -n"),
    (["python", "-m", "mano_dist.bench", "step", "--model", "7b"], "--help failed"),
    (["frobnicate", "--all"], "unknown program"),
])
def test_a_broken_command_fails(words, message, monkeypatch):
    """The checks are not vacuous: a wrong config, target, option value or program fails."""
    monkeypatch.chdir(ROOT)
    with pytest.raises((AssertionError, pytest.fail.Exception), match=message):
        check(words)


def test_relative_links_stay_inside_the_repository_and_exist():
    """A link to a file outside the repository (or to a missing one) breaks on every clone."""
    bad = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same page
            path = (doc.parent / target.split("#")[0]).resolve()
            if ROOT not in path.parents or not path.exists():
                bad.append(f"{doc.relative_to(ROOT)}: {target}")
    assert not bad, bad
