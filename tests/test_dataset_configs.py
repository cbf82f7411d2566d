"""Every dataset's config runs end to end on its importer's fixture: `posettp import`, the training driver's checks,
a few training steps (small backbone and crop through --set, as a user would on a CPU), a checkpoint that carries
the joint set, and `posettp evaluate` in that dataset's metric. A model and data with different joint sets are
refused before any work, in one line naming both."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from data.shards import load_frames, read_joint_set
from model.checkpoint import load_checkpoint, save_checkpoint
from model.joints import dataset_joint_set
from posettp.cli import main as cli
from tests.fixtures_datasets import write_bbc, write_h36m, write_penn
from tests.fixtures_posetrack import write_posetrack
from tests.fixtures_serve import make_checkpoint
from training import joint
from training.local import train_local

CONFIGS = {"penn_res50": ("penn", write_penn), "h36m_res18": ("h36m", write_h36m), "bbc_res18": ("bbc", write_bbc),
           "posetrack_res18": ("posetrack", write_posetrack)}
SMALL = ["model.backbone=small", "model.image_size=64", "loss.perceptual=none", "train.max_steps=3",
         "train.batch_size=2", "train.val_frames=4"]


def _imported(tmp_path, dataset: str, write) -> str:
    write(tmp_path / "src")
    shards = str(tmp_path / "shards")
    assert cli(["import", dataset, "--src", str(tmp_path / "src"), "--out", shards]) == 0
    return shards


def _plan(config: str, overrides: list[str], storage) -> joint.Plan:
    return joint.plan_run(SimpleNamespace(config=config, overrides=overrides, workers=1, gpus=0, storage=str(storage),
                                          name="t", resume=False, max_failures=0))


@pytest.mark.parametrize("config", CONFIGS)
def test_each_dataset_config_trains_and_evaluates_on_its_fixture(config, tmp_path, capsys):
    dataset, write = CONFIGS[config]
    joints = dataset_joint_set(dataset)
    shards = _imported(tmp_path, dataset, write)
    assert read_joint_set(shards) == joints  # the manifest carries the joint set
    plan = _plan(config, [f"data.url={shards}", *SMALL], tmp_path / "runs")  # the driver's checks, as `train` runs
    cfg = plan.cfg
    assert (cfg.model.joint_set, cfg.model.num_joints) == (joints.name, joints.size)
    model, recon, history = train_local(cfg, load_frames(shards, split=cfg.data.train_split), progress=False)
    assert len(history) >= 1
    ck = str(tmp_path / "ck")
    save_checkpoint(ck, model, cfg, cfg.train.max_steps, loss_module=recon)
    assert load_checkpoint(ck).meta["joint_set"] == joints.to_dict()
    # a fine-tune from it passes the driver's checks; from a directory that is no checkpoint it is refused there
    assert _plan(config, [f"data.url={shards}", *SMALL, f"train.init_from={ck}"], tmp_path / "tune").cfg.train.init_from
    with pytest.raises(joint.TrainInputError, match="train.init_from: .* not a checkpoint directory"):
        _plan(config, [f"data.url={shards}", *SMALL, f"train.init_from={tmp_path}"], tmp_path / "tune2")
    capsys.readouterr()
    assert cli(["evaluate", "--checkpoint", ck, "--data", shards, "--device", "cpu",
                "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["metric"] == joints.headline == ("macc" if dataset == "bbc" else "pck@0.2")
    assert report["joint_set"] == joints.name and report["persons"]
    assert all(0.0 <= r[joints.headline] <= 1.0 for r in report["persons"]), report["persons"]
    assert f"{joints.headline} " in capsys.readouterr().out


def test_a_13_joint_checkpoint_on_17_joint_data_is_refused_in_one_line(tmp_path, capsys):
    shards = _imported(tmp_path, "posetrack", write_posetrack)
    ck = str(tmp_path / "ck")
    make_checkpoint(ck)  # synth_small: Penn Action's 13 joints
    capsys.readouterr()
    assert cli(["evaluate", "--checkpoint", ck, "--data", shards]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"checkpoint {ck} has the penn (13 joints) joint set but data {shards} has coco (17 joints)" in err, err
    print(f"\n{err}")
    # personalization on a person of those shards: refused before any TTP
    assert cli(["personalize", "--checkpoint", ck, "--shards", shards, "--person", "000003_bonn-t1", "--scenario",
                "offline", "--out", str(tmp_path / "d.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"the model has the penn (13 joints) joint set but shards {shards} has coco (17 joints): "
                        "they must be the same"), err
    # training: a config for 13 joints on these data is refused before Ray, naming both and the fix
    with pytest.raises(joint.TrainInputError, match=r"penn \(13 joints\) .* coco \(17 joints\).*set data.dataset"):
        _plan("synth_small", [f"data.url={shards}"], tmp_path / "runs")
