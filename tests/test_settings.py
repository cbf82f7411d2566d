"""Settings stay readable and single-sourced: one coercion helper, help on every field, Flower's run-config defaults
equal to FLSettings', and docs/settings.md regenerated whenever a setting changes."""
import dataclasses
import tomllib
from pathlib import Path

import pytest

from model.config import (Config, ConfigError, TTPConfig, apply_overrides, from_dict, help_of, is_research,
                          load_config, settings_from_mapping)
from posettp import settings_doc
from server.fl import FLSettings
from server.serve import ServeSettings

REPO = Path(__file__).resolve().parent.parent


def config_fields():
    cfg = Config()
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            yield from ((f"{f.name}.{g.name}", g) for g in dataclasses.fields(value))
        else:
            yield f.name, f


def test_flower_run_config_defaults_match_fl_settings():
    toml = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(FLSettings)}
    assert sorted(set(toml) - set(fields)) == [], "in pyproject.toml, not in FLSettings"
    assert sorted(set(fields) - set(toml)) == [], "in FLSettings, not in pyproject.toml"
    for key, f in fields.items():
        assert type(toml[key]) is type(f.default) and toml[key] == f.default, \
            f"{key}: pyproject.toml has {toml[key]!r}, FLSettings {f.default!r}"
    # and the run config Flower builds from those defaults is accepted as it is, once the checkpoint is named
    s = FLSettings.from_run_config({**toml, "base-checkpoint": "/abs/ck"})
    assert dataclasses.replace(s, base_checkpoint="") == FLSettings()


def test_flower_app_written_for_an_installed_package_is_the_checkout_s_app(tmp_path):
    """`posettp flower-app` states the same app as the checkout's pyproject.toml: components, bundle, defaults."""
    from server.flower_app import write_app

    ours = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    app = write_app(tmp_path / "app")
    doc = tomllib.loads((app / "pyproject.toml").read_text())
    theirs = doc["tool"]["flwr"]["app"]
    assert theirs["components"] == ours["components"] and theirs["fab-include"] == ours["fab-include"]
    assert theirs["config"] == ours["config"]
    assert doc["project"]["name"] and doc["project"]["version"]
    for component in theirs["components"].values():
        module = component.split(":")[0].replace(".", "/") + ".py"
        assert (app / module).is_file(), module
    assert (app / "configs" / "synth_small.yaml").is_file() and not list(app.rglob("__pycache__"))
    with pytest.raises(ValueError, match="not empty"):
        write_app(app)


def test_docs_settings_md_is_generated_from_the_code():
    assert (REPO / "docs" / "settings.md").read_text() == settings_doc.render(), \
        "docs/settings.md is stale: run `python -m posettp.settings_doc --write`"


def test_every_setting_says_what_it_does():
    keys = dict(config_fields())
    missing = [k for k, f in keys.items() if not help_of(f)]
    missing += [f"FLSettings.{f.name}" for f in dataclasses.fields(FLSettings) if not help_of(f)]
    missing += [f"ServeSettings.{f.name}" for f in dataclasses.fields(ServeSettings) if not help_of(f)]
    assert missing == []
    assert "ttp.optimizer" not in keys  # dead (Adam is hard-coded): gone
    research = {k for k, f in keys.items() if is_research(f)}
    assert {"ttp.pseudo_label_weight", "ttp.pseudo_label_agreement", "ttp.flip_weight", "ttp.drift_steps",
            "model.warp_sigma", "data.cross_video"} <= research
    assert not research & {"model.variant", "model.backbone", "model.image_size", "train.max_steps", "ttp.lr",
                           "ttp.steps", "ttp.iters", "data.url"}
    # paper first, research after, within every section
    for section in ("model", "loss", "data", "train", "ttp"):
        flags = [is_research(f) for k, f in keys.items() if k.startswith(section + ".")]
        assert flags == sorted(flags), section


def test_unknown_key_is_refused_naming_a_candidate():
    with pytest.raises(ConfigError, match=r"unknown setting: pseudo_label_wieght \(did you mean pseudo_label_weight"):
        settings_from_mapping(TTPConfig, {"pseudo_label_wieght": 300})
    with pytest.raises(ConfigError, match=r"unknown config key: ttp.pseudo_label_wieght \(did you mean "
                                          r"ttp.pseudo_label_weight"):
        load_config("configs/synth_small.yaml", ["ttp.pseudo_label_wieght=300"])
    with pytest.raises(ValueError, match=r"unknown run-config key: node-wiat \(did you mean node-wait\?\)"):
        FLSettings.from_run_config({"base-checkpoint": "/abs/ck", "node-wiat": 3})
    with pytest.raises(ValueError, match=r"unknown serve setting: lru \(did you mean lru_size\?\)"):
        ServeSettings.from_args({"checkpoint": "a", "store": "b", "lru": 3})


def test_one_helper_coerces_by_annotation():
    ttp = settings_from_mapping(TTPConfig, {"steps": "30", "lr": "1e-5", "guard": "off", "adapt": "[encoder]",
                                            "drift_steps": 20, "reset_every": 40.0})
    assert (ttp.steps, ttp.lr, ttp.guard, ttp.adapt, ttp.drift_steps, ttp.reset_every) == \
        (30, 1e-5, False, ["encoder"], 20.0, 40)
    assert type(ttp.drift_steps) is float and type(ttp.reset_every) is int
    for bad, match in (({"steps": "1.5"}, "expected an integer"), ({"guard": "maybe"}, "expected true or false"),
                       ({"lr": True}, "expected a number"), ({"amp": False}, "quote it in YAML")):
        with pytest.raises(ConfigError, match=match):
            settings_from_mapping(TTPConfig, bad)
    cfg = load_config("configs/synth_small.yaml", ["ttp.pseudo_label_weight=300", "train.lr_steps=[0.5, 0.9]"])
    assert cfg.ttp.pseudo_label_weight == 300.0 and cfg.train.lr_steps == [0.5, 0.9]
    s = FLSettings.from_run_config({"base-checkpoint": "/abs/ck", "ttp-steps": "5", "fedavg-base": "true",
                                    "node-wait": 3})
    assert (s.ttp_steps, s.fedavg_base, s.node_wait) == (5, True, 3.0) and type(s.node_wait) is float


def test_retired_optimizer_key():
    """Configs written before `ttp.optimizer` went (checkpoints, docs/reproduce) still load; new ones may not set it."""
    old = Config().to_dict()
    old["ttp"]["optimizer"] = "adam"
    assert from_dict(old).ttp.lr == TTPConfig().lr
    with pytest.raises(ConfigError, match="ttp.optimizer is no longer a setting"):
        apply_overrides(Config(), ["ttp.optimizer=sgd"])
