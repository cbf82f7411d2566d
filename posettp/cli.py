"""The `posettp` command: argument parsing and dispatch into the packages, nothing else."""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import sys

from model.config import VARIANTS, shipped_configs
from model.device import DEVICES


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", required=required,
                   help=f"a shipped config by name ({', '.join(shipped_configs())}) or a YAML path")
    _set_arg(p)


def _set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. --set train.max_steps=30")


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help=f"{' | '.join(DEVICES)} | cuda:N (auto: the GPU when present)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in its help, except the empty ones (None, False, [])."""

    def _get_help_string(self, action):
        if action.default in (None, False, [], "") or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """No abbreviated flags, in every subcommand too (`--image` must not quietly mean `--images`); defaults shown."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="posettp", description="Test-time personalization of 2D human pose, "
                     "trained on Ray, personalized with Flower, served with Ray Serve.")
    parser.add_argument("--version", action="version", version=f"posettp {importlib.metadata.version('posettp')}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameter counts per submodule and forward GFLOPs")
    _config_args(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(target="posettp.info:main")

    p = sub.add_parser("synth", help="write synthetic persons as Parquet shards")
    p.add_argument("--out", required=True, help="output URL (path, file://, s3://)")
    p.add_argument("--persons", type=int, required=True, help="persons to generate (split 60/10/30 with --split all)")
    p.add_argument("--frames", type=int, required=True, help="frames per video")
    p.add_argument("--size", type=int, default=128, help="frame size in pixels")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same persons")
    p.add_argument("--shift", type=float, default=None, help="appearance shift of test persons (0..1)")
    p.add_argument("--shift-components", default="clothing,body,background",
                   help="which parts of the look --shift moves (comma-separated; the others stay as in training)")
    p.add_argument("--split", default="all", choices=["all", "train", "val", "test"], help="which splits to write")
    p.add_argument("--videos", type=int, default=None, help="videos per person")
    p.add_argument("--extra-frames", type=int, default=None, help="unlabeled extra frames per test person")
    p.set_defaults(target="data.synth:main")

    p = sub.add_parser("import", help="convert a real dataset (Penn Action, BBC Pose, Human3.6M, PoseTrack 2018) to "
                                      "shards")
    p.add_argument("dataset", choices=["penn", "bbc", "h36m", "posetrack"], help="the dataset's on-disk format")
    p.add_argument("--src", required=True, help="the dataset's directory, as distributed")
    p.add_argument("--out", required=True, help="output shards URL (path, file://, s3://)")
    p.set_defaults(target="data.importers:main")

    p = sub.add_parser("train", help="joint training through Ray Train (same as training/joint.py)")
    _config_args(p)
    p.add_argument("--workers", type=int, default=None, help="Ray Train workers (default: one per GPU, or 2 on CPU)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs in all (default: the cluster's; 0 = CPU)")
    p.add_argument("--storage", default=None, help="runs directory or s3:// URL (default: ./runs)")
    p.add_argument("--name", default=None, help="run name (default: the config's name)")
    p.add_argument("--resume", action="store_true", help="continue the run of this name from its latest checkpoint")
    p.add_argument("--max-failures", type=int, default=None,
                   help="worker-group restarts before giving up (default: 3, or POSETTP_MAX_FAILURES)")
    p.add_argument("--placement", choices=["PACK", "SPREAD"], default="PACK",
                   help="where Ray puts the workers: PACK fills a node first, SPREAD one per node where it can "
                        "(both fall back to what fits; default PACK)")
    p.set_defaults(target="training.joint:main_from_args")

    p = sub.add_parser("personalize", help="TTP on one person, alone, no Flower (exit 3: a safeguard kept the base)")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a training run directory")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of frames (sorted by name)")
    src.add_argument("--video", help="video file")
    src.add_argument("--shards", help="shards URL (with --person)")
    p.add_argument("--person", help="person id in the shards / in the store")
    p.add_argument("--scenario", choices=["online", "offline"], required=True,
                   help="online: frame by frame, never looking ahead; offline: on all frames, then predict")
    dst = p.add_mutually_exclusive_group(required=True)
    dst.add_argument("--out", help="delta file to write")
    dst.add_argument("--store", help="store URL: file the delta under persons/{id}/")
    p.add_argument("--dtype", default="int8", choices=["fp32", "fp16", "int8"], help="how the delta is stored")
    p.add_argument("--overlay", help="write base | personalized predictions side by side: .mp4/.avi, else PNGs")
    p.add_argument("--json", dest="json_out", help="write the outcome (delta or kept_base, safeguards and their "
                                                   "reasons, timings) as JSON")
    _device_arg(p)
    _set_arg(p)
    p.set_defaults(target="client.edge:main")

    p = sub.add_parser("export", help="the pose path (crop -> keypoints + scores) as one TorchScript or ONNX file "
                                      "for on-device inference")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a training run directory")
    p.add_argument("--delta", default=None,
                   help="personalize first: a delta file/URL for this checkpoint, checked by the store's delta policy")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript"],
                   help="onnx (needs the 'export' extra: pip install 'posettp[export]') or torchscript")
    p.add_argument("--out", required=True, help="file/URL to write (.onnx or .pt)")
    p.set_defaults(target="client.export:main")

    p = sub.add_parser("evaluate", help="per-person and mean PCK with or without TTP")
    p.add_argument("--checkpoint", required=True, help="checkpoint directory, or a training run directory")
    p.add_argument("--data", required=True, help="shards URL")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="which persons")
    p.add_argument("--scenario", choices=["none", "online", "offline"], default="none", help="TTP before scoring")
    p.add_argument("--store", help="apply each person's latest stored delta (scenario none)")
    p.add_argument("--persons", type=int, default=None, help="evaluate only the first N persons")
    _device_arg(p)
    p.add_argument("--json", dest="json_out", help="write per-person and mean metrics as JSON")
    _set_arg(p)
    p.set_defaults(target="training.evaluate:main")

    p = sub.add_parser("reproduce", help="the paper's experiments on our data")
    p.add_argument("experiment", choices=["table1", "table2", "table5", "fig3", "fig4"], help="what to reproduce")
    _config_args(p)
    p.add_argument("--out", default="runs/reproduce", help="models, evaluations (a resumable cache) and outputs")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per model")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="table1's rows, comma-separated (with baseline, each row's (+Δ) is against it)")
    p.add_argument("--eval-data", default=None,
                   help="persons to evaluate and personalize on (their data.test_split), when not data.url's: "
                        "validation persons of their own seed, say; the models still train on data.url")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                   help="worker processes for the models and evaluations")
    _device_arg(p)
    p.add_argument("--json", dest="json_out", help="also write the result as JSON here")
    p.set_defaults(target="training.reproduce:main")

    p = sub.add_parser("serve", help="run the Ray Serve app in the foreground")
    p.add_argument("--checkpoint", required=True, help="base checkpoint, or a training run directory")
    p.add_argument("--store", required=True, help="delta store URL: each person's latest delta is served")
    p.add_argument("--host", default="127.0.0.1", help="HTTP address (0.0.0.0 opens the endpoint to the network)")
    p.add_argument("--port", type=int, default=8100, help="HTTP port")
    p.add_argument("--config", default="serve", help="Serve config: a shipped name or a YAML path")
    p.set_defaults(target="server.serve:main")

    p = sub.add_parser("flower-app", help="write the Flower app (ServerApp, ClientApp, run config) to a directory "
                                          "for `flwr run DIR` from an installed package")
    p.add_argument("--out", required=True, help="a new (or empty) directory")
    p.set_defaults(target="server.flower_app:main")

    p = sub.add_parser("token", help="per-person bearer tokens of the pose API (stored hashed)")
    p.add_argument("action", choices=["add", "list", "revoke"], help="add prints the new token alone on its last line")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", help="delta store URL (tokens at {store}/auth/tokens.json)")
    where.add_argument("--tokens", help="tokens file URL")
    p.add_argument("--person", help="person id (add, revoke)")
    p.set_defaults(target="server.auth:token_command")

    p = sub.add_parser("node", help="bind Flower SuperNode ids to the persons they may personalize")
    p.add_argument("action", choices=["bind", "unbind", "list"], help="bind and unbind need --node (bind: --person)")
    p.add_argument("--store", required=True, help="delta store URL (bindings at {store}/auth/nodes.json)")
    p.add_argument("--file", default="", help="bindings file URL instead of {store}/auth/nodes.json")
    p.add_argument("--node", type=int, help="SuperNode id (`flwr supernode register` prints it)")
    p.add_argument("--person", help="person id [A-Za-z0-9_.-]{1,64} (bind)")
    p.set_defaults(target="server.nodes:node_command")

    p = sub.add_parser("demo", help="the whole pipeline on synthetic data")
    p.add_argument("--out", default="demo-out", help="where the demo writes its data, runs, store and report")
    p.set_defaults(target="posettp.demo:main")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    module_name, func_name = args.target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.startswith(module_name.split(".")[0]):
            print(f"posettp {args.command}: not built yet ({module_name})", file=sys.stderr)
            return 2
        raise
    try:
        return int(getattr(module, func_name)(args) or 0)
    except (ValueError, FileNotFoundError, PermissionError) as exc:
        if args.verbose:
            raise
        print(f"posettp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
