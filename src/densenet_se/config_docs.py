"""docs/config-reference.md from the commented YAML files of conf/: `python -m densenet_se.config_docs`.

The comment lines directly above a key are its documentation, so the key tables live once, in conf/, and this
page is generated from them (tests/test_config_docs.py fails when it is stale). A small line-based reader, not
a YAML library: the conf files are `# comment` lines, then `key: value`, nested maps indented.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = Path("docs") / "config-reference.md"
PRIMARIES = ("train", "eval", "predict", "export")
# Hydra's own settings (run directories, logging, launchers): not keys a user sets per run.
SKIPPED_GROUPS = ("hydra",)
KEY = re.compile(r"^(?P<indent> *)(?P<key>[^\s#:-][^:]*?):(?: +(?P<value>.*))?$")
ITEM = re.compile(r"^ +- +(?:override +)?(?P<item>.+)$")


@dataclass
class Entry:
    """One key of a conf file: its full config path, its value as written ("" for a map) and its comment."""

    path: str
    key: str
    value: str
    comment: str


@dataclass
class ConfFile:
    """A parsed conf file: what it is (header), what its defaults list picks, its keys in order."""

    name: str
    header: str = ""
    defaults: list[str] = field(default_factory=list)
    entries: list[Entry] = field(default_factory=list)

    def values(self) -> dict[str, str]:
        return {e.path: e.value for e in self.entries}


def parse(path: Path, group: str | None) -> ConfFile:
    """Read one conf file; keys get `group.` in front unless the file is a primary or `@package _global_`."""
    lines = path.read_text().splitlines()
    prefix = "" if group is None or "# @package _global_" in lines[:1] else group + "."
    conf = ConfFile(path.stem)
    comment: list[str] = []
    stack: list[tuple[int, str]] = []
    in_defaults = skipping = False
    seen_key = False
    for line in lines:
        if line.startswith("# @package"):
            continue
        if not line.strip():
            if not seen_key and comment and not conf.header:
                conf.header = " ".join(comment)
            comment = []
            continue
        if line.lstrip().startswith("#"):
            comment.append(line.strip().lstrip("#").strip())
            continue
        item = ITEM.match(line)
        if in_defaults and item:
            conf.defaults.append(item.group("item").strip())
            comment = []
            continue
        match = KEY.match(line)
        if not match:
            raise ValueError(f"{path}: cannot read the line {line!r}")
        indent, key, value = len(match.group("indent")), match.group("key"), match.group("value") or ""
        if indent == 0 and not seen_key and comment and not conf.header and key == "defaults":
            conf.header = " ".join(comment)
        in_defaults = indent == 0 and key == "defaults"
        if indent == 0:
            skipping = in_defaults or (group is None and key == "hydra")
        if skipping:
            comment = []
            continue
        seen_key = True
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key))
        path = prefix + ".".join(k for _, k in stack)
        conf.entries.append(Entry(path, key, value, " ".join(comment)))
        comment = []
    return conf


def parent(conf: ConfFile, options: set[str]) -> str | None:
    """The file of the same group this one builds on (`- none`, `- default@trainer`), if any."""
    names = [d.split("@")[0] for d in conf.defaults if ":" not in d and d.split("@")[0] in options]
    return names[0] if len(names) == 1 else None


def picks(conf: ConfFile) -> list[str]:
    """What a defaults list chooses: `data=imagefolder`, `model=densenet_tiny_se` (not schemas or hydra)."""
    out = []
    for item in conf.defaults:
        name, _, choice = item.partition(":")
        name, choice = name.strip().lstrip("/"), choice.strip()
        if choice and choice != "null" and not name.startswith("hydra"):
            out.append(f"{name}={choice}")
    return out


def load(conf_dir: Path) -> tuple[dict[str, ConfFile], dict[str, dict[str, ConfFile]]]:
    """The primary configs and, per group, its option files, parsed."""
    primaries = {name: parse(conf_dir / f"{name}.yaml", None) for name in PRIMARIES}
    groups = {}
    for folder in sorted(p for p in conf_dir.iterdir() if p.is_dir() and p.name not in SKIPPED_GROUPS):
        files = sorted(folder.glob("*.yaml"))
        groups[folder.name] = {p.stem: parse(p, folder.name) for p in files}
    return primaries, groups


def undocumented_keys(conf_dir: Path) -> list[str]:
    """Keys commented neither in their file nor where else they are set; a `_target_`'s arguments, a group's
    name (`data:` in an experiment) and a key naming a documented key (a search space's `optim.lr`) aside."""
    primaries, groups = load(conf_dir)
    files = [(f"{n}.yaml", c) for n, c in primaries.items()]
    files += [(f"{g}/{n}.yaml", c) for g, options in groups.items() for n, c in options.items()]
    documented = {e.path for _, conf in files for e in conf.entries if e.comment}
    documented |= {*groups, *SKIPPED_GROUPS}
    out = []
    for name, conf in files:
        targets = {e.path.rpartition(".")[0] for e in conf.entries if e.path.endswith("._target_")}
        for e in conf.entries:
            if not {e.path, e.key} & documented and e.path.rpartition(".")[0] not in targets:
                out.append(f"conf/{name}: {e.path}")
    return out


def _cell(text: str) -> str:
    """Comment text in a table cell: `|` ends a cell, and `<run dir>` would be read as an HTML tag."""
    parts = text.replace("|", "\\|").split("`")
    return "`".join(part if i % 2 else part.replace("<", "&lt;") for i, part in enumerate(parts))


def _code(value: str) -> str:
    return "`" + value.replace("|", "\\|") + "`" if value else ""


def _table(files: list[ConfFile], resolved: list[dict[str, str]]) -> list[str]:
    """One row per key: its value in each file (side by side) and the comments above it."""
    rows: dict[str, list[tuple[str, str]]] = {}
    for conf in files:
        for e in conf.entries:
            notes = rows.setdefault(e.path, [])
            if e.comment and e.comment not in [comment for _, comment in notes]:
                notes.append((f"*{conf.name}*: " if notes else "", e.comment))
    head = ["key", *(f"`{c.name}`" for c in files)] if len(files) > 1 else ["key", "value"]
    out = ["| " + " | ".join([*head, "meaning"]) + " |", "|" + "---|" * (len(head) + 1)]
    for path, notes in rows.items():
        if not notes and not any(v.get(path) for v in resolved):
            continue  # a bare map (`data:` above the data keys an experiment sets)
        values = [_code(v[path]) if path in v else "–" for v in resolved]
        meaning = " ".join(who + comment for who, comment in notes)
        out.append("| " + " | ".join([f"`{path}`", *values, _cell(meaning)]) + " |")
    return out


def _family_section(files: list[ConfFile], group: str, parents: dict[str, str | None]) -> list[str]:
    resolved: dict[str, dict[str, str]] = {}
    for conf in files:  # parents come first in `files`
        base = parents[conf.name]
        resolved[conf.name] = {**(resolved[base] if base else {}), **conf.values()}
    out = []
    for conf in files:
        base, chosen = parents[conf.name], picks(conf)
        notes = ([f"builds on `{base}`"] if base else []) + ([f"picks {', '.join(chosen)}"] if chosen else [])
        line = f"- `{group}={conf.name}` (`conf/{group}/{conf.name}.yaml`)"
        line += f"{': ' + _cell(conf.header) if conf.header else ''}{' (' + '; '.join(notes) + ')' if notes else ''}"
        out.append(line)
    if any(c.entries for c in files):
        out += ["", *_table(files, [resolved[c.name] for c in files])]
    return out


def _group_section(group: str, options: dict[str, ConfFile]) -> list[str]:
    names = set(options)
    parents = {name: parent(conf, names) for name, conf in options.items()}

    def root(name: str) -> str:
        return name if parents[name] is None else root(parents[name])

    def depth(name: str) -> int:
        return 0 if parents[name] is None else 1 + depth(parents[name])

    families: dict[str, list[str]] = {}
    for name in sorted(options, key=lambda n: (depth(n), n)):
        families.setdefault(root(name), []).append(name)
    out = [f"## {group}", "", f"Choose a file with `{group}=NAME`: {', '.join(f'`{n}`' for n in options)}."]
    for family_root in sorted(families):
        members = families[family_root]
        if len(families) > 1:
            out += ["", f"### {group}={', '.join(members)}"]
        out += ["", *_family_section([options[n] for n in members], group, parents)]
    return out


def render(conf_dir: Path) -> str:
    """The whole page, from the files in `conf_dir`."""
    primaries, groups = load(conf_dir)
    out = [
        "# Configuration reference",
        "",
        "Generated by `python -m densenet_se.config_docs` from conf/; do not edit by hand.",
        "",
        "Every key of `conf/` with its value and the comment written above it in the YAML file. Override a key "
        "on the command line (`python train.py data.image_size=128`) or choose another file of a group "
        "(`python train.py model=densenet_tiny_se`). Side-by-side tables show the value each file of a "
        "group gives (a file that builds on another inherits its values); `–` means the file does not set "
        "the key. Hydra's own settings (`conf/hydra/`: run directories, logging, the SLURM launcher) are "
        "commented in their files.",
        "",
        "## Commands",
    ]
    for name, conf in primaries.items():
        chosen = picks(conf)
        out += ["", f"### {name}.yaml", "", _cell(conf.header)]
        if chosen:
            out += ["", f"Defaults: {', '.join(f'`{c}`' for c in chosen)}."]
        out += ["", *_table([conf], [conf.values()])]
    for group, options in groups.items():
        out += ["", *_group_section(group, options)]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write docs/config-reference.md of the repository."""
    del argv
    (ROOT / PAGE).write_text(render(ROOT / "conf"))
    print(f"wrote {PAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
