"""`posettp export`: the pose path of a checkpoint (optionally personalized by a delta) as one file for on-device
inference, TorchScript or ONNX.

The file maps (N, 3, S, S) float32 RGB crops in [0, 1] (as `core.crops.prepare_crop` makes them) to (N, J, 3)
[x, y, score] in crop pixels, what `model.predict.predict_crops` computes before it maps the keypoints back through
the inverse crop affine (`model.export.PosePath`). A delta is held to the same policy (`store.policy.DeltaPolicy`)
as everywhere else before it touches the weights.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import tempfile

from core.checkpoints import with_weights
from model import io
from model.checkpoint import load_checkpoint
from model.delta import apply_delta
from model.export import export_onnx, export_torchscript, pose_path
from store.policy import DeltaPolicy

FORMATS = ("onnx", "torchscript")
EXPORTERS = {"onnx": export_onnx, "torchscript": export_torchscript}
MISSING_ONNX = ("posettp export: error: --format onnx needs the 'onnx' package, which is not installed: "
                "pip install 'posettp[export]' (or: pip install onnx)")


def main(args) -> int:
    fmt = args.format
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "onnx" and importlib.util.find_spec("onnx") is None:  # before loading anything
        print(MISSING_ONNX, file=sys.stderr)
        return 2
    ck = load_checkpoint(args.checkpoint)
    model, source = ck.model, f"base {ck.sha256[:12]}"
    if getattr(args, "delta", None):
        delta, meta = DeltaPolicy.for_checkpoint(ck).check(io.read_bytes(args.delta))  # DeltaRejected: ValueError
        model = with_weights(ck.model, apply_delta(ck.model.state_dict(), delta))
        source += f" + delta for {meta.get('person_id', '?')} ({len(delta)} tensors)"
    size = ck.config.model.image_size
    with tempfile.TemporaryDirectory(prefix="posettp-export-") as tmp:  # exporters write local files; --out: any URL
        local = os.path.join(tmp, "model.onnx" if fmt == "onnx" else "model.pt")
        EXPORTERS[fmt](pose_path(model), size, local)
        with open(local, "rb") as f:
            data = f.read()
    io.write_bytes_atomic(args.out, data)
    print(f"exported {fmt} {args.out} ({len(data):,} bytes): input crops N x 3 x {size} x {size} float32 RGB in "
          f"[0, 1] -> keypoints N x {ck.config.model.num_joints} x 3 [x, y, score] in crop pixels "
          f"(decode {ck.config.model.decode}{', flip test' if ck.config.model.flip_test else ''}; {source})")
    return 0
