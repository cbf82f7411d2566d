"""The checkpoint shipped for the demo: it loads as any checkpoint, is synth_small's model, says how it was made, and is
trained (unseen shifted persons score far above an untrained model)."""
import argparse

import numpy as np

from core.checkpoints import model_with_loss
from core.frames import labeled_person_frames
from core.scoring import evaluate_person
from data.synth import main as synth_main
from model.checkpoint import checkpoint_sha256, load_checkpoint
from model.config import load_config, model_differences
from posettp.demo import PRETRAINED
from training.loop import start_from


def test_the_shipped_checkpoint_is_synth_small_recorded_and_trained(tmp_path):
    ck = load_checkpoint(str(PRETRAINED))
    assert ck.sha256 == checkpoint_sha256(str(PRETRAINED)) == ck.meta["sha256"]
    assert model_differences(load_config("synth_small").model, ck.config.to_dict()["model"]) == []
    made_by = ck.meta["made_by"]
    assert made_by["data"].startswith("posettp synth ") and "synth_small" in made_by["train"] and made_by["commit"]
    # the demo's fine-tune starts from it
    assert start_from(load_config("synth_small", [f"train.init_from={PRETRAINED}"])) == ck.sha256
    data = str(tmp_path / "val")
    synth_main(argparse.Namespace(out=data, persons=2, frames=20, size=96, seed=11, shift=None, split="val",
                                  shift_components="clothing,body,background", videos=2, extra_frames=0))
    model, recon = model_with_loss(ck)
    pck = [evaluate_person(model, recon, ck.config, frames, "none")["pck@0.2"]
           for frames in labeled_person_frames(data, "val").values()]
    print(f"shipped checkpoint: PCK@0.2 {np.round(pck, 3)} on 2 unseen shifted persons")
    assert np.mean(pck) > 0.45
