"""Server-side validation of client replies, and what a client reply may hold (fast, no Flower processes).

Every tampered delta goes through the same path a real reply takes on the server
(`server.fl.handle_reply` -> `DeltaStore.file_delta` -> `DeltaPolicy.check`) and must be refused with a
reason and leave nothing in the store. The privacy check builds a real reply by
calling the ClientApp with a real Message and inspects every record of it.
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from model.checkpoint import load_checkpoint
from model.delta import deltable_keys, encode_delta, extract_delta, read_metadata
from server.fl import FLSettings, handle_reply, make_store, run_federation
from store.deltas import DeltaStore
from store.policy import DeltaPolicy
from store.protocol import BLOB_KEY, TRAIN, base_records, blob_record, checkpoint_from_records
from tests.fixtures_flower import make_checkpoint, write_random_shards


@pytest.fixture(autouse=True, scope="module")
def task_identity():
    """What Flower's ServerApp runtime sets before `main` runs (messages are stamped with it)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


@pytest.fixture(scope="module")
def ck_url(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("ck") / "base")
    make_checkpoint(url)
    return url


@pytest.fixture(scope="module")
def ck(ck_url):
    return load_checkpoint(ck_url)


@pytest.fixture(scope="module")
def base(ck):
    return DeltaPolicy.for_model(ck.model, ck.sha256)


@pytest.fixture
def store(tmp_path, ck, base):
    """The server's store without the trust region, so that each rule below is the one that refuses (the trust
    region would refuse most bad deltas first); the trust region has its own test."""
    settings = FLSettings(base_checkpoint="unused", storage=str(tmp_path / "store"))
    return DeltaStore(settings.storage, DeltaPolicy.for_model(ck.model, ck.sha256, norm_bound=settings.norm_bound))


def honest_delta(ck, scale: float = 1e-3, seed: int = 0) -> dict[str, torch.Tensor]:
    state = ck.model.state_dict()
    keys = deltable_keys(state, {n for n, _ in ck.model.named_parameters()})
    g = torch.Generator().manual_seed(seed)
    personal = {k: v + scale * torch.randn(v.shape, generator=g) * (v.abs().mean() + 1e-3)
                if k in keys else v for k, v in state.items()}
    return extract_delta(state, personal, keys)


def encode(ck, delta, dtype="int8", sha=None, person="alice"):
    return encode_delta(delta, dtype, sha or ck.sha256, person, "offline", 4, 12)


def instruction(node_id: int = 7) -> Message:
    return Message(RecordDict({"config": ConfigRecord({"x": 1})}), dst_node_id=node_id, message_type=TRAIN)


def reply(data: bytes | None, person: str = "alice", state: str = "ok", extra: dict | None = None,
          metrics: MetricRecord | None = None) -> Message:
    content = RecordDict({"status": ConfigRecord({"state": state, "reason": "", "person-id": person,
                                                  "base-sha256": ""}),
                          "metrics": metrics or MetricRecord({"frames": 12, "loss_before": 1.0})})
    if data is not None:
        content["delta"] = blob_record(data)
    for k, v in (extra or {}).items():
        content[k] = v
    return Message(content, reply_to=instruction())


def test_honest_delta_is_stored_with_latest_json(ck, base, store):
    data = encode(ck, honest_delta(ck))
    entry = handle_reply(reply(data), store)
    assert entry["status"] == "stored", entry
    latest = store.latest("alice")
    assert latest["version"] == entry["version"] and latest["base_sha256"] == ck.sha256
    assert store.read("alice", latest["version"]) == data
    assert entry["bytes"] == len(data) and entry["metrics"]["frames"] == 12


def _tamper_wrong_key(ck):
    d = honest_delta(ck)
    d["renderer.net.0.weight"] = torch.zeros(3)
    return encode(ck, d)


def _tamper_sup_head_key(ck):
    d = honest_delta(ck)
    name = next(k for k, _ in ck.model.named_parameters() if k.startswith("sup_head."))
    d[name] = torch.zeros_like(ck.model.state_dict()[name])
    return encode(ck, d)


def _tamper_shape(ck):
    d = honest_delta(ck)
    k = next(iter(d))
    d[k] = torch.zeros(d[k].numel() + 1)
    return encode(ck, d)


def _tamper_nan(ck):
    d = honest_delta(ck)
    k = next(iter(d))
    d[k] = d[k].clone()
    d[k].view(-1)[0] = float("nan")
    return encode(ck, d, dtype="fp16")


def _tamper_nan_scale(ck):
    d = honest_delta(ck)
    data = encode(ck, d, dtype="int8")
    meta = read_metadata(data)
    scales = json.loads(meta["scales"])
    scales[next(iter(scales))] = float("nan")
    from safetensors.torch import load, save

    return save(load(data), metadata=dict(meta, scales=json.dumps(scales)))


def _tamper_dtype(ck):
    from safetensors.torch import load, save

    data = encode(ck, honest_delta(ck), dtype="fp16")
    tensors = {k: v.float() for k, v in load(data).items()}  # header still says fp16
    return save(tensors, metadata=read_metadata(data))


TAMPERED = {
    "wrong key (renderer)": (_tamper_wrong_key, r"not an encoder/self_head parameter"),
    "wrong key (sup_head)": (_tamper_sup_head_key, r"not an encoder/self_head parameter"),
    "wrong shape": (_tamper_shape, r"has shape"),
    "NaN": (_tamper_nan, r"NaN or Inf"),
    "NaN scale": (_tamper_nan_scale, r"NaN or Inf|no scale"),
    "wrong dtype": (_tamper_dtype, r"the header says fp16"),
    "wrong base hash": (lambda ck: encode(ck, honest_delta(ck), sha="0" * 64), r"made for base 000000000000"),
    "over the norm bound": (lambda ck: encode(ck, honest_delta(ck, scale=400.0), dtype="fp32"),
                            r"over the (per-tensor )?bound"),
    "not safetensors": (lambda ck: b"\x80\x04\x95 pickle? no." * 10, r"not a safetensors file"),
    "empty": (lambda ck: encode(ck, {}), r"holds no tensors"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_delta_is_refused_with_reason(case, ck, base, store):
    make, pattern = TAMPERED[case]
    entry = handle_reply(reply(make(ck)), store)
    assert entry["status"] == "refused", entry
    assert re.search(pattern, entry["reason"]), entry["reason"]
    assert store.persons() == [] and store.latest("alice") is None


def test_oversized_delta_is_refused_before_decoding(ck, base, store):
    cap = store.policy.max_bytes
    fp32_all = encode(ck, {k: torch.full_like(base.state[k], 1e-6) for k in base.allowed_keys}, dtype="fp32")
    assert len(fp32_all) <= cap, "an honest full fp32 delta must fit the default cap"
    entry = handle_reply(reply(fp32_all + b"\0" * (cap - len(fp32_all) + 1)), store)
    assert entry["status"] == "refused" and re.search(r"over the \d+-byte cap", entry["reason"]), entry
    small = make_store(FLSettings(base_checkpoint="x", storage=store.url, max_delta_bytes=1000), ck)
    entry = handle_reply(reply(encode(ck, honest_delta(ck))), small)
    assert entry["status"] == "refused" and "1000-byte cap" in entry["reason"]
    assert store.persons() == []


@pytest.mark.parametrize("person,pattern", [("../etc", r"invalid person id"), ("", r"invalid person id"),
                                            ("bob", r"is for person 'alice', not 'bob'")])
def test_person_id_is_checked(person, pattern, ck, base, store):
    entry = handle_reply(reply(encode(ck, honest_delta(ck), person="alice"), person=person), store)
    assert entry["status"] == "refused" and re.search(pattern, entry["reason"]), entry
    assert store.persons() == []


def test_reply_with_extra_records_or_list_metrics_is_refused(ck, base, store):
    data = encode(ck, honest_delta(ck))
    leak = ArrayRecord({"frames": Array(np.zeros((2, 8, 8, 3), np.uint8))})
    entry = handle_reply(reply(data, extra={"images": leak}), store)
    assert entry["status"] == "refused" and "images" in entry["reason"]
    entry = handle_reply(reply(data, metrics=MetricRecord({"keypoints": [1.0, 2.0, 3.0]})), store)
    assert entry["status"] == "refused" and "single numbers" in entry["reason"]
    two = ArrayRecord({BLOB_KEY: Array(np.frombuffer(data, np.uint8).copy()), "more": Array(np.zeros(3))})
    msg = reply(None)
    msg.content["delta"] = two
    entry = handle_reply(msg, store)
    assert entry["status"] == "refused" and "exactly one array" in entry["reason"]
    assert store.persons() == []


def test_client_error_and_flower_error_are_failures_not_crashes(ck, base, store):
    entry = handle_reply(reply(None, state="error"), store)
    assert entry["status"] == "failed"
    from flwr.app import Error

    entry = handle_reply(Message(Error(code=3, reason="ClientApp raised"), reply_to=instruction()), store)
    assert entry["status"] == "failed" and "ClientApp raised" in entry["reason"]


# --- the ClientApp itself: a real reply, inspected ---------------------------------------------


@pytest.fixture(scope="module")
def person_shards(tmp_path_factory):
    url = str(tmp_path_factory.mktemp("shards") / "test")
    write_random_shards(url, persons=2, frames=3, size=64, seed=1)
    return url


def client_call(ck, node_config: dict, run_config: dict | None = None, arrays: ArrayRecord | None = None,
                settings: dict | None = None) -> Message:
    from client.app import app

    a, c = base_records(ck, settings or {"scenario": "offline", "ttp-steps": 3, "delta-dtype": "int8",
                                         "seed": 0, "round": 1})
    msg = Message(RecordDict({"base": arrays or a, "config": c}), dst_node_id=11, message_type=TRAIN)
    ctx = Context(run_id=1, node_id=11, node_config=node_config, state=RecordDict(), run_config=run_config or {})
    return app(msg, ctx)


def test_client_reply_holds_no_pixels_or_keypoints(ck, base, store, person_shards):
    from data.shards import load_frames, read_table

    out = client_call(ck, {"person-id": "p000", "data-path": person_shards})
    assert not out.has_error()
    content = out.content
    assert set(content.keys()) == {"status", "metrics", "delta"}
    status = content["status"]
    assert status["state"] == "ok", status["reason"]
    assert status["person-id"] == "p000" and status["base-sha256"] == ck.sha256
    assert all(isinstance(v, str) and len(v) <= 2000 for v in status.values())
    metrics = content["metrics"]
    assert all(isinstance(v, (int, float)) and not isinstance(v, list) for v in metrics.values())
    assert metrics["frames"] == 6 and metrics["delta_bytes"] > 0 and math.isfinite(metrics["loss_before"])
    assert list(content["delta"].keys()) == [BLOB_KEY]
    blob = content["delta"][BLOB_KEY].numpy().tobytes()
    from safetensors.torch import load

    keys = set(load(blob))
    assert keys and all(k.startswith(("encoder.", "self_head.")) for k in keys)
    assert keys <= base.allowed_keys
    # none of the person's images (JPEG bytes or decoded pixel rows) nor keypoints appear anywhere
    everything = blob + b"".join(str(v).encode() for v in status.values())
    rows = read_table(person_shards, persons=["p000"]).to_pylist()
    frames = load_frames(person_shards, person="p000")
    for r, f in zip(rows, frames):
        assert r["image"][100:164] not in everything
        assert f.image[32].tobytes()[:48] not in everything
        assert np.asarray(r["keypoints"], np.float32)[:6].tobytes() not in everything
    assert len(blob) < sum(f.image.nbytes for f in frames) * 10  # sanity: a delta, not a dataset
    # and the server accepts it
    entry = handle_reply(out, store)
    assert entry["status"] == "stored", entry


def test_client_online_scenario_and_fp16(ck, base, store, person_shards):
    out = client_call(ck, {"person-id": "p001", "data-path": person_shards},
                      settings={"scenario": "online", "ttp-steps": 3, "delta-dtype": "fp16", "seed": 1, "round": 1})
    assert out.content["status"]["state"] == "ok", out.content["status"]["reason"]
    assert out.content["metrics"]["steps"] > 0
    entry = handle_reply(out, store)
    assert entry["status"] == "stored", entry
    assert store.load_latest("p001")[1]["scenario"] == "online"


def test_client_with_missing_or_empty_data_answers_with_an_error_record(ck, tmp_path):
    (tmp_path / "empty").mkdir()
    for node in ({"person-id": "p000", "data-path": str(tmp_path / "nope")},
                 {"person-id": "p000", "data-path": str(tmp_path / "empty")},
                 {"person-id": "", "data-path": str(tmp_path)},
                 {"partition-id": 0, "num-partitions": 1}):
        out = client_call(ck, node)
        assert not out.has_error()
        status = out.content["status"]
        assert status["state"] == "error" and status["reason"], node
        assert "delta" not in out.content


def test_client_refuses_weights_that_do_not_match_the_announced_hash(ck):
    arrays, _ = base_records(ck, {})
    name = next(iter(arrays.keys()))
    arr = arrays[name].numpy().copy()
    arr.flat[0] += 1.0
    arrays[name] = Array(arr)
    out = client_call(ck, {"person-id": "p000", "data-path": "/nonexistent"}, arrays=arrays)
    status = out.content["status"]
    assert status["state"] == "error" and "BaseMismatch" in status["reason"]


def test_received_weights_rebuild_the_checkpoint_bit_for_bit(ck):
    arrays, config = base_records(ck, {"scenario": "offline"})
    rebuilt = checkpoint_from_records(arrays, config)
    assert rebuilt.sha256 == ck.sha256
    assert rebuilt.loss_buffers == ck.loss_buffers
    assert rebuilt.config.to_dict() == ck.config.to_dict()


# --- the round: dropouts, failures, verdicts, summary --------------------------------------------


class FakeGrid:
    """Stands in for Flower's Grid: each node answers through a function (None = never answers)."""

    def __init__(self, handlers: dict):
        self.handlers = handlers
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.handlers)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = m.object_id  # what Grid.push_messages does
            self.sent.append(m)
            r = self.handlers[m.metadata.dst_node_id](m)
            if r is not None:
                out.append(r)
        return out


def test_round_survives_failures_and_dropouts_and_reports_verdicts(ck, ck_url, tmp_path):
    radius = ck.config.ttp.drift_radius  # what the server holds deltas to (synth_small's trust region)
    good = encode(ck, {k: v.clamp(-radius, radius) for k, v in honest_delta(ck).items()}, person="good")
    bad = encode(ck, honest_delta(ck), person="bad", sha="1" * 64)

    def answer(data, person, state="ok"):
        def f(m):
            if m.metadata.message_type != TRAIN:
                return Message(RecordDict({"ack": ConfigRecord({"ok": True})}), reply_to=m)
            content = RecordDict({"status": ConfigRecord({"state": state, "reason": "disk on fire" if state == "error"
                                                          else "", "person-id": person, "base-sha256": ""}),
                                  "metrics": MetricRecord({"frames": 3})})
            if data:
                content["delta"] = blob_record(data)
            return Message(content, reply_to=m)
        return f

    def superlink_says_unavailable(m):  # what the SuperLink answers for a node that stopped heartbeating
        from flwr.app import Error

        r = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=m)
        r.metadata.__dict__["_src_node_id"] = 0
        return r

    grid = FakeGrid({1: answer(good, "good"), 2: answer(bad, "bad"), 3: answer(None, "sick", "error"),
                     4: lambda m: None, 5: superlink_says_unavailable})
    store = tmp_path / "store"
    ctx = Context(run_id=42, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"base-checkpoint": ck_url, "storage": str(store), "round-timeout": 5.0,
                              "min-nodes": 5, "node-wait": 1.0})
    summary = run_federation(grid, ctx)
    persons = summary["persons"]
    assert persons["good"]["status"] == "stored"
    assert persons["bad"]["status"] == "refused" and "made for base" in persons["bad"]["reason"]
    assert persons["sick"]["status"] == "failed" and "disk on fire" in persons["sick"]["reason"]
    assert persons["node-4"]["status"] == "timeout"
    assert persons["node-5"]["status"] == "failed" and "Node Unavailable" in persons["node-5"]["reason"]
    assert "node-0" not in persons
    on_disk = json.loads((store / "fl-runs" / "run-42.json").read_text())
    assert on_disk["status"] == "finished" and on_disk["stored"] == 1 and on_disk["wall_seconds"] > 0
    assert on_disk["checkpoint_bytes"] > persons["good"]["bytes"] > 0
    assert on_disk["trust_region"] == radius
    verdicts = {m.metadata.dst_node_id: m.content["verdict"] for m in grid.sent if m.metadata.message_type != TRAIN}
    assert set(verdicts) == {1, 2, 3}
    assert verdicts[2]["status"] == "refused" and "made for base" in verdicts[2]["reason"]
    assert verdicts[1]["status"] == "stored" and verdicts[1]["version"]
    # the train message carried the base and the hash; nothing a client could not verify
    train = next(m for m in grid.sent if m.metadata.message_type == TRAIN)
    assert train.content["config"]["base-sha256"] == summary["base_sha256"]


def test_too_few_nodes_fails_the_run_with_a_summary(ck_url, tmp_path):
    ctx = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"base-checkpoint": ck_url, "storage": str(tmp_path / "s"), "min-nodes": 2,
                              "node-wait": 0.5})
    with pytest.raises(RuntimeError, match="min-nodes is 2"):
        run_federation(FakeGrid({1: lambda m: None}), ctx)
    on_disk = json.loads((tmp_path / "s" / "fl-runs" / "run-7.json").read_text())
    assert on_disk["status"] == "failed" and "min-nodes" in on_disk["reason"]


def test_bad_run_config_is_rejected():
    with pytest.raises(ValueError, match="base-checkpoint"):
        FLSettings.from_run_config({"storage": "x"})
    with pytest.raises(ValueError, match="scenario"):
        FLSettings.from_run_config({"base-checkpoint": "x", "storage": "x", "scenario": "sometimes"})
    with pytest.raises(ValueError, match="delta-dtype"):
        FLSettings.from_run_config({"base-checkpoint": "x", "storage": "x", "delta-dtype": "int4"})


def test_server_holds_deltas_to_the_base_trust_region(tmp_path, person_shards):
    """With `ttp.drift_steps` in the base checkpoint, real clients' deltas (int8, fp16) reach the trust region's
    edge and are stored; a federation over that base refuses a delta with one weight 5 % beyond the edge, which
    passes without the bound."""
    from safetensors.torch import load

    from model.delta import decode_and_validate

    url = str(tmp_path / "ck")
    make_checkpoint(url, ["ttp.drift_steps=1"])
    ck = load_checkpoint(url)
    base = DeltaPolicy.for_model(ck.model, ck.sha256)
    radius = ck.config.ttp.drift_radius
    assert radius == ck.config.ttp.lr
    settings = FLSettings(base_checkpoint=url, storage=str(tmp_path / "store"))
    store = make_store(settings, ck)
    for person, dtype in (("p000", "int8"), ("p001", "fp16")):
        out = client_call(ck, {"person-id": person, "data-path": person_shards},
                          settings={"scenario": "offline", "ttp-steps": 3, "delta-dtype": dtype, "seed": 0,
                                    "round": 1})
        blob = out.content["delta"][BLOB_KEY].numpy().tobytes()
        assert set(load(blob)), "TTP changed nothing: the test would not see the bound"
        delta, _ = decode_and_validate(blob, base.state, base.allowed_keys, base.sha256)
        largest = max(float(v.abs().max()) for v in delta.values())
        assert 0.99 * radius < largest < 1.01 * radius, (dtype, largest / radius)  # three steps reach the edge
        assert handle_reply(out, store)["status"] == "stored"
    k = next(iter(delta))
    delta[k].view(-1)[0] = 1.05 * radius
    beyond = encode(ck, delta, dtype="fp32", person="p002")

    def client(m):
        content = RecordDict({"status": ConfigRecord({"state": "ok", "reason": "", "person-id": "p002",
                                                      "base-sha256": ck.sha256}), "delta": blob_record(beyond)})
        return Message(content if m.metadata.message_type == TRAIN else RecordDict(), reply_to=m)

    ctx = Context(run_id=7, node_id=0, node_config={}, state=RecordDict(),
                  run_config={"base-checkpoint": url, "storage": str(tmp_path / "fl"), "node-wait": 1.0})
    summary = run_federation(FakeGrid({1: client}), ctx)
    assert summary["trust_region"] == radius
    entry = summary["persons"]["p002"]
    assert entry["status"] == "refused" and "beyond the trust region" in entry["reason"], entry
    unbounded = DeltaStore(settings.storage, DeltaPolicy.for_model(ck.model, ck.sha256))
    assert handle_reply(reply(beyond, person="p002"), unbounded)["status"] == "stored"
