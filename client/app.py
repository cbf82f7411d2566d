"""Flower ClientApp: personalize the received base model on this node's own person, return a delta.

Where the frames come from (they never leave the node):
- deployment: node config `person-id` and `data-path` (an image folder, a video file, or a
  shards URL/directory holding that person), e.g.
  `flower-supernode ... --node-config 'person-id="alice" data-path="/data/alice"'`;
- simulation: node config `partition-id` -> the i-th test person of the run config `data` shards.

The reply carries the delta, a few numbers and a status (`store.protocol`); a node
whose data is missing or unreadable answers with `state=error` and the reason instead of
crashing the round.
"""
from __future__ import annotations

import logging
import time
import traceback

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from core.frames import FramesUnavailable, load_person_frames
from data.shards import list_persons
from model.joints import JointSet, JointSetMismatch, joint_set
from store.protocol import BaseMismatch, blob_record, checkpoint_from_records, metric_record

from .ttp_job import kept_base_reason, peak_rss_mb, run_ttp

log = logging.getLogger("posettp.client")

app = ClientApp()


class NodeDataError(ValueError):
    """This node cannot produce its person's frames."""


def load_node_frames(data_path: str, person_id: str, joints: JointSet) -> list:
    """The person's frames from a shards URL, an image folder or a video file."""
    if not data_path:
        raise NodeDataError("node config has no data-path")
    try:
        return load_person_frames(data_path, person_id, joints)
    except (FramesUnavailable, JointSetMismatch) as exc:
        raise NodeDataError(f"data-path: {exc}") from exc


def resolve_person(context: Context, joints: JointSet) -> tuple[str, list]:
    """(person id, frames) for this node, from its node config (deployment) or partition id (simulation)."""
    node = context.node_config
    if "data-path" in node or "person-id" in node:
        person = str(node.get("person-id", "")).strip()
        if not person:
            raise NodeDataError("node config has a data-path but no person-id")
        return person, load_node_frames(str(node.get("data-path", "")), person, joints)
    if "partition-id" in node:
        url = str(context.run_config.get("data", ""))
        if not url:
            raise NodeDataError("simulation needs the run config key `data` (test shards URL)")
        try:
            persons = list_persons(url, "test")
        except (OSError, ValueError) as exc:
            raise NodeDataError(f"cannot list test persons of {url!r}: {exc}") from exc
        pid = int(node["partition-id"])
        if pid >= len(persons):
            raise NodeDataError(f"partition {pid} has no test person ({len(persons)} in {url})")
        return persons[pid], load_node_frames(url, persons[pid], joints)
    raise NodeDataError("node config names neither person-id/data-path nor partition-id")


def _reply(msg: Message, state: str, reason: str = "", person: str = "", sha: str = "",
           metrics: dict | None = None, delta: bytes | None = None) -> Message:
    content = RecordDict({"status": ConfigRecord({"state": state, "reason": reason[:2000], "person-id": person,
                                                  "base-sha256": sha})})
    if metrics:
        content["metrics"] = metric_record(metrics)
    if delta is not None:
        content["delta"] = blob_record(delta)
    return Message(content, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    t0 = time.perf_counter()
    person, sha = "", ""
    try:
        cfg_rec = msg.content["config"]
        arrays = msg.content["base"]
        download = arrays.count_bytes()
        ck = checkpoint_from_records(arrays, cfg_rec)
        sha = ck.sha256
        cfg = ck.config
        cfg.ttp.steps = int(cfg_rec.get("ttp-steps", cfg.ttp.steps))
        scenario = str(cfg_rec.get("scenario", "offline"))
        seed = int(cfg_rec.get("seed", cfg.ttp.seed))
        dtype = str(cfg_rec.get("delta-dtype", "int8"))
        person, frames = resolve_person(context, joint_set(cfg.model.joint_set))
        data, metrics, _ = run_ttp(ck, frames, scenario, cfg.ttp, seed, person, dtype)
        del frames
        metrics["download_bytes"] = download
        metrics["seconds"] = time.perf_counter() - t0
        metrics["peak_rss_mb"] = peak_rss_mb()
        if metrics["delta_tensors"] == 0:
            return _reply(msg, "unchanged", f"TTP kept the base weights ({kept_base_reason(metrics)})", person, sha,
                          metrics)
        return _reply(msg, "ok", "", person, sha, metrics, data)
    except (NodeDataError, BaseMismatch) as exc:
        log.error("node %s person %r: %s", context.node_id, person, exc)
        return _reply(msg, "error", f"{type(exc).__name__}: {exc}", person, sha,
                      {"seconds": time.perf_counter() - t0})
    except Exception as exc:  # a bug or bad input must not take the node down; the server records it
        log.error("node %s person %r failed:\n%s", context.node_id, person, traceback.format_exc())
        return _reply(msg, "error", f"{type(exc).__name__}: {exc}", person, sha,
                      {"seconds": time.perf_counter() - t0})


@app.query("verdict")
def verdict(msg: Message, context: Context) -> Message:
    """The server's decision on this node's delta (stored, refused + reason, ...): log it, acknowledge."""
    v = msg.content["verdict"]
    level = logging.INFO if v.get("status") in ("stored", "unchanged") else logging.WARNING
    log.log(level, "server verdict for person %s: %s %s%s", v.get("person-id"), v.get("status"),
            v.get("version", ""), f" ({v.get('reason')})" if v.get("reason") else "")
    print(f"[posettp client] person {v.get('person-id')}: delta {v.get('status')} "
          f"{v.get('version', '')} {v.get('reason', '')}".rstrip(), flush=True)
    return Message(RecordDict({"ack": ConfigRecord({"ok": True})}), reply_to=msg)
