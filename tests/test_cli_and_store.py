"""The `posettp` command surface and the per-person delta store layout."""
import json
import subprocess
import sys

import pytest
import torch

from model.config import load_config
from model.delta import DeltaRejected, deltable_keys, encode_delta, extract_delta
from model.network import build_model
from store.deltas import DeltaStore
from store.policy import DeltaPolicy

COMMANDS = ["info", "synth", "import", "train", "personalize", "evaluate", "reproduce", "serve", "demo", "token", "node"]


def test_help_lists_every_design_command():
    out = subprocess.run([sys.executable, "-m", "posettp.cli", "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in out.stdout


def test_version_and_no_abbreviated_flags(capsys):
    from importlib.metadata import version

    from posettp.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"posettp {version('posettp')}"
    with pytest.raises(SystemExit) as exit_:  # `--image` is not taken for `--images`
        main(["personalize", "--checkpoint", "ck", "--image", "frames", "--scenario", "online", "--out", "d"])
    assert exit_.value.code == 2 and "--images" in capsys.readouterr().err


def test_shipped_configs_by_name_from_any_directory(tmp_path):
    """`--config NAME` finds a shipped config outside the checkout; an unknown name lists the shipped ones."""
    info = [sys.executable, "-m", "posettp.cli", "info", "--json", "--config"]
    by_name = subprocess.run(info + ["penn_res50"], cwd=tmp_path, capture_output=True, text=True)
    assert by_name.returncode == 0, by_name.stderr
    assert json.loads(by_name.stdout)["params"]["total"] == 39_817_343
    old_style = subprocess.run(info + ["configs/penn_res50.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert old_style.returncode == 0 and old_style.stdout == by_name.stdout
    wrong = subprocess.run(info + ["penn_res05"], cwd=tmp_path, capture_output=True, text=True)
    assert wrong.returncode == 2 and "config not found: penn_res05" in wrong.stderr
    from model.config import shipped_configs

    assert "penn_res50" in shipped_configs() and ", ".join(shipped_configs()) in wrong.stderr


def test_info_json_reports_paper_parameter_count():
    out = subprocess.run([sys.executable, "-m", "posettp.cli", "info", "--config", "configs/penn_res50.yaml",
                          "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["params"]["total"] == 39_817_343


def test_unknown_config_key_is_one_clear_error_line():
    out = subprocess.run([sys.executable, "-m", "posettp.cli", "info", "--config", "configs/synth_small.yaml",
                          "--set", "model.nope=1"], capture_output=True, text=True)
    assert out.returncode != 0
    assert "unknown config key: model.nope" in out.stderr


@pytest.fixture()
def base():
    model = build_model(load_config("configs/synth_small.yaml").model)
    return model, DeltaPolicy.for_model(model, "a" * 64)


def make_delta(model, person="alice", sha="a" * 64, scale=1e-3):
    state = model.state_dict()
    keys = deltable_keys(state, {n for n, _ in model.named_parameters()})
    personal = {k: v + scale * torch.randn_like(v) if k in keys else v for k, v in state.items()}
    return encode_delta(extract_delta(state, personal, keys), "int8", sha, person, "offline", 10, 20)


def test_store_layout_versions_and_latest(tmp_path, base):
    model, info = base
    store = DeltaStore(str(tmp_path / "store"), info)
    first = store.file_delta("alice", make_delta(model))
    second = store.file_delta("alice", make_delta(model))
    assert second["version"] > first["version"]
    assert (tmp_path / "store/persons/alice/deltas" / f"{first['version']}.safetensors").is_file()
    latest = json.loads((tmp_path / "store/persons/alice/latest.json").read_text())
    assert latest["version"] == second["version"] and latest["base_sha256"] == "a" * 64
    delta, meta, record = store.load_latest("alice")
    assert record["version"] == second["version"] and meta["person_id"] == "alice"
    assert store.persons() == ["alice"]


@pytest.mark.parametrize("person", ["../etc", "a/b", "", "x" * 65, "..", "a b"])
def test_store_refuses_person_ids_with_path_characters(tmp_path, base, person):
    model, info = base
    with pytest.raises(DeltaRejected, match="invalid person id"):
        DeltaStore(str(tmp_path), info).file_delta(person, make_delta(model))
    assert not any(tmp_path.iterdir())


def test_store_refuses_delta_for_another_person_or_base(tmp_path, base):
    model, info = base
    store = DeltaStore(str(tmp_path), info)
    with pytest.raises(DeltaRejected, match="not 'alice'"):
        store.file_delta("alice", make_delta(model, person="bob"))
    with pytest.raises(DeltaRejected, match="made for base"):
        store.file_delta("alice", make_delta(model, sha="b" * 64))


def test_tampered_stored_delta_is_refused_on_load(tmp_path, base):
    model, info = base
    store = DeltaStore(str(tmp_path), info)
    record = store.file_delta("alice", make_delta(model))
    path = tmp_path / "persons/alice/deltas" / f"{record['version']}.safetensors"
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DeltaRejected, match="sha256"):
        store.load_latest("alice")


def test_personalize_image_folder_writes_a_valid_delta_and_overlay(tmp_path):
    import cv2
    import numpy as np

    from model.checkpoint import load_checkpoint, save_checkpoint
    from model.delta import decode_and_validate

    cfg = load_config("configs/synth_small.yaml", ["ttp.steps=2", "ttp.batch_size=2", "ttp.guard=false",
                                                     "ttp.min_pose_signal=0"])
    save_checkpoint(str(tmp_path / "ck"), build_model(cfg.model), cfg)
    folder = tmp_path / "frames"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(folder / f"{i:03d}.png"), rng.integers(0, 255, (80, 60, 3), dtype=np.uint8))
    out = subprocess.run([sys.executable, "-m", "posettp.cli", "personalize", "--checkpoint", str(tmp_path / "ck"),
                          "--images", str(folder), "--person", "carol", "--scenario", "offline", "--out",
                          str(tmp_path / "d.safetensors"), "--overlay", str(tmp_path / "overlay")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    ck = load_checkpoint(str(tmp_path / "ck"))
    info = DeltaPolicy.for_model(ck.model, ck.sha256)
    delta, meta = decode_and_validate((tmp_path / "d.safetensors").read_bytes(), info.state, info.allowed_keys,
                                      ck.sha256)
    assert meta["person_id"] == "carol" and meta["scenario"] == "offline"
    assert len(list((tmp_path / "overlay").glob("*.png"))) == 4


def test_racing_writers_never_move_latest_back(tmp_path, base, monkeypatch):
    """A writer that made its version earlier but finishes later leaves latest.json at the newer version."""
    import store.deltas

    model, info = base
    store_ = DeltaStore(str(tmp_path), info)
    newer = store_.file_delta("alice", make_delta(model))
    monkeypatch.setattr(store.deltas.time, "time", lambda: 1_000_000_000.0)  # an older clock: an earlier version
    older = store_.file_delta("alice", make_delta(model))
    assert older["version"] < newer["version"]
    assert store_.latest("alice")["version"] == newer["version"]
    assert (tmp_path / "persons/alice/deltas" / f"{older['version']}.safetensors").is_file()  # kept, not latest


def test_concurrent_token_adds_keep_every_token(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from server.auth import add_token, hash_token, read_tokens

    url = str(tmp_path / "auth/tokens.json")
    persons = [f"p{i:02d}" for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        tokens = dict(zip(persons, pool.map(lambda p: add_token(url, p), persons)))
    table = read_tokens(url)
    assert sorted(table) == persons
    assert all(table[p] == hash_token(tokens[p]) for p in persons)


def test_posettp_token_add_list_revoke(tmp_path, capsys):
    from posettp.cli import main
    from server.auth import AuthError, TokenTable

    store = str(tmp_path / "store")
    assert main(["token", "add", "--store", store, "--person", "alice"]) == 0
    token = capsys.readouterr().out.splitlines()[-1]  # the token alone on the last line
    table = TokenTable(str(tmp_path / "store/auth/tokens.json"))
    table.reload()
    table.check("alice", f"Bearer {token}")
    assert main(["token", "list", "--store", store]) == 0 and capsys.readouterr().out.split() == ["alice"]
    assert main(["token", "revoke", "--store", store, "--person", "alice"]) == 0
    assert main(["token", "revoke", "--store", store, "--person", "alice"]) == 1
    table.reload()
    with pytest.raises(AuthError):
        table.check("alice", f"Bearer {token}")
    assert main(["token", "add", "--store", store]) == 2 and "needs --person" in capsys.readouterr().err


def test_temporaries_of_killed_writers_are_swept_and_live_ones_kept(tmp_path, base):
    import os
    import time

    model, info = base
    deltas = tmp_path / "persons/alice/deltas"
    deltas.mkdir(parents=True)
    stale, live = deltas / "x.safetensors.tmp-dead0001", deltas / "y.safetensors.tmp-live0001"
    stale.write_bytes(b"half"), live.write_bytes(b"half")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    DeltaStore(str(tmp_path), info).file_delta("alice", make_delta(model))
    assert not stale.exists() and live.exists()
    assert [p.suffix for p in deltas.iterdir() if p != live] == [".safetensors"]  # the delta itself, filed


def test_json_outputs_are_standard_json():
    """NaN and Inf (a person without labelled frames, an empty mean) become null; numpy scalars become numbers."""
    import numpy as np

    from model.io import json_text

    def strict(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    text = json_text({"pck@0.2": float("nan"), "rows": [np.float32(0.5), np.int64(3), float("-inf")]})
    assert json.loads(text, parse_constant=strict) == {"pck@0.2": None, "rows": [0.5, 3, None]}


def test_a_run_directory_works_wherever_a_checkpoint_does(tmp_path):
    from model.checkpoint import CheckpointError, load_checkpoint
    from tests.fixtures_flower import make_checkpoint

    run = tmp_path / "runs" / "synth_small"
    make_checkpoint(str(run / "checkpoint_0000004"))
    (run / "latest.json").write_text(json.dumps({"checkpoint": str(run / "checkpoint_0000004"), "step": 4}))
    assert load_checkpoint(str(run)).sha256 == load_checkpoint(str(run / "checkpoint_0000004")).sha256
    (run / "latest.json").write_text(json.dumps({"step": 4}))
    with pytest.raises(CheckpointError, match="names no checkpoint"):
        load_checkpoint(str(run))


def test_personalize_reports_what_it_did(tmp_path, capsys):
    """A delta: exit 0, a summary line and a JSON outcome; a safeguard keeping the base: exit 3 with the safeguard
    and its measured reason; an online clip shorter than the pose-signal warm-up: refused before any update."""
    from posettp.cli import main
    from tests.fixtures_flower import TINY_OVERRIDES, make_checkpoint, write_random_shards

    make_checkpoint(str(tmp_path / "ck"))
    write_random_shards(str(tmp_path / "shards"), persons=1, frames=4, size=64)  # 2 videos x 4 frames
    base = ["personalize", "--checkpoint", str(tmp_path / "ck"), "--shards", str(tmp_path / "shards"), "--person",
            "p000", "--scenario", "offline", *[a for o in TINY_OVERRIDES for a in ("--set", o)]]
    assert main(base + ["--out", str(tmp_path / "d.safetensors"), "--json", str(tmp_path / "ok.json")]) == 0
    ok = json.loads((tmp_path / "ok.json").read_text())
    assert ok["outcome"] == "delta" and ok["delta"]["bytes"] == (tmp_path / "d.safetensors").stat().st_size
    assert ok["steps"] == 4 and ok["safeguards"] == []
    assert "p000: 8 frames, 4 updates" in capsys.readouterr().out

    kept = base + ["--set", "ttp.min_pose_signal=1e6", "--out", str(tmp_path / "k.safetensors"), "--json",
                   str(tmp_path / "kept.json")]
    assert main(kept) == 3 and not (tmp_path / "k.safetensors").exists()
    out = capsys.readouterr().out
    assert "pose-signal check after 0 updates: pose signal" in out and "kept the base weights" in out
    report = json.loads((tmp_path / "kept.json").read_text())
    assert report["outcome"] == "kept_base" and report["safeguards"][0]["safeguard"] == "pose-signal check"
    assert "ttp.min_pose_signal 1e+06" in report["reason"]

    online = [a if a != "offline" else "online" for a in base] + ["--set", "ttp.min_pose_signal=1.02"]
    assert main(online + ["--out", str(tmp_path / "o.safetensors")]) == 2  # the later --set wins
    err = capsys.readouterr().err
    assert "ttp.signal_frames=16 frames are in" in err and "this clip has 8" in err, err
    assert not (tmp_path / "o.safetensors").exists()


def test_every_flag_has_help_and_choices_are_checked_before_work(capsys):
    import argparse

    from posettp.cli import build_parser, main

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not a.help]
    assert not missing, missing
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", "--checkpoint", "nowhere", "--data", "nowhere", "--split", "tset"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "usage: posettp evaluate" in err and "invalid choice: 'tset'" in err


def test_overlay_is_readable_and_shows_base_beside_personalized(tmp_path):
    import cv2
    import numpy as np

    from client.overlay import READABLE, write_overlay
    from data.sources import unlabeled_frame
    from model.joints import PENN

    frames = [unlabeled_frame(np.zeros((64, 48, 3), np.uint8), "me", "v", i, 13) for i in range(2)]
    joints = np.tile(np.linspace(5, 40, 13)[:, None], (2, 1, 3)).astype(np.float32)
    out = write_overlay(frames, joints, str(tmp_path / "ov"), PENN, base_predictions=joints + 3)
    image = cv2.imread(str(tmp_path / "ov" / "000001.png"))
    assert out == str(tmp_path / "ov") and image.shape == (64 * READABLE // 48, 2 * READABLE, 3)
    left, right = image[:, :READABLE], image[:, READABLE:]
    assert left.any() and right.any() and not np.array_equal(left, right)  # the two predictions differ


def test_an_unknown_person_names_some_known_ones(tmp_path, capsys):
    from posettp.cli import main
    from tests.fixtures_flower import make_checkpoint, write_random_shards

    make_checkpoint(str(tmp_path / "ck"))
    write_random_shards(str(tmp_path / "shards"), persons=2, frames=2, size=64)
    assert main(["personalize", "--checkpoint", str(tmp_path / "ck"), "--shards", str(tmp_path / "shards"),
                 "--person", "p009", "--scenario", "offline", "--out", str(tmp_path / "d")]) == 2
    assert "no frames for person 'p009'; it holds 2 persons, e.g. p000, p001" in capsys.readouterr().err
