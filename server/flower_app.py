"""A Flower app directory made from the installed package, for `flwr run DIR` without the source checkout.

`flwr run` takes a directory holding a pyproject.toml with `[tool.flwr.app]` and bundles the code it names
(the FAB) for the SuperLink and SuperNodes. In the checkout that directory is the repository itself; an
installed posettp has no such directory, so `posettp flower-app --out DIR` writes one: the packages the
ServerApp and ClientApp import, the shipped configs, and a pyproject.toml whose run config defaults are
`FLSettings`'. The checkout's own pyproject.toml states the same app (tests hold the two together).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import shutil
from pathlib import Path

from .fl import FLSettings

# What the app bundle carries: code and configs only (checkpoints travel as arrays, data stays on the nodes).
APP_PACKAGES = ("model", "data", "core", "store", "training", "client", "server")
FAB_INCLUDE = [*(f"{p}/**/*.py" for p in APP_PACKAGES), "configs/*.yaml"]
COMPONENTS = {"serverapp": "server.fl:app", "clientapp": "client.app:app"}


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_config_defaults() -> dict:
    """The run config's keys (dashed) and defaults, as `FLSettings` states them."""
    return {f.name.replace("_", "-"): f.default for f in dataclasses.fields(FLSettings)}


def pyproject_text(version: str) -> str:
    lines = ["[project]", 'name = "posettp-flower-app"', f'version = "{version}"',
             "dependencies = []  # the SuperLink and SuperNodes have posettp installed", "",
             "[tool.flwr.app]", 'publisher = "posettp"',
             "fab-include = [" + ", ".join(_toml_value(p) for p in FAB_INCLUDE) + "]", "",
             "[tool.flwr.app.components]", *(f"{k} = {_toml_value(v)}" for k, v in COMPONENTS.items()), "",
             "[tool.flwr.app.config]", *(f"{k} = {_toml_value(v)}" for k, v in run_config_defaults().items())]
    return "\n".join(lines) + "\n"


def write_app(out: Path) -> Path:
    """Write the app directory (refusing one that is not empty); returns it."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty: choose a new directory for the Flower app")
    out.mkdir(parents=True, exist_ok=True)
    for name in (*APP_PACKAGES, "configs"):
        src = Path(importlib.import_module(name).__file__).parent
        shutil.copytree(src, out / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    (out / "pyproject.toml").write_text(pyproject_text(importlib.metadata.version("posettp")))
    return out


def main(args) -> int:
    out = write_app(Path(args.out))
    print(f"Flower app written to {out}\n"
          f"  simulation: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 flwr run {out} --stream "
          f"--federation-config 'num-supernodes=4' --run-config \"base-checkpoint='/abs/ck' data='/abs/shards'\"\n"
          f"  deployment: flwr run {out} FEDERATION --stream --run-config \"base-checkpoint='/abs/ck' ...\"")
    return 0
