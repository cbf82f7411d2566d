"""Flower ServerApp: base checkpoint out, validated per-person deltas back into the delta store.

One round = every connected node gets the base weights + TTP settings
(`store.protocol`), personalizes on its own person's frames and answers with a
delta and a few numbers. Each delta is validated (keys, shapes, dtypes, base hash,
finite, norm bounds, size cap, trust region, person id) by the store's delta policy and stored
atomically per person, but only for the person its node is bound to (`server.nodes`); a refused
delta is logged with its reason and the verdict is sent back to the node. Nodes that fail,
answer with an error or never answer within `round-timeout` are recorded and the round goes on.

Run config (`[tool.flwr.app.config]`, override with `flwr run . --run-config 'k=v'`):
base-checkpoint, data (simulation shards), scenario, ttp-steps, delta-dtype, storage,
rounds, seed, min-nodes, node-wait, round-timeout, verdict-timeout, max-delta-bytes
(0 = the fp32 size of every encoder/self_head parameter + header room), norm-bound,
node-bindings, fedavg-base, eval-data, eval-persons.

A summary JSON (per person: status, reason, bytes, version, metrics; wall time, peak
memory, checkpoint bytes) is written to `{storage}/fl-runs/run-{run_id}.json`.
"""
from __future__ import annotations

import logging
import math
import os
import resource
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from core.checkpoints import build_recon_loss, model_with_loss
from core.frames import labeled_person_frames
from core.scoring import evaluate_person
from data.shards import read_joint_set
from model import io
from model.checkpoint import Checkpoint, load_checkpoint, restore_loss_buffers, save_checkpoint, state_bytes
from model.config import setting, settings_from_mapping
from model.delta import DEFAULT_NORM_BOUND, DTYPES, DeltaRejected, apply_delta
from model.joints import require_same
from store.deltas import DeltaStore
from store.policy import DeltaPolicy, check_person_id
from store.protocol import TRAIN, VERDICT, base_records, blob_from_record

from .nodes import NodeBindings

log = logging.getLogger("flwr.posettp")

app = ServerApp()

ALLOWED_REPLY_RECORDS = {"status", "metrics", "delta"}


# The run config's keys are these fields with `-` for `_`; pyproject.toml's [tool.flwr.app.config] states the
# same defaults (tests/test_settings.py holds the two together).
@dataclass
class FLSettings:
    base_checkpoint: str = setting("", "checkpoint directory/URL the server loads (an absolute path); required")
    data: str = setting("", "simulation: test shards; partition-id i -> the i-th test person")
    scenario: str = setting("offline", "offline | online: how the clients personalize")
    ttp_steps: int = setting(60, "offline TTP steps per client")
    delta_dtype: str = setting("int8", "int8 | fp16 | fp32: how clients encode their deltas")
    storage: str = setting("runs/fl-store", "delta store URL: persons/{id}/deltas/, latest.json, fl-runs/")
    rounds: int = setting(1, "federated rounds")
    seed: int = setting(0, "seed sent to the clients' TTP")
    min_nodes: int = setting(1, "wait for this many connected nodes ...")
    node_wait: float = setting(120.0, "... at most this many seconds")
    round_timeout: float = setting(1800.0, "seconds per round; later replies are dropped (node recorded as "
                                           "timeout)")
    verdict_timeout: float = setting(30.0, "seconds to deliver each node its delta's verdict")
    max_delta_bytes: int = setting(0, "largest delta accepted; 0 = fp32 size of all encoder/self_head params + "
                                      "header room")
    norm_bound: float = setting(DEFAULT_NORM_BOUND, "largest ||delta|| / ||base weights it touches||")
    node_bindings: str = setting("", "node id -> person id file (`posettp node bind`); empty: "
                                     "{storage}/auth/nodes.json if it exists, else a node keeps the first person "
                                     "it claims in the run")
    fedavg_base: bool = setting(False, "also average the deltas into a new base and score it")
    eval_data: str = setting("", "shards for the fedavg check (default: data), test split")
    eval_persons: int = setting(0, "persons the fedavg check scores; 0 = every test person who did not take part")

    @classmethod
    def from_run_config(cls, rc: dict) -> "FLSettings":
        s = settings_from_mapping(cls, rc, what="run-config key", dashed=True)
        if not s.base_checkpoint:
            raise ValueError("run config `base-checkpoint` is empty: pass --run-config 'base-checkpoint=\"/abs/ck\"'")
        if s.scenario not in ("online", "offline"):
            raise ValueError(f"scenario must be online or offline, got {s.scenario!r}")
        if s.delta_dtype not in DTYPES:
            raise ValueError(f"delta-dtype must be one of {DTYPES}, got {s.delta_dtype!r}")
        if s.rounds < 1 or s.min_nodes < 1:
            raise ValueError("rounds and min-nodes must be >= 1")
        return s

    def client_settings(self, rnd: int) -> dict:
        return {"scenario": self.scenario, "ttp-steps": self.ttp_steps, "delta-dtype": self.delta_dtype,
                "seed": self.seed, "round": rnd}


def make_store(settings: FLSettings, ck: Checkpoint) -> DeltaStore:
    """The store every reply is filed through, under the base checkpoint's delta policy (with the run's size cap
    and norm bound): clients personalize with the checkpoint's TTP settings, so no honest delta leaves its trust
    region."""
    policy = DeltaPolicy.for_checkpoint(ck, max_bytes=settings.max_delta_bytes, norm_bound=settings.norm_bound)
    return DeltaStore(settings.storage, policy)


def _numbers(record) -> dict:
    return {k: v for k, v in record.items()}


def handle_reply(reply: Message, store: DeltaStore, node: int | None = None,
                 bindings: NodeBindings | None = None) -> dict:
    """Validate one client's reply and file its delta; returns the summary entry (never raises).

    `node` is the node the instruction went to: an error reply made by the SuperLink itself
    (node unavailable, message expired) comes from the SuperLink's node id, not the client's.
    `bindings`: the run's node -> person rule; a reply for a person its node may not write is refused
    and marked `bound: False`.
    """
    node = reply.metadata.src_node_id if node is None else node
    entry: dict = {"node_id": node, "person_id": None, "status": "failed", "reason": "", "bytes": 0}
    if reply.has_error():
        entry["reason"] = f"error {reply.error.code}: {reply.error.reason}"
        return entry
    entry["answered"] = True
    content = reply.content
    extra = set(content.keys()) - ALLOWED_REPLY_RECORDS
    status = content.get("status")
    if not isinstance(status, ConfigRecord):
        entry.update(status="refused", reason="reply has no status record")
        return entry
    entry["person_id"] = str(status.get("person-id", "")) or None
    metrics = content.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, MetricRecord) or any(isinstance(v, list) for v in metrics.values()):
            entry.update(status="refused", reason="metrics must be a MetricRecord of single numbers")
            return entry
        entry["metrics"] = _numbers(metrics)
    if extra:
        entry.update(status="refused", reason=f"reply carries records the protocol does not allow: {sorted(extra)}")
        return entry
    if bindings is not None and entry["person_id"] is not None:
        try:
            bindings.claim(node, check_person_id(entry["person_id"]))
        except DeltaRejected as exc:
            entry.update(status="refused", reason=str(exc), bound=False)
            log.warning("node %s person %s: refused: %s", node, entry["person_id"], exc)
            return entry
    state = status.get("state")
    if state == "error":
        entry.update(status="failed", reason=str(status.get("reason", "")))
        return entry
    if state == "unchanged":
        entry.update(status="unchanged", reason=str(status.get("reason", "")))
        return entry
    if state != "ok":
        entry.update(status="refused", reason=f"unknown client state {state!r}")
        return entry
    try:
        person = check_person_id(entry["person_id"] or "")
        if "delta" not in content:
            raise DeltaRejected("state ok but no delta record")
        try:
            data = blob_from_record(content["delta"])
        except (ValueError, TypeError) as exc:
            raise DeltaRejected(str(exc)) from exc
        entry["bytes"] = len(data)
        record = store.file_delta(person, data)
    except DeltaRejected as exc:
        entry.update(status="refused", reason=str(exc))
        log.warning("node %s person %s: delta refused: %s", node, entry["person_id"], exc)
        return entry
    except Exception as exc:  # noqa: BLE001 - one reply must never stop the round: it is this node's verdict
        entry.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        log.error("node %s person %s: filing the delta failed: %s", node, entry["person_id"], exc)
        return entry
    entry.update(status="stored", version=record["version"], sha256=record["sha256"])
    entry["_data"] = data
    log.info("node %s person %s: delta stored as %s (%d bytes)", node, person, record["version"], len(data))
    return entry


def wait_for_nodes(grid: Grid, min_nodes: int, wait_s: float) -> list[int]:
    deadline = time.monotonic() + wait_s
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes or time.monotonic() >= deadline:
            return nodes
        time.sleep(1.0)


def send_verdicts(grid: Grid, entries: list[dict], rnd: int, timeout: float) -> dict:
    """Tell each node that answered what became of its delta (stored / refused + reason); returns
    {"sent", "acknowledged"} for the round's summary."""
    msgs = []
    for e in entries:
        if not e.get("answered"):  # timed out, or the SuperLink answered for it: nobody to tell
            continue
        rec = ConfigRecord({"person-id": str(e.get("person_id") or ""), "status": e["status"],
                            "reason": str(e.get("reason", ""))[:2000], "version": str(e.get("version", ""))})
        msgs.append(Message(RecordDict({"verdict": rec}), dst_node_id=e["node_id"], message_type=VERDICT,
                            group_id=f"{rnd}-verdict", ttl=max(timeout, 10.0)))
    acknowledged = 0
    if msgs:
        try:
            acknowledged = sum(not a.has_error() for a in grid.send_and_receive(msgs, timeout=timeout))
            log.info("round %d: %d/%d nodes acknowledged their verdict", rnd, acknowledged, len(msgs))
        except Exception as exc:  # verdicts are a courtesy; the store is already final
            log.warning("round %d: sending verdicts failed: %s", rnd, exc)
    return {"sent": len(msgs), "acknowledged": acknowledged}


def fedavg(ck: Checkpoint, deltas: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Base + the mean of the persons' deltas (a tensor a person did not change counts as zero)."""
    keys = sorted({k for d in deltas for k in d})
    mean = {k: sum(d[k] for d in deltas if k in d) / len(deltas) for k in keys}
    return apply_delta(ck.model.state_dict(), mean)


def fedavg_round(ck: Checkpoint, store: DeltaStore, entries: list[dict],
                 settings: FLSettings, run_id: int, rnd: int) -> tuple[Checkpoint, dict]:
    """Average the stored deltas into a new base, save it, score base vs new base without TTP on
    persons who did not take part."""
    stored = [e for e in entries if e["status"] == "stored"]
    if not stored:
        return ck, {"skipped": "no stored deltas to average"}
    deltas = [store.policy.check(e["_data"])[0] for e in stored]
    model = type(ck.model)(ck.model.cfg)
    model.load_state_dict(fedavg(ck, deltas))
    model.eval()
    recon = build_recon_loss(model, ck.config)
    if recon is not None:
        restore_loss_buffers(recon, ck.loss_buffers)
    url = io.join(settings.storage, "bases", f"fedavg-run{run_id}-round{rnd}")
    sha = save_checkpoint(url, model, ck.config, step=int(ck.meta.get("step", 0)), loss_module=recon,
                          extra={"fedavg": {"parent_sha256": ck.sha256, "persons": [e["person_id"] for e in stored],
                                            "round": rnd, "run_id": run_id}})
    new_ck = load_checkpoint(url)
    report = {"checkpoint": url, "sha256": sha, "parent_sha256": ck.sha256, "persons_averaged": len(stored)}
    eval_url = settings.eval_data or settings.data
    if not eval_url:
        report["evaluation"] = "skipped: no eval-data/data shards on the server"
        return new_ck, report
    report["evaluation"] = evaluate_held_out(ck, new_ck, eval_url,
                                             {e["person_id"] for e in entries if e.get("person_id")},
                                             settings.eval_persons)
    return new_ck, report


def evaluate_held_out(old: Checkpoint, new: Checkpoint, url: str, exclude: set, limit: int) -> dict:
    """PCK without TTP of the old and the averaged base on test persons who were not clients."""
    require_same(old.joint_set, "the base checkpoint", read_joint_set(url), f"eval data {url}")
    persons = {p: f for p, f in labeled_person_frames(url, "test").items() if p not in exclude}
    if limit:
        persons = dict(list(persons.items())[:limit])
    if not persons:
        return {"skipped": f"no test persons in {url} outside the participants"}
    key = old.joint_set.headline
    rows = []
    for ck_name, ck in (("base", old), ("fedavg", new)):
        model, recon = model_with_loss(ck)
        for pid, frames in persons.items():
            r = evaluate_person(model, recon, ck.config, frames, "none")
            rows.append((ck_name, pid, float(r[key])))
    base = {p: v for n, p, v in rows if n == "base"}
    avg = {p: v for n, p, v in rows if n == "fedavg"}
    mb, ma = float(np.nanmean(list(base.values()))), float(np.nanmean(list(avg.values())))
    log.info("fedavg base on %d held-out persons: %s %.4f -> %.4f (no TTP)", len(persons), key, mb, ma)
    return {"metric": key, "persons": len(persons), "base_mean": mb, "fedavg_mean": ma, "better": ma > mb,
            "per_person": {p: {"base": base[p], "fedavg": avg[p]} for p in persons}}


def write_summary(storage: str, run_id: int, summary: dict) -> str:
    url = io.join(storage, "fl-runs", f"run-{run_id}.json")
    io.write_bytes_atomic(url, io.json_text(summary).encode())
    return url


def run_federation(grid: Grid, context: Context) -> dict:
    t0 = time.perf_counter()
    settings = FLSettings.from_run_config(dict(context.run_config))
    run_id = int(context.run_id)
    summary: dict = {"run_id": run_id, "status": "running", "settings": asdict(settings), "rounds": [],
                     "persons": {}, "started_at": time.time()}
    try:
        io.ensure_writable(settings.storage)
        ck = load_checkpoint(settings.base_checkpoint)
        ck_bytes = len(state_bytes(ck.model))
        radius = ck.config.ttp.drift_radius
        summary.update(base_sha256=ck.sha256, checkpoint_bytes=ck_bytes,
                       trust_region=radius if math.isfinite(radius) else None)
        log.info("base %s (%s, %d bytes), storage %s", settings.base_checkpoint, ck.sha256[:12], ck_bytes,
                 settings.storage if "://" in settings.storage else os.path.abspath(settings.storage))
        bindings = NodeBindings.for_run(settings.node_bindings, settings.storage)
        log.info("node bindings: %s", bindings.mode + (f" ({bindings.source})" if bindings.source else ""))
        for rnd in range(1, settings.rounds + 1):
            store = make_store(settings, ck)
            nodes = wait_for_nodes(grid, settings.min_nodes, settings.node_wait)
            if len(nodes) < settings.min_nodes:
                raise RuntimeError(f"only {len(nodes)} node(s) connected within {settings.node_wait:.0f}s, "
                                   f"min-nodes is {settings.min_nodes}")
            arrays, config = base_records(ck, settings.client_settings(rnd))
            download = arrays.count_bytes()
            msgs = [Message(RecordDict({"base": arrays, "config": config}), dst_node_id=n, message_type=TRAIN,
                            group_id=str(rnd), ttl=settings.round_timeout) for n in nodes]
            log.info("round %d: base (%d bytes) to %d node(s), timeout %.0fs", rnd, download, len(nodes),
                     settings.round_timeout)
            tr = time.perf_counter()
            replies = list(grid.send_and_receive(msgs, timeout=settings.round_timeout))
            sent_to = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
            entries = [handle_reply(r, store, sent_to.get(r.metadata.reply_to_message_id), bindings)
                       for r in replies]
            answered = {e["node_id"] for e in entries}
            entries += [{"node_id": n, "person_id": None, "status": "timeout", "bytes": 0,
                         "reason": f"no reply within {settings.round_timeout:.0f}s"} for n in nodes if n not in answered]
            round_s = time.perf_counter() - tr
            verdicts = send_verdicts(grid, entries, rnd, settings.verdict_timeout)
            counts = {s: sum(e["status"] == s for e in entries)
                      for s in ("stored", "refused", "unchanged", "failed", "timeout")}
            log.info("round %d: %s in %.1fs", rnd, counts, round_s)
            rinfo = {"round": rnd, "nodes": len(nodes), "seconds": round_s, "download_bytes_per_client": download,
                     "counts": counts, "verdicts": verdicts, "base_sha256": ck.sha256}
            for e in entries:
                e = {k: v for k, v in e.items() if k != "_data"}
                key = e["person_id"] if e["person_id"] and e.get("bound", True) else f"node-{e['node_id']}"
                summary["persons"][key] = dict(e, round=rnd,
                                               ratio_to_checkpoint=(e["bytes"] / ck_bytes) if e["bytes"] else 0.0)
            if settings.fedavg_base:
                ck, rinfo["fedavg"] = fedavg_round(ck, store, entries, settings, run_id, rnd)
            summary["rounds"].append(rinfo)
        summary["node_bindings"] = bindings.describe()
        stored = [p for p in summary["persons"].values() if p["status"] == "stored"]
        summary["status"] = "finished"
        summary["stored"] = len(stored)
        summary["mean_delta_bytes"] = (sum(p["bytes"] for p in stored) / len(stored)) if stored else 0
        return summary
    except Exception as exc:
        summary.update(status="failed", reason=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        summary["wall_seconds"] = time.perf_counter() - t0
        summary["server_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
        try:
            log.info("run summary: %s", write_summary(settings.storage, run_id, summary))
        except Exception as exc:  # the summary must never hide the run's own error
            log.warning("could not write the run summary: %s", exc)


@app.main()
def main(grid: Grid, context: Context) -> None:
    summary = run_federation(grid, context)
    log.info("posettp federation finished: %d stored, wall %.1fs", summary["stored"], summary["wall_seconds"])
