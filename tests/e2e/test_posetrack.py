"""PoseTrack 2018 end to end, as a user runs it: a fixture in the real on-disk layout, `posettp import posetrack`,
`posettp train --config posetrack_res18` on Ray Train (small backbone through --set), `posettp evaluate` in the
joint set's metric, offline TTP of one track filed in a store, and `posettp serve` answering over HTTP with COCO's
joint names."""
from __future__ import annotations

import json
import subprocess

import cv2
import pytest
import requests

from data.shards import list_persons, load_frames
from model.joints import COCO_JOINTS
from tests.fixtures_posetrack import write_posetrack
from tests.fixtures_ray import REPO, VENV_BIN, ray_env, tagged
from tests.fixtures_serve import ServeProcess, write_serve_config

SMALL = ["model.backbone=small", "model.image_size=64", "loss.perceptual=none", "train.max_steps=4",
         "train.report_every=2", "train.batch_size=2", "ttp.steps=3", "ttp.batch_size=2"]


def _posettp(*args: str, env=None, timeout: float = 300) -> subprocess.CompletedProcess:
    res = subprocess.run([str(VENV_BIN / "posettp"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, \
        f"posettp {args[0]} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_posetrack_imported_trained_evaluated_personalized_and_served_with_coco_names(tmp_path):
    src, shards, runs, store = tmp_path / "posetrack", str(tmp_path / "shards"), tmp_path / "runs", tmp_path / "store"
    write_posetrack(src)
    print("\n" + _posettp("import", "posetrack", "--src", str(src), "--out", shards).stdout.strip())
    sets = [a for s in [f"data.url={shards}", *SMALL] for a in ("--set", s)]
    with tagged("posetrack") as (tag, ray_tmp):
        train = _posettp("train", "--config", "posetrack_res18", *sets, "--workers", "1", "--storage", str(runs),
                         "--name", "pt", env=ray_env(tag, ray_tmp, RAY_ADDRESS="local"), timeout=400)
    assert "[joint] step 4/4" in train.stdout and "val_pck@0.2" not in train.stdout  # no val split in PoseTrack
    run = str(runs / "pt")
    ev = _posettp("evaluate", "--checkpoint", run, "--data", shards, "--json", str(tmp_path / "eval.json"))
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["metric"] == "pck@0.2" and report["joint_set"] == "coco" and len(report["persons"]) == 2
    print(ev.stdout.strip().splitlines()[-1])
    person = list_persons(shards, "test")[0]
    _posettp("personalize", "--checkpoint", run, "--shards", shards, "--person", person, "--scenario", "offline",
             "--store", str(store), "--set", "ttp.steps=3", "--set", "ttp.min_pose_signal=0",
             "--set", "ttp.guard=false")

    config = write_serve_config(str(tmp_path / "serve.yaml"), replicas=1, num_cpus=1, auth=False)
    server = ServeProcess(run, str(store), config, str(tmp_path / "serve.log"))
    try:
        server.wait_ready()
        frame = load_frames(shards, person=person)[0]
        box = ",".join(str(float(v)) for v in frame.bbox)
        jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR))[1].tobytes()
        answers = {who: requests.post(f"{server.url}/v1/persons/{who}/pose", params={"bbox": box}, data=jpeg,
                                      headers={"Content-Type": "image/jpeg"}, timeout=60) for who in (person, "nobody")}
    finally:
        rc, left, log = server.shutdown()
    for who, r in answers.items():
        assert r.status_code == 200, (who, r.text, log[-3000:])
        body = r.json()
        assert [k["name"] for k in body["keypoints"]] == list(COCO_JOINTS)
    assert answers[person].json()["model_version"] != "base" and answers["nobody"].json()["model_version"] == "base"
    assert rc == 0 and not left
    print(f"served {person}: model_version {answers[person].json()['model_version']}, joints "
          f"{[k['name'] for k in answers[person].json()['keypoints']][:6]}... ({len(COCO_JOINTS)})")
