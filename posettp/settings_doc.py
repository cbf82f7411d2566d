"""The settings reference (docs/settings.md), generated from the settings dataclasses themselves.

`python -m posettp.settings_doc` prints it; `--write` rewrites docs/settings.md. tests/test_settings.py fails when
the file and the code disagree, so a changed setting comes with a regenerated reference.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from pathlib import Path

from model.config import Config, help_of, is_research
from server.fl import FLSettings
from server.serve import ServeSettings

DOC = Path(__file__).resolve().parent.parent / "docs" / "settings.md"


def _type_name(kind) -> str:
    return kind.__name__ if isinstance(kind, type) and not typing.get_args(kind) else str(kind)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table(cls: type, fields: list[dataclasses.Field], key=lambda name: name) -> list[str]:
    hints = typing.get_type_hints(cls)
    lines = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    for f in fields:
        lines.append(f"| `{key(f.name)}` | {_type_name(hints[f.name])} | `{_cell(json.dumps(_default(f)))}` "
                     f"| {_cell(help_of(f))} |")
    return lines


def render() -> str:
    out = ["# Settings reference", "",
           "Generated from the settings dataclasses by `python -m posettp.settings_doc --write`; do not edit by hand.",
           "", "## Config", "",
           "YAML files under `configs/` (`--config NAME` from any directory, or a path) and `--set section.key=value` "
           "on every command "
           "with `--config`; unknown keys are errors. In each section the paper's settings (and the plumbing "
           "that runs them) come first, then the research knobs that go beyond the paper (`research` in the "
           "field's metadata, `model/config.py`).", ""]
    cfg = Config()
    top = [f for f in dataclasses.fields(Config) if not dataclasses.is_dataclass(getattr(cfg, f.name))]
    out += ["### Top level", "", *table(Config, top), ""]
    for section in dataclasses.fields(Config):
        value = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(value):
            continue
        fields = dataclasses.fields(value)
        paper = [f for f in fields if not is_research(f)]
        research = [f for f in fields if is_research(f)]
        out += [f"### `{section.name}`", ""]
        for title, group in (("The paper's settings", paper), ("Research settings (beyond the paper)", research)):
            if group:
                out += [f"{title}:", "", *table(type(value), group, lambda name: f"{section.name}.{name}"), ""]
    out += ["## Flower run config", "",
            "`[tool.flwr.app.config]` in `pyproject.toml` (the same defaults as `server.fl.FLSettings`); override "
            "with `flwr run . --run-config 'key=value'`.", "",
            *table(FLSettings, dataclasses.fields(FLSettings), lambda name: name.replace("_", "-")), ""]
    out += ["## Serve settings", "",
            "The `args` of `configs/serve.yaml` (`server.serve.ServeSettings`); also `serve run "
            "server.serve:build_app key=value`.", "",
            *table(ServeSettings, dataclasses.fields(ServeSettings)), ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m posettp.settings_doc", description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {DOC.relative_to(DOC.parent.parent)}")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        DOC.write_text(text)
        print(f"wrote {DOC}")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
