"""One delta policy, four users: the same hostile deltas get the same verdicts from every writer and reader of
the store — the Flower server (`handle_reply`), `posettp personalize --store`, `posettp evaluate --store` and
Serve's person models.

Writers see a delta as a client would send it; readers find it already in the store (written there behind the
policy's back, as a tampered store would hold it).
"""
from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch
from safetensors.torch import save as st_save

from client import edge
from model.checkpoint import load_checkpoint
from model.delta import (DeltaRejected, deltable_keys, dequantize, encode_delta, extract_delta, factorize, quantize,
                         read_metadata, rebuild)
from posettp.cli import main as cli
from server.fl import FLSettings, handle_reply, make_store
from server.serve import PersonModels
from store.deltas import DeltaStore
from store.policy import DeltaPolicy
from tests.fixtures_flower import make_checkpoint, write_random_shards
from tests.test_fl_validation import reply, task_identity  # noqa: F401 (the fixture stamps Flower messages)

CASES = ("honest", "honest fp16", "honest low-rank", "half a factor pair", "factors of the wrong shape",
         "factors beyond the trust region", "wrong key", "wrong shape", "NaN", "wrong base", "beyond the trust region",
         "erase the weights (-w)", "erase one tensor", "another person", "not safetensors", "header a JSON list", "scales a JSON list",
         "empty", "oversized")


def _honest(ck, radius_share: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """A delta inside the checkpoint's trust region, as an honest client's TTP makes."""
    state = ck.model.state_dict()
    keys = deltable_keys(state, {n for n, _ in ck.model.named_parameters()})
    g = torch.Generator().manual_seed(seed)
    r = radius_share * ck.config.ttp.drift_radius
    personal = {k: v + (torch.rand(v.shape, generator=g) * 2 - 1) * r if k in keys else v for k, v in state.items()}
    return extract_delta(state, personal, keys)


def _low_rank(ck, rank: int = 4, radius_share: float = 0.5) -> dict[str, torch.Tensor]:
    """An honest low-rank TTP's delta (`ttp.delta_rank`): each weight's change of rank `rank`, inside the trust
    region; biases dense."""
    honest = _honest(ck, radius_share)
    g = torch.Generator().manual_seed(1)
    out = {}
    for k, v in honest.items():
        if v.ndim < 2:
            out[k] = v
            continue
        rows = v.shape[0]
        change = torch.randn(rows, rank, generator=g) @ torch.randn(rank, v.numel() // rows, generator=g)
        out[k] = (change * (radius_share * ck.config.ttp.drift_radius / change.abs().max())).reshape(v.shape)
    return out


def _one(delta: dict, change) -> dict:
    d = {k: v.clone() for k, v in delta.items()}
    change(d)
    return d


def hostile_deltas(ck, person_of: dict[str, str]) -> dict[str, bytes]:
    """case -> delta bytes for person `person_of[case]`; 'honest' and 'honest fp16' are the only valid ones."""
    radius = ck.config.ttp.drift_radius
    state = ck.model.state_dict()
    honest = _honest(ck)
    first = next(iter(honest))

    def enc(case, delta, dtype="int8", sha=None, person=None):
        return encode_delta(delta, dtype, sha or ck.sha256, person or person_of[case], "offline", 4, 12)

    low_rank = factorize(_low_rank(ck), 4)
    factored = next(k for k in low_rank if k.endswith(".factor_b"))

    cases = {
        "honest": lambda c: enc(c, honest),
        "honest fp16": lambda c: enc(c, honest, "fp16"),
        "honest low-rank": lambda c: encode_delta(_low_rank(ck), "int8", ck.sha256, person_of[c], "offline", 4, 12,
                                                  rank=4, max_abs=radius),
        "half a factor pair": lambda c: enc(c, _one(low_rank, lambda d: d.pop(factored)), "fp32"),
        "factors of the wrong shape": lambda c: enc(c, _one(low_rank, lambda d: d.update(
            {factored: torch.zeros(d[factored].shape[0] + 1, 4)})), "fp32"),
        "factors beyond the trust region": lambda c: enc(c, _one(low_rank, lambda d: d[factored].mul_(3.0)), "fp32"),
        "wrong key": lambda c: enc(c, _one(honest, lambda d: d.update({"renderer.net.0.weight": torch.zeros(3)}))),
        "wrong shape": lambda c: enc(c, _one(honest, lambda d: d.update({first: torch.zeros(d[first].numel() + 1)}))),
        "NaN": lambda c: enc(c, _one(honest, lambda d: d[first].view(-1).__setitem__(0, float("nan"))), "fp16"),
        "wrong base": lambda c: enc(c, honest, sha="0" * 64),
        "beyond the trust region": lambda c: enc(
            c, _one(honest, lambda d: d[first].view(-1).__setitem__(0, 1.05 * radius)), "fp32"),
        "erase the weights (-w)": lambda c: enc(c, {k: -state[k].float() for k in honest}, "fp32"),
        "erase one tensor": lambda c: enc(c, {first: -state[first].float()}, "fp32"),
        "another person": lambda c: enc(c, honest, person="someone-else"),
        "not safetensors": lambda c: b"\x80\x04\x95 pickle? no." * 10,
        "header a JSON list": lambda c: len(b"[1, 2]").to_bytes(8, "little") + b"[1, 2]" + b"\0" * 64,
        "scales a JSON list": lambda c: st_save({k: torch.zeros_like(state[k], dtype=torch.int8) for k in honest},
                                                metadata=dict(read_metadata(enc(c, honest)), scales="[1.0]")),
        "empty": lambda c: enc(c, {}),
        "oversized": lambda c: enc(c, {k: torch.full_like(state[k], 1e-7) for k in honest}, "fp32") + b"\0" * (1 << 20),
    }
    assert tuple(cases) == CASES
    return {case: make(case) for case, make in cases.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("policy")
    ck_url, shards = str(root / "ck"), str(root / "shards")
    make_checkpoint(ck_url)  # synth_small: a trust region of 20 lr
    write_random_shards(shards, len(CASES), frames=2)  # one test person per case
    ck = load_checkpoint(ck_url)
    assert ck.config.ttp.drift_radius < float("inf")
    person = {case: f"p{i:03d}" for i, case in enumerate(CASES)}
    return {"root": root, "ck_url": ck_url, "ck": ck, "shards": shards, "deltas": hostile_deltas(ck, person),
            "person": person}


def flower_server(world) -> dict[str, str]:
    store = make_store(FLSettings(base_checkpoint=world["ck_url"], storage=str(world["root"] / "fl")), world["ck"])
    out = {}
    for case, data in world["deltas"].items():
        entry = handle_reply(reply(data, person=world["person"][case]), store)
        out[case] = "stored" if entry["status"] == "stored" else f"refused: {entry['reason']}"
    return out


def edge_personalize(world, monkeypatch, capsys) -> dict[str, str]:
    """`posettp personalize --shards --person --store`, its TTP replaced by the delta under test."""
    store = str(world["root"] / "edge")
    out = {}
    for case, data in world["deltas"].items():
        metrics = {"frames": 2, "steps": 4, "ttp_seconds": 0.1, "loss_before": 1.0, "loss_after": 0.9,
                   "safeguards": [], "delta_tensors": 1}
        monkeypatch.setattr(edge, "run_ttp", lambda *a, data=data, m=metrics, **k: (data, m, None))
        rc = cli(["personalize", "--checkpoint", world["ck_url"], "--shards", world["shards"], "--person",
                  world["person"][case], "--scenario", "offline", "--store", store])
        err = capsys.readouterr().err
        out[case] = "stored" if rc == 0 else "refused: " + err.strip().split("error: ", 1)[-1]
    return out


def _tampered_store(world, name: str) -> str:
    """Every case's bytes put in the store layout directly, with a latest.json that matches them."""
    url = world["root"] / name
    for case, data in world["deltas"].items():
        person = world["person"][case]
        version = f"{1_700_000_000_000:013d}-{hashlib.sha256(data).hexdigest()[:8]}"
        (url / "persons" / person / "deltas").mkdir(parents=True)
        (url / "persons" / person / "deltas" / f"{version}.safetensors").write_bytes(data)
        (url / "persons" / person / "latest.json").write_text(json.dumps(
            {"person_id": person, "version": version, "sha256": hashlib.sha256(data).hexdigest()}))
    return str(url)


def evaluate_store(world, caplog) -> dict[str, str]:
    store = _tampered_store(world, "evaluate")
    report = world["root"] / "evaluate.json"
    with caplog.at_level(logging.WARNING):
        assert cli(["evaluate", "--checkpoint", world["ck_url"], "--data", world["shards"], "--store", store,
                    "--json", str(report)]) == 0
    versions = {r["person_id"]: r["model_version"] for r in json.loads(report.read_text())["persons"]}
    reasons = {}
    for rec in caplog.records:
        msg = rec.getMessage()
        if "stored delta refused" in msg:
            reasons[msg.split()[1].rstrip(":")] = msg.split("refused (", 1)[1].rsplit("); scoring", 1)[0]
    return {case: "stored" if versions[p] != "base" else f"refused: {reasons[p]}"
            for case, p in world["person"].items()}


def serve_models(world) -> dict[str, str]:
    models = PersonModels(world["ck_url"], _tampered_store(world, "serve"))
    out = {}
    for case, person in world["person"].items():
        entry = models.load(person)
        out[case] = "stored" if entry.version != "base" else f"refused: {entry.fallback['reason']}"
    return out


def test_every_user_of_the_store_gives_the_same_verdicts(world, monkeypatch, capsys, caplog):
    verdicts = {"flower server": flower_server(world),
                "personalize --store": edge_personalize(world, monkeypatch, capsys),
                "evaluate --store": evaluate_store(world, caplog), "serve": serve_models(world)}
    reference = verdicts["flower server"]
    for case in CASES:  # the table, for `pytest -s`
        print(f"{case:24s} " + " | ".join(f"{user}: {got[case][:60]}" for user, got in verdicts.items()))
    assert {c for c, v in reference.items() if v == "stored"} == {"honest", "honest fp16", "honest low-rank"}, \
        reference
    for user, got in verdicts.items():
        assert got == reference, (user, {c: (got[c], reference[c]) for c in got if got[c] != reference[c]})
    expected = {"half a factor pair": "has no .factor_b partner", "factors of the wrong shape": "not (",
                "factors beyond the trust region": "beyond the trust region",
                "wrong key": "not an encoder/self_head parameter", "wrong shape": "has shape", "NaN": "NaN or Inf",
                "wrong base": "made for base", "beyond the trust region": "beyond the trust region",
                "erase the weights (-w)": "beyond the trust region", "erase one tensor": "beyond the trust region",
                "another person": "not 'p",
                "not safetensors": "not a safetensors file", "header a JSON list": "header is a JSON list",
                "scales a JSON list": "scales are a JSON list", "empty": "holds no tensors", "oversized": "byte cap"}
    for case, words in expected.items():
        assert words in reference[case], (case, reference[case])


def test_the_policy_is_built_from_the_base_checkpoint(world):
    ck = world["ck"]
    policy = DeltaPolicy.for_checkpoint(ck)
    keys = deltable_keys(ck.model.state_dict(), {n for n, _ in ck.model.named_parameters()})
    assert policy.allowed_keys == set(keys) and policy.sha256 == ck.sha256
    assert policy.trust_region == ck.config.ttp.drift_radius
    fp32 = sum(ck.model.state_dict()[k].numel() * 4 for k in keys)
    assert fp32 < policy.max_bytes < fp32 + (1 << 20)
    assert DeltaStore("unused", policy).policy is policy


@pytest.mark.parametrize("factor", [-1.0, -0.5, 1.0])
def test_without_a_trust_region_the_norm_bound_refuses_scaled_weights(tmp_path, factor):
    """A base with no trust region (the paper's TTP): erasing, halving or doubling the weights is refused, an
    honest-sized delta (relative norm 0.05, the largest measured from real TTP) is stored."""
    make_checkpoint(str(tmp_path / "ck"), ["ttp.drift_steps=0"])
    ck = load_checkpoint(str(tmp_path / "ck"))
    store = DeltaStore(str(tmp_path / "store"), DeltaPolicy.for_checkpoint(ck))
    state = ck.model.state_dict()
    keys = deltable_keys(state, {n for n, _ in ck.model.named_parameters()})
    scaled = encode_delta({k: factor * state[k].float() for k in keys}, "fp32", ck.sha256, "alice", "offline", 4, 8)
    with pytest.raises(DeltaRejected, match=r"over the (bound 0.25|per-tensor bound 0.4)"):
        store.file_delta("alice", scaled)
    honest = encode_delta({k: 0.05 * state[k].float() for k in keys}, "fp32", ck.sha256, "alice", "offline", 4, 8)
    assert store.file_delta("alice", honest)["person_id"] == "alice"


def test_without_a_trust_region_erasing_one_tensor_is_refused_per_tensor(tmp_path):
    """A delta that erases one small tensor (-w_k) and barely touches the rest stays under the global bound (it is
    relative to every tensor the delta touches); the per-tensor bound refuses it, and 0.3 x that tensor (near the
    largest honest per-tensor ratio, 0.317) passes."""
    make_checkpoint(str(tmp_path / "ck"), ["ttp.drift_steps=0"])
    ck = load_checkpoint(str(tmp_path / "ck"))
    store = DeltaStore(str(tmp_path / "store"), DeltaPolicy.for_checkpoint(ck))
    state = ck.model.state_dict()
    keys = deltable_keys(state, {n for n, _ in ck.model.named_parameters()})
    total = sum(float(state[k].double().pow(2).sum()) for k in keys) ** 0.5
    convs = [k for k in keys if state[k].dim() > 1 and float(state[k].float().pow(2).mean().sqrt()) > 0.02]
    key = min(convs, key=lambda k: float(state[k].norm()))  # a small conv with real weights
    assert float(state[key].norm()) / total < 0.25  # the global bound alone would store the erasure

    def delta(scale: float) -> bytes:
        d = {k: (scale if k == key else 1e-6) * state[k].float() for k in keys}
        return encode_delta(d, "fp32", ck.sha256, "alice", "offline", 4, 8)

    with pytest.raises(DeltaRejected, match=rf"{key}.* moves by 1 x its own norm, over the per-tensor bound 0.4"):
        store.file_delta("alice", delta(-1.0))
    assert store.file_delta("alice", delta(0.3))["person_id"] == "alice"


def test_a_low_rank_delta_is_small_and_rebuilds_the_change_within_the_trust_region(world):
    """int8 factors of a rank-4 change: a small share of the dense delta's bytes; every reader rebuilds the change
    to within int8 rounding, and never beyond the trust region (the writer shrinks factors whose rounded product
    would leave it)."""
    ck = world["ck"]
    radius = ck.config.ttp.drift_radius
    change = _low_rank(ck, radius_share=1.0)  # at the trust region's edge: rounding alone could leave it
    inside = [k for k, v in change.items() if v.ndim > 1][::2]  # these at half the radius: nothing to shrink
    change.update({k: change[k] / 2 for k in inside})
    small = encode_delta(change, "int8", ck.sha256, "p", "offline", 4, 12, rank=4, max_abs=radius)
    dense = encode_delta(change, "int8", ck.sha256, "p", "offline", 4, 12)
    assert len(small) < 0.25 * len(dense)
    rebuilt, _ = DeltaPolicy.for_checkpoint(ck).check(small)
    unshrunk = rebuild(dequantize(*quantize(factorize(change, 4), "int8")), change)  # the factors as they came
    assert set(rebuilt) == set(change)
    for k, v in change.items():
        assert float(rebuilt[k].abs().max()) <= radius
        assert float((rebuilt[k] - v).abs().max()) <= 0.03 * radius, k
    for k in inside:  # a weight inside the region keeps its factors whatever the others needed
        assert torch.equal(rebuilt[k], unshrunk[k]), k
    assert any(not torch.equal(rebuilt[k], unshrunk[k]) for k in change if k not in inside)  # some edge one shrank
