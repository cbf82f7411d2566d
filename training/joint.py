"""Joint training on Ray Train: L_sup + lambda * L_self, DDP over N workers, checkpoints a server and TTP can load.

Run it four ways (the same file; `posettp train` takes the same flags):

    # this machine, a local Ray started for the run (RAY_ADDRESS unset or "local"), 2 CPU workers
    python training/joint.py --config configs/synth_small.yaml --workers 2 --storage runs
    # a Ray cluster: the job's driver joins it, workers spread over its nodes (storage must be shared)
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python training/joint.py --config configs/synth_small.yaml --storage s3://bucket/runs
    # GPUs: one worker per GPU, DDP over NCCL, pinned batches
    python training/joint.py --config configs/synth_paper.yaml --gpus 4
    # continue a run of the same name from its latest checkpoint (e.g. with a larger train.max_steps)
    python training/joint.py --config configs/synth_small.yaml --name synth_small --resume

Outputs under `{storage}/{run}/`: `checkpoint_NNNNNNN/` (model.safetensors + config.json, plus
optimizer.safetensors/.json and per-rank rank{r}.safetensors/.json for an exact resume: no pickles),
`latest.json` ({"checkpoint", "step", "metrics", "best"}), `metrics.jsonl`, `curves.png`, `config.yaml`.

Everything a user can get wrong (config keys, data URL, storage, --resume) is checked on the driver
before Ray starts, and reported as one line on stderr with a non-zero exit.
Fault tolerance: FailureConfig(max_failures) restarts the worker group from the last reported
checkpoint (ray.train.get_checkpoint); POSETTP_FAIL_AT_STEP=K makes rank 1 fail once at step K (tests).
"""
from __future__ import annotations

import argparse
import io as _io
import json
import os
import random
import re
import statistics
import sys
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as `python training/joint.py`: import the repo's packages, not training/*.py
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))  # (training/data.py must not shadow the top-level `data` package)

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import yaml
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
from ray.train.torch import TorchConfig, TorchTrainer
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from core.console import ray_output_to_log
from core.crops import prepare_frames
from core.local_ray import init_local_ray
from core.scoring import score
from data.shards import list_persons, read_joint_set, read_manifest
from model import io
from model.checkpoint import META, WEIGHTS, CheckpointError, restore_loss_buffers, save_checkpoint
from model.config import Config, ConfigError, from_dict, load_config, model_differences
from model.joints import JointSetMismatch, joint_set, require_same
from model.predict import predict_crops
from training.data import batch_stream, derive_seed, load_worker_frames, validation_frames
from training.loop import build_training, seed_everything, start_from, train_step
from training.rendezvous import FileRendezvousTorchConfig

FAIL_ENV = "POSETTP_FAIL_AT_STEP"
MAX_FAILURES = int(os.environ.get("POSETTP_MAX_FAILURES", "3"))
PRINT_EVERY_S = 10.0  # progress lines between reports
RUN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
OPT_TENSORS, OPT_META, STATE_META = "optimizer.safetensors", "optimizer.json", "train_state.json"
FAULT_MARKER = ".fault-injected"
FORWARDED_ENV = ("AWS_", "POSETTP_", "FSSPEC_")
TAG = "[joint]"  # the project's lines: the ones the terminal shows when Ray's own output goes to the log
RAY_LOG = "ray.log"
PLACEMENTS = ("PACK", "SPREAD")  # soft strategies: after a node is lost the worker group still fits on the rest


class TrainInputError(ValueError):
    """Bad input found on the driver before any worker starts."""


# --------------------------------------------------------------------------------------------------
# Training state without pickles: optimizer tensors + RNG states in safetensors, scalars in JSON.
# --------------------------------------------------------------------------------------------------

def optimizer_state_files(optimizer: torch.optim.Optimizer) -> tuple[bytes, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    meta = {"class": type(optimizer).__name__, "param_groups": sd["param_groups"], "scalars": scalars}
    return st_save(tensors), meta


def load_optimizer_state(optimizer: torch.optim.Optimizer, data: bytes, meta: dict) -> None:
    if meta.get("class") != type(optimizer).__name__:
        raise ValueError(f"optimizer state is for {meta.get('class')}, not {type(optimizer).__name__}")
    state: dict[int, dict] = {}
    for name, tensor in st_load(data).items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = tensor
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = meta["param_groups"]
    if sum(len(g["params"]) for g in groups) != sum(len(g["params"]) for g in optimizer.param_groups):
        raise ValueError("optimizer state does not match the model's parameters")
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def rank_state_files(recon_loss) -> tuple[bytes, dict]:
    """This process's RNG states (torch, CUDA, numpy, python) and its loss running means."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"torch": torch.get_rng_state(),
               "numpy.keys": torch.from_numpy(np_state[1].astype(np.int64)),
               "python.state": torch.tensor(py_state[1], dtype=torch.int64)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state()
    if recon_loss is not None:
        tensors.update({f"loss.{k}": v.detach().cpu().contiguous() for k, v in recon_loss.state_dict().items()
                        if not k.startswith("vgg.") and k not in ("vgg_mean", "vgg_std")})
    meta = {"numpy": {"name": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached_gaussian": float(np_state[4])},
            "python": {"version": py_state[0], "gauss_next": py_state[2]}}
    return st_save(tensors), meta


def restore_rank_state(data: bytes, meta: dict, recon_loss) -> None:
    t = st_load(data)
    torch.set_rng_state(t["torch"])
    if "cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda"])
    n = meta["numpy"]
    np.random.set_state((n["name"], t["numpy.keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((meta["python"]["version"], tuple(int(v) for v in t["python.state"].tolist()),
                     meta["python"]["gauss_next"]))
    if recon_loss is not None:
        loss_state = recon_loss.state_dict()
        for key, value in t.items():
            if key.startswith("loss.") and key[5:] in loss_state:
                loss_state[key[5:]].copy_(value)


def write_train_checkpoint(directory: str, rank: int, core, recon_loss, optimizer, cfg: Config, step: int,
                           metrics: dict, extra: dict) -> None:
    """Rank 0 writes the checkpoint and the optimizer state; every rank its own RNG file (Ray merges the dirs)."""
    if rank == 0:
        save_checkpoint(directory, core, cfg, step, metrics, recon_loss, extra=extra)
        data, meta = optimizer_state_files(optimizer)
        Path(directory, OPT_TENSORS).write_bytes(data)
        Path(directory, OPT_META).write_text(json.dumps(meta, default=float))
        Path(directory, STATE_META).write_text(json.dumps({"step": step, **extra}))
    data, meta = rank_state_files(recon_loss)
    Path(directory, f"rank{rank}.safetensors").write_bytes(data)
    Path(directory, f"rank{rank}.json").write_text(json.dumps(meta))


@dataclass
class TrainState:
    step: int
    weights: dict
    meta: dict
    optimizer: tuple[bytes, dict]
    rank: tuple[bytes, dict] | None


def read_train_state(url: str, rank: int) -> TrainState:
    meta = json.loads(io.read_bytes(io.join(url, META)))
    weights = st_load(io.read_bytes(io.join(url, WEIGHTS)))
    opt = (io.read_bytes(io.join(url, OPT_TENSORS)), json.loads(io.read_bytes(io.join(url, OPT_META))))
    rank_state = None
    if io.exists(io.join(url, f"rank{rank}.safetensors")):
        rank_state = (io.read_bytes(io.join(url, f"rank{rank}.safetensors")),
                      json.loads(io.read_bytes(io.join(url, f"rank{rank}.json"))))
    return TrainState(int(meta["step"]), weights, meta, opt, rank_state)


# --------------------------------------------------------------------------------------------------
# Run files written by rank 0 (metrics.jsonl, latest.json) and read by the driver.
# --------------------------------------------------------------------------------------------------

def read_jsonl(url: str) -> list[dict]:
    if not io.exists(url):
        return []
    return [json.loads(line) for line in io.read_bytes(url).decode().splitlines() if line.strip()]


class MetricsLog:
    """metrics.jsonl rewritten whole on each report (object stores cannot append); rank 0 only. Standard JSON:
    a NaN loss is written as null."""

    def __init__(self, run_url: str, start_step: int):
        self.url = io.join(run_url, "metrics.jsonl")
        self.lines = [io.json_text(r, indent=None) for r in read_jsonl(self.url) if r.get("step", 0) <= start_step]

    def add(self, row: dict) -> None:
        self.lines.append(io.json_text(row, indent=None))
        io.write_bytes_atomic(self.url, "".join(line + "\n" for line in self.lines).encode())


# --------------------------------------------------------------------------------------------------
# The per-worker loop.
# --------------------------------------------------------------------------------------------------

def _maybe_fail(step: int, rank: int, world: int, fail_at: int | None, run_url: str) -> None:
    """The injected fault for tests: one rank (1, or 0 alone) raises once at `fail_at`, remembered by a marker."""
    if fail_at is None or step != fail_at or rank != min(1, world - 1):
        return
    marker = io.join(run_url, FAULT_MARKER)
    if io.exists(marker):
        return
    io.write_bytes_atomic(marker, json.dumps({"step": step, "rank": rank, "time": time.time()}).encode())
    raise RuntimeError(f"injected fault at step {step} on rank {rank} ({FAIL_ENV})")


def _validate(core, val) -> dict:
    crops, matrices, frames = val
    predictions = predict_crops(core, crops, matrices)
    return {f"val_{k}": v for k, v in score(predictions, frames, joint_set(core.cfg.joint_set)).items()}


def train_worker(config: dict) -> None:
    """The Ray Train loop: every rank runs this; rank 0 validates, writes the run files and the model."""
    cfg = from_dict(config["cfg"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # one line per rank and start: which Ray node holds it (`ray list nodes` shows the same ids)
    print(f"[joint] rank {rank}/{world} on node {ray.get_runtime_context().get_node_id()} "
          f"({ray.util.get_node_ip_address()}, pid {os.getpid()})", flush=True)
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"

    core, recon_loss, optimizer = build_training(cfg, device)  # same initial weights on every rank
    state, source = None, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state, source = read_train_state(d, rank), checkpoint.path
    elif config.get("resume_from"):
        state, source = read_train_state(config["resume_from"], rank), config["resume_from"]
    start_step = state.step if state else 0
    if state:
        core.load_state_dict(state.weights)
        if recon_loss is not None:
            restore_loss_buffers(recon_loss, state.meta.get("loss_buffers", {}))
        load_optimizer_state(optimizer, *state.optimizer)
    model = ray.train.torch.prepare_model(core)  # DDP over `core` (the optimizer's parameters) when world > 1

    frames, shard = load_worker_frames(config["data_url"], cfg.data.train_split, rank, world)
    batches = batch_stream(frames, cfg, rank, start_step, pin_memory=cuda)
    val = None
    if rank == 0 and config["has_val"]:
        vf = validation_frames(config["data_url"], cfg.data.val_split, cfg.train.val_frames)
        crops, matrices, _ = prepare_frames(vf, cfg.model.image_size)
        val = (crops, matrices, vf)
    log = MetricsLog(config["run_url"], start_step) if rank == 0 else None
    if rank == 0:
        what = f"resumed from {source} at step {start_step}" if state else \
            f"started from {cfg.train.init_from}" if cfg.train.init_from else "started from scratch"
        if checkpoint is not None:  # Ray Train restarted the worker group: its reason is in Ray's output
            what = f"worker group restarted after a failure (Ray's output says why); {what}"
        print(f"[joint] {world} worker(s) on {device}, rank 0 shard: {shard}; {what}", flush=True)
        log.add({"event": "resume" if state else "start", "step": start_step, "world_size": world,
                 "source": source, "time": time.time()})

    # RNG last, so that setup above never shifts it: restored state continues the interrupted run exactly.
    if state and state.rank is not None:
        restore_rank_state(*state.rank, recon_loss)
    else:
        s = derive_seed("train", cfg.train.seed, rank, start_step)
        seed_everything(s % (2 ** 32))

    max_steps, every, bs = cfg.train.max_steps, cfg.train.report_every, cfg.train.batch_size
    fail_at = config.get("fail_at_step")
    sums: dict[str, float] = {}
    step_times: list[float] = []
    cpu_times: list[float] = []  # process CPU time per step: a load-independent view for benchmarks
    report_s = 0.0
    t_start = t_window = t_print = time.perf_counter()
    window_start = start_step
    model.train()
    for step in range(start_step, max_steps):
        _maybe_fail(step, rank, world, fail_at, config["run_url"])
        t0, c0 = time.perf_counter(), time.process_time()
        batch = next(batches)  # pinned on CUDA; the channels_last model takes NCHW input as is
        terms = train_step(model, recon_loss, optimizer, batch, step, cfg, core=core)
        step_times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + v
        done = step + 1
        now = time.perf_counter()
        if rank == 0 and now - t_print >= PRINT_EVERY_S and done % every:
            rate = (done - start_step) / (now - t_start)
            print(f"[joint] step {done}/{max_steps}  loss {terms['loss']:.4f}  l_sup {terms['l_sup']:.5f}  "
                  f"l_self {terms['l_self']:.4f}  {rate * bs * world:.1f} img/s  "
                  f"ETA {(max_steps - done) / rate:.0f}s", flush=True)
            t_print = now
        if done % every and done != max_steps:
            continue
        n = done - window_start
        elapsed = now - t_window
        metrics = {"step": done, **{k: v / n for k, v in sums.items()}, "lr": terms["lr"],
                   "img_per_s": n * bs * world / elapsed, "step_s_median": statistics.median(step_times),
                   "step_cpu_s_median": statistics.median(cpu_times),
                   "report_s": report_s, "world_size": world}
        if val is not None:
            metrics.update(_validate(core, val))
        t_report = time.perf_counter()
        extra = {"run": config["run"], "world_size": world}
        with tempfile.TemporaryDirectory(prefix="posettp-ck-") as tmp:
            write_train_checkpoint(tmp, rank, core, recon_loss, optimizer, cfg, done, metrics, extra)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"checkpoint_{done:07d}")
        report_s = time.perf_counter() - t_report
        if rank == 0:
            ck_url = io.join(config["run_url"], f"checkpoint_{done:07d}")
            log.add({**metrics, "checkpoint": ck_url, "time": time.time()})
            io.write_bytes_atomic(io.join(config["run_url"], "latest.json"), io.json_text(
                {"checkpoint": ck_url, "step": done, "metrics": metrics}).encode())
            rate = (done - start_step) / (time.perf_counter() - t_start)
            val_txt = "".join(f"  {k} {v:.3f}" for k, v in metrics.items() if k.startswith("val_"))
            print(f"[joint] step {done}/{max_steps}  loss {metrics['loss']:.4f}  l_sup {metrics['l_sup']:.5f}  "
                  f"l_self {metrics['l_self']:.4f}{val_txt}  {metrics['img_per_s']:.1f} img/s  "
                  f"ETA {(max_steps - done) / rate:.0f}s  report {report_s:.1f}s -> {ck_url}", flush=True)
        sums, step_times, cpu_times, window_start = {}, [], [], done
        t_window = t_print = time.perf_counter()


# --------------------------------------------------------------------------------------------------
# The driver: validate, then launch.
# --------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    cfg: Config
    storage: str  # absolute local path or a URL with a scheme
    run: str
    run_url: str
    data_url: str
    has_val: bool
    workers: int | None = None
    gpus: int | None = None
    resume_from: str | None = None
    resume_step: int = 0
    fail_at_step: int | None = None
    max_failures: int = MAX_FAILURES
    placement: str = "PACK"  # Ray's placement-group strategy for the worker group
    env: dict = field(default_factory=dict)


def _normalise_url(url: str) -> str:
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" in url:
        return url.rstrip("/")
    return os.path.abspath(os.path.expanduser(url))


def _check_data(cfg: Config, url: str) -> bool:
    """The data URL must be a readable dataset with labeled train frames; returns whether val frames exist."""
    try:
        manifest = read_manifest(url)
        splits = manifest.get("splits", {})
        train = splits.get(cfg.data.train_split, {})
        if not train.get("labeled_frames"):
            raise TrainInputError(f"data URL {url}: no labeled frames in split {cfg.data.train_split!r} "
                                  f"(splits: {', '.join(sorted(splits)) or 'none'})")
        list_persons(url, cfg.data.train_split)  # touches the Parquet parts, not just the manifest
    except TrainInputError:
        raise
    except Exception as exc:  # FileNotFoundError, permissions, corrupt Parquet, S3 errors: one message
        raise TrainInputError(f"data URL {url} cannot be read: {exc}") from exc
    try:
        require_same(joint_set(cfg.model.joint_set), f"the config (data.dataset {cfg.data.dataset})",
                     read_joint_set(url), f"data {url} (dataset {manifest.get('dataset')})")
    except JointSetMismatch as exc:
        raise TrainInputError(f"{exc}; set data.dataset to the data's") from None
    cfg.data.dataset = manifest.get("dataset", cfg.data.dataset)
    return bool(splits.get(cfg.data.val_split, {}).get("labeled_frames")) and cfg.train.val_frames > 0


def _check_resume(cfg: Config, run_url: str) -> tuple[str, int]:
    latest_url = io.join(run_url, "latest.json")
    if not io.exists(latest_url):
        raise TrainInputError(f"--resume: no previous run at {run_url} (no latest.json)")
    ck_url = json.loads(io.read_bytes(latest_url))["checkpoint"]
    try:
        meta = json.loads(io.read_bytes(io.join(ck_url, META)))
    except FileNotFoundError as exc:
        raise TrainInputError(f"--resume: checkpoint {ck_url} named by latest.json is missing") from exc
    theirs, ours = meta.get("config", {}).get("model", {}), cfg.to_dict()["model"]
    diff = model_differences(cfg.model, theirs)
    if diff:
        k = diff[0].split(".", 1)[1]
        raise TrainInputError(f"--resume: checkpoint {ck_url} is model.variant={theirs.get('variant')}, "
                              f"model.backbone={theirs.get('backbone')}; the config asks variant={ours['variant']}, "
                              f"backbone={ours['backbone']} (first difference: model.{k} "
                              f"{theirs.get(k)!r} != {ours[k]!r})")
    for name in (OPT_TENSORS, OPT_META, WEIGHTS):
        if not io.exists(io.join(ck_url, name)):
            raise TrainInputError(f"--resume: checkpoint {ck_url} has no {name}")
    return ck_url, int(meta["step"])


def plan_run(args) -> Plan:
    """Every check that can fail on user input, with no Ray and no worker: raises TrainInputError/ConfigError."""
    cfg = load_config(args.config, args.overrides)
    t = cfg.train
    if t.max_steps < 1 or t.batch_size < 1 or t.report_every < 1:
        raise ConfigError("train.max_steps, train.batch_size and train.report_every must be >= 1")
    if args.workers is not None and args.workers < 1:
        raise TrainInputError(f"--workers must be >= 1, got {args.workers}")
    if args.gpus is not None and args.gpus < 0:
        raise TrainInputError(f"--gpus must be >= 0, got {args.gpus}")
    run = args.name or cfg.name
    if not RUN_NAME.match(run):
        raise TrainInputError(f"run name {run!r} must match {RUN_NAME.pattern}")
    if not cfg.data.url:
        raise TrainInputError("data.url is empty: set it in the config or with --set data.url=URL")
    data_url = _normalise_url(cfg.data.url)
    cfg.data.url = data_url
    has_val = _check_data(cfg, data_url)
    if cfg.train.init_from:  # before Ray: a missing or mismatched checkpoint is the user's to fix
        try:
            start_from(cfg)
        except CheckpointError as exc:
            raise TrainInputError(f"train.init_from: {exc}") from None
    storage = _normalise_url(args.storage or "runs")
    run_url = io.join(storage, run)
    io.ensure_writable(run_url)  # PermissionError naming the URL
    plan = Plan(cfg, storage, run, run_url, data_url, has_val, args.workers, args.gpus)
    existing = io.exists(io.join(run_url, "latest.json")) or io.exists(
        io.join(run_url, "checkpoint_manager_snapshot.json"))
    if getattr(args, "resume", False):
        plan.resume_from, plan.resume_step = _check_resume(cfg, run_url)
    elif existing:
        raise TrainInputError(f"run {run!r} already exists at {run_url}: pass --resume to continue it, "
                              f"or --name NEW for a fresh run")
    fail = os.environ.get(FAIL_ENV)
    plan.fail_at_step = int(fail) if fail else None
    max_failures = getattr(args, "max_failures", None)
    plan.max_failures = MAX_FAILURES if max_failures is None else max_failures
    plan.placement = getattr(args, "placement", None) or "PACK"
    if plan.placement not in PLACEMENTS:
        raise TrainInputError(f"--placement must be one of {', '.join(PLACEMENTS)}, got {plan.placement!r}")
    plan.env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV)}
    return plan


def init_ray() -> bool:
    """Join the cluster named by RAY_ADDRESS (set inside `ray job submit`); else start a private local Ray on
    loopback. True when that private Ray was started here (a Ray the caller already joined is not assumed local)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS", "")
    local = address in ("", "local")
    if local:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the workers' gloo pairs meet on loopback too
        init_local_ray(include_dashboard=False, log_to_driver=True)
    else:
        ray.init(address=address, log_to_driver=True)
    return local


def ray_storage(storage: str):
    """(storage_path, storage_filesystem) for RunConfig: s3 with AWS_ENDPOINT_URL goes through s3fs."""
    if storage.startswith("s3://") and os.environ.get("AWS_ENDPOINT_URL"):
        import pyarrow.fs  # lazy: only runs on S3 go through s3fs
        import s3fs

        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]})
        return storage[len("s3://"):], pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))
    return storage, None


def score_key(cfg: Config) -> str:
    return f"val_{joint_set(cfg.model.joint_set).headline}"


@dataclass(frozen=True)
class WorkerLayout:
    workers: int
    use_gpu: bool
    per_worker: dict
    backend: str  # torch.distributed backend of the DDP process group


def worker_layout(workers: int | None, gpus: int | None, cluster_cpus: int, cluster_gpus: int,
                  threads: int) -> WorkerLayout:
    """How many Ray Train workers, on what, talking over which backend; refuses what the cluster cannot hold.

    Ray would otherwise wait for GPUs the cluster lacks (forever on a fixed cluster). NCCL needs a GPU of its own
    per rank (two ranks on one device fail with "Duplicate GPU detected"), so workers sharing GPUs talk over gloo.
    """
    gpus = cluster_gpus if gpus is None else gpus
    if gpus > cluster_gpus:
        raise TrainInputError(f"--gpus {gpus}, but the Ray cluster has {cluster_gpus} GPU(s)")
    if gpus == 0:
        return WorkerLayout(workers or max(1, min(2, cluster_cpus)), False, {"CPU": max(1, threads)}, "gloo")
    workers = workers or gpus
    return WorkerLayout(workers, True, {"CPU": 1, "GPU": gpus / workers}, "nccl" if workers <= gpus else "gloo")


class Interrupted(Exception):
    """Ctrl-C or SIGTERM on the driver; the private Ray it started is already stopped."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _fit(trainer, local: bool):
    """trainer.fit(). With a private Ray, Ctrl-C/SIGTERM stop the run within seconds: Ray Train's own handler
    waits, without a deadline, for its controller to abort (minutes on a loaded machine), so the fit runs in a
    thread (where Ray Train leaves signals alone) and the signal stops the whole private Ray at once; the run's
    reported checkpoints stay, for --resume. A cluster the user named keeps Ray Train's graceful abort."""
    if not local or threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        return trainer.fit()
    outcome: dict = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as is
            outcome["error"] = exc

    def stop(signum, _frame):
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    thread = threading.Thread(target=fit, name="ray-train-fit", daemon=True)
    try:
        thread.start()
        while thread.is_alive():
            thread.join(0.5)
    except Interrupted as exc:
        print(f"{TAG} {exc}: stopping the workers and the local Ray", flush=True)
        ray.shutdown()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def run_trainer(plan: Plan, worker_fn=None, verbose: bool = True):
    """Launch the TorchTrainer for a validated plan; returns ray.train.Result. Unless `verbose`, Ray's own output
    goes to the run's ray.log and the terminal shows the project's lines."""
    if not verbose:
        log_path, upload = _ray_log_path(plan)
        print(f"{TAG} Ray's own output: {io.join(plan.run_url, RAY_LOG) if upload else log_path} "
              f"(--verbose shows it here)", flush=True)
        owned = not ray.is_initialized()
        try:
            with ray_output_to_log(log_path, TAG):
                try:
                    return run_trainer(plan, worker_fn, verbose=True)
                finally:
                    if owned and ray.is_initialized():  # Ray's last forwarded lines land in the log, not after it
                        ray.shutdown()
        finally:
            if upload:
                io.write_bytes_atomic(io.join(plan.run_url, RAY_LOG), Path(log_path).read_bytes())
    if worker_fn is None:  # by module reference, also when this file runs as __main__
        from training import joint  # lazy: this very module by its package name, also when run as __main__

        worker_fn = joint.train_worker

    local = init_ray()
    resources = ray.cluster_resources()
    layout = worker_layout(plan.workers, plan.gpus, int(resources.get("CPU", 1)), int(resources.get("GPU", 0)),
                           plan.cfg.train.threads)
    workers, use_gpu, per_worker = layout.workers, layout.use_gpu, layout.per_worker
    storage_path, storage_fs = ray_storage(plan.storage)
    has_score = plan.has_val
    loop_config = {"cfg": plan.cfg.to_dict(), "run": plan.run, "run_url": plan.run_url, "data_url": plan.data_url,
                   "has_val": plan.has_val, "resume_from": plan.resume_from, "fail_at_step": plan.fail_at_step}
    run_config = RunConfig(
        name=plan.run, storage_path=storage_path, storage_filesystem=storage_fs,
        checkpoint_config=CheckpointConfig(num_to_keep=2,
                                           checkpoint_score_attribute=score_key(plan.cfg) if has_score else None,
                                           checkpoint_score_order="max"),
        failure_config=FailureConfig(max_failures=plan.max_failures),
        worker_runtime_env={"env_vars": plan.env} if plan.env else None)
    print(f"[joint] run {plan.run}: {workers} worker(s), {'GPU' if use_gpu else 'CPU'} {per_worker}, "
          f"{layout.backend}, {plan.placement} placement, "
          f"storage {plan.run_url}, {plan.cfg.train.max_steps} steps of batch {plan.cfg.train.batch_size} per worker"
          + (f", resuming at step {plan.resume_step}" if plan.resume_from else ""), flush=True)
    with tempfile.TemporaryDirectory(prefix="posettp-pg-") as rendezvous:
        torch_config = (FileRendezvousTorchConfig(backend=layout.backend, directory=rendezvous) if local
                        else TorchConfig(backend=layout.backend))
        trainer = TorchTrainer(worker_fn, train_loop_config=loop_config, torch_config=torch_config,
                               scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu,
                                                            resources_per_worker=per_worker,
                                                            placement_strategy=plan.placement),
                               run_config=run_config)
        return _fit(trainer, local)


def _ray_log_path(plan: Plan) -> tuple[str, bool]:
    """Where Ray's output is written during the run: the run directory when it is local, else a local file that
    is copied to the run directory at the end (True)."""
    if "://" not in plan.run_url:  # plan_run made local storage an absolute path
        return str(Path(plan.run_url, RAY_LOG)), False
    fd, path = tempfile.mkstemp(prefix=f"posettp-{plan.run}-", suffix=".log")
    os.close(fd)
    return path, True


def plot_curves(rows: list[dict], url: str) -> None:
    import matplotlib  # lazy: only for the figures, and the backend must be set before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if "loss" in r]
    steps = [r["step"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "l_sup", "l_self"):
        vals = [r.get(key) for r in rows]
        if any(v for v in vals):
            ax1.plot(steps, [v if v else float("nan") for v in vals], marker="o", label=key)
    ax1.set_yscale("log")
    ax1.set_xlabel("step")
    ax1.set_title("training loss")
    ax1.legend()
    for key in sorted({k for r in rows for k in r if k.startswith("val_")}):
        ax2.plot(steps, [r.get(key) if r.get(key) is not None else float("nan") for r in rows], marker="o", label=key)
    ax2.set_xlabel("step")
    ax2.set_ylim(0, 1)
    ax2.set_title("validation")
    if ax2.lines:
        ax2.legend()
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    io.write_bytes_atomic(url, buf.getvalue())


def finish(plan: Plan) -> dict:
    """latest.json gains the best checkpoint; the curve PNG is drawn; the paths are printed."""
    latest_url = io.join(plan.run_url, "latest.json")
    latest = json.loads(io.read_bytes(latest_url))
    rows = [r for r in read_jsonl(io.join(plan.run_url, "metrics.jsonl")) if "checkpoint" in r]
    key = score_key(plan.cfg)
    scored = [r for r in rows if r.get(key) is not None and io.exists(io.join(r["checkpoint"], WEIGHTS))]
    best = max(scored, key=lambda r: (r[key], r["step"])) if scored else None
    if best:
        latest["best"] = {"checkpoint": best["checkpoint"], "step": best["step"], key: best[key]}
    io.write_bytes_atomic(latest_url, io.json_text(latest).encode())
    curves = io.join(plan.run_url, "curves.png")
    plot_curves(read_jsonl(io.join(plan.run_url, "metrics.jsonl")), curves)
    m = latest.get("metrics", {})
    print(f"final checkpoint: {latest['checkpoint']} (step {latest['step']}, loss {m.get('loss', float('nan')):.4f}"
          + (f", {key} {m[key]:.3f}" if m.get(key) is not None else "") + ")")
    if best:
        print(f"best checkpoint:  {best['checkpoint']} (step {best['step']}, {key} {best[key]:.3f})")
    print(f"latest.json:      {latest_url}\ncurves:           {curves}")
    return latest


def main_from_args(args) -> int:
    """`posettp train` and `python training/joint.py`: validate, launch, summarise. Input errors raise."""
    plan = plan_run(args)
    io.write_bytes_atomic(io.join(plan.run_url, "config.yaml"),
                          yaml.safe_dump(plan.cfg.to_dict(), sort_keys=False).encode())
    if plan.resume_from and plan.resume_step >= plan.cfg.train.max_steps:
        print(f"[joint] run {plan.run} is already at step {plan.resume_step} >= train.max_steps "
              f"{plan.cfg.train.max_steps}: nothing to train")
        finish(plan)
        return 0
    try:
        result = run_trainer(plan, verbose=getattr(args, "verbose", False))
    except Interrupted as exc:
        latest_url = io.join(plan.run_url, "latest.json")
        step = json.loads(io.read_bytes(latest_url))["step"] if io.exists(latest_url) else None
        print(f"joint training stopped ({exc}); " + (f"its last checkpoint is step {step}: continue with --resume"
                                                     if step else "no checkpoint was reported"), file=sys.stderr)
        return 128 + exc.signum
    except TrainingFailedError as exc:
        print(f"joint training failed: {exc}", file=sys.stderr)
        return 1
    if getattr(result, "error", None):
        print(f"joint training failed: {result.error}", file=sys.stderr)
        return 1
    finish(plan)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="training/joint.py", description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n")[2:]))
    p.add_argument("--config", required=True, help="a shipped config by name (synth_small, ...) or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.max_steps=30")
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: GPUs, or 2 on CPU)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: use the cluster's; 0 = CPU)")
    p.add_argument("--storage", default=None, help="local path or s3:// URL for runs (default: ./runs)")
    p.add_argument("--name", default=None, help="run name (default: the config's name)")
    p.add_argument("--resume", action="store_true", help="continue the run of this name from its latest checkpoint")
    p.add_argument("--max-failures", type=int, default=None,
                   help=f"worker-group restarts before giving up (default {MAX_FAILURES})")
    p.add_argument("--placement", choices=PLACEMENTS, default="PACK",
                   help="where Ray puts the workers: PACK fills a node first, SPREAD one per node where it can "
                        "(both fall back to what fits; default PACK)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output here instead of in {run}/ray.log")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return main_from_args(args)
    except (ValueError, FileNotFoundError, PermissionError) as exc:  # ConfigError, TrainInputError included
        print(f"training/joint.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
