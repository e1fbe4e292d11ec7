"""Every surface that names a command, preset, flag or path says what is true: the commands suggested by the
README, the docs, the help texts, the library's messages and the scripts are accepted by the CLI's parser; the
presets listed in --help and in the README's table come from the preset table, sizes and tokens included; the
paths the README names exist."""

from __future__ import annotations

import argparse
import ast
import re
import shlex
from pathlib import Path

import pytest

from mhmoe.cli.main import build_parser
from mhmoe.training.presets import PRESETS, describe_preset, preset_names

ROOT = Path(__file__).resolve().parents[2]
# Words that stand for a value the reader fills in: RUN, OUT, N, DIR, {preset}, ~/x, ...
PLACEHOLDER = re.compile(r"^([A-Z][A-Z0-9_]*|\{[^}]*\}|\.\.\.|<[^>]*>)$")


def _sources() -> dict[str, str]:
    """Text of every file whose commands are checked: README, docs, benchmarks, scripts, Makefile, the package."""
    files = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "benchmarks").glob("*.md")), *sorted((ROOT / "benchmarks").glob("*.sh")),
             *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "scripts").glob("*.py"))]
    out = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in files if p.is_file()}
    for p in sorted((ROOT / "mhmoe").rglob("*.py")):
        out[str(p.relative_to(ROOT))] = "\n".join(_string_constants(p))
    return out


def _string_constants(path: Path) -> list[str]:
    """The string literals of a module, f-strings with their {fields} kept as placeholders."""
    texts = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            texts.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            texts.append("".join(v.value if isinstance(v, ast.Constant) else "{x}" for v in node.values))
    return texts


def suggested_commands() -> list[tuple[str, str]]:
    """(where, command) for every `mhmoe ...` in backticks and every code line that runs mhmoe (after any
    VAR=value assignments, or as `python -m mhmoe.cli` / `torchrun ... -m mhmoe.cli`); `a|b` alternatives apart."""
    found = []
    for where, text in _sources().items():
        for m in re.finditer(r"`(mhmoe [^`\n]+)`", text):
            found.append((where, m.group(1)))
        for line in text.replace("\\\n", " ").splitlines():
            line = line.strip()
            m = (re.match(r"^(?:[A-Z_]+=\S+\s+)*(?:\S*/)?mhmoe\s+([a-z].*)$", line)
                 or re.search(r"-m mhmoe\.cli\s+([a-z].*)$", line))
            if m and "`" not in line:
                found.append((where, "mhmoe " + m.group(1)))
    out = []
    for where, command in found:
        words = command.split()
        if len(words) > 1 and words[1].endswith(":"):  # "mhmoe train: error: ...": a message's prefix
            continue
        alternatives = [w.split("|") if "|" in w and not w.startswith(("-", "|")) else [w] for w in words]
        for i, alts in enumerate(alternatives):
            if len(alts) > 1:
                out += [(where, " ".join(words[:i] + [a] + words[i + 1:])) for a in alts]
                break
        else:
            out.append((where, command))
    return out


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def check_command(command: str) -> None:
    """Raise AssertionError unless `command` names real subcommands, real flags and valid choices."""
    first, _, rest = command.partition(" && ")
    if rest.strip().startswith("mhmoe "):
        check_command(rest)
    command = re.split(r"\s(?:\||;|#|>|2>)\s?", " " + first.strip() + " ")[0].strip()
    words = shlex.split(command.replace("[", " ").replace("]", " "), posix=True)
    assert words and words[0] == "mhmoe", command
    parser, i = build_parser(), 1
    while i < len(words) and _subparsers(parser) and not words[i].startswith("-"):
        subs = _subparsers(parser)
        assert words[i] in subs, f"{command!r}: {words[i]!r} is no subcommand (choose from {', '.join(subs)})"
        parser, i = subs[words[i]], i + 1
    options = parser._option_string_actions
    while i < len(words):
        w = words[i]
        i += 1
        if not w.startswith("-") or PLACEHOLDER.match(w):
            continue
        flag, _, inline = w.partition("=")
        assert flag in options, f"{command!r}: {flag} is not a flag of `{parser.prog}`"
        action = options[flag]
        if action.nargs == 0:
            continue
        value = inline or (words[i] if i < len(words) else "")
        if not value or value.startswith("-"):  # a list of flags ("mhmoe train --dp --ep"), not a value
            continue
        i += 0 if inline else 1
        if PLACEHOLDER.match(value) or "{" in value:
            continue
        if action.choices is not None:
            assert value in action.choices, f"{command!r}: {flag} {value!r} is not one of {list(action.choices)}"
        if flag == "--preset":
            assert value in PRESETS, f"{command!r}: --preset {value!r} is not one of {', '.join(PRESETS)}"
        if action.type is int:
            int(value)


def test_the_checker_catches_what_it_should():  # negative controls: a checker that passes everything is no test
    for bad in ("mhmoe bench train --dtypez float32", "mhmoe trian --preset demo", "mhmoe train --preset huge",
                "mhmoe train --dp gloo", "mhmoe bench layers --tokens many",
                "mhmoe train --preset demo --out x && mhmoe eval x --stp 3"):
        with pytest.raises((AssertionError, ValueError)):
            check_command(bad)
    check_command("mhmoe eval RUN [--step N] [--json]")
    check_command("mhmoe train --preset cpu --model smoe --out runs/x --set seed=3 && mhmoe eval runs/x")


def test_every_suggested_command_is_accepted_by_the_parser():
    commands = suggested_commands()
    assert len(commands) > 100  # README, docs, help texts, messages and scripts all found
    bad = []
    for where, command in commands:
        try:
            check_command(command)
        except (AssertionError, ValueError) as e:
            bad.append(f"{where}: {e}")
    assert not bad, "\n".join(bad)


def test_help_texts_list_every_preset():
    assert preset_names() == ", ".join(list(PRESETS)[:-1]) + " or " + list(PRESETS)[-1]
    parser = build_parser()
    subs = _subparsers(parser)
    for path in (["train"], ["reproduce"], ["memory"], ["bench", "train"], ["data", "prepare"]):
        p = parser
        for name in path:
            p = _subparsers(p)[name] if p is not parser else subs[name]
        help_text = p._option_string_actions["--preset"].help
        assert help_text.startswith(preset_names()), (path, help_text)


def readme_presets_table() -> dict[str, list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Presets and variants"):]
    rows = {}
    for line in section.splitlines()[2:]:
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def test_readme_presets_table_comes_from_the_presets():
    rows = readme_presets_table()
    assert list(rows) == list(PRESETS)
    for name, (scale, tokens, _where) in rows.items():
        assert (scale, tokens) == describe_preset(name), f"README row of `{name}`: {scale} | {tokens}"


def test_paths_named_by_the_readme_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`((?:mhmoe|benchmarks|docs|tests|scripts)/[\w./-]+)`", text))
    assert named, "the README names no path: the pattern is stale"
    missing = sorted(p for p in named if not (ROOT / p.rstrip("/")).exists())
    assert not missing, missing


def test_readme_test_command_is_the_makefiles():
    """`make test` and the command the README gives for it are the same (CI runs `make test`)."""
    recipe = (ROOT / "Makefile").read_text(encoding="utf-8").split("\ntest: venv\n\t", 1)[1].split("\n", 1)[0]
    readme = re.search(r"^make test +# the test suite: (.+)$", (ROOT / "README.md").read_text(encoding="utf-8"), re.M)
    assert readme and readme.group(1) == recipe.replace("$(PY)", ".venv/bin/python"), (recipe, readme)
