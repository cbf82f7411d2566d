"""Ship a trained checkpoint with the package, small (fp16 weights), with the commands that made it recorded.

The demo fine-tunes the shipped `synth_small` checkpoint instead of training one from scratch in its minutes: a
400-step model was too weak for personalization to act on. The record (`made_by` in its config.json) names the
commands that made the data and the model, and the commit they ran at, so anyone can make it again.

Run: .venv/bin/python scripts/ship_pretrained.py --checkpoint runs/r38/models/transformer-s0 \
         --data-command "posettp synth ..." --train-command "posettp reproduce ..." --out posettp/pretrained/synth_small
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
from pathlib import Path

from safetensors.torch import load_file, save

from model.checkpoint import META, WEIGHTS, load_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data-command", required=True, help="the command that made its training data")
    ap.add_argument("--train-command", required=True, help="the command that trained it")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    src, out = Path(args.checkpoint), Path(args.out)
    weights = save({k: v.half() if v.is_floating_point() else v
                    for k, v in load_file(str(src / WEIGHTS)).items()})
    meta = json.loads((src / META).read_text())
    meta.update(sha256=hashlib.sha256(weights).hexdigest(), made_by={
        "data": args.data_command, "train": args.train_command, "weights": "fp16 copy of the fp32 weights",
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()})
    out.mkdir(parents=True, exist_ok=True)
    (out / WEIGHTS).write_bytes(weights)
    (out / META).write_text(json.dumps(meta, indent=2))
    ck = load_checkpoint(str(out))  # it loads as any checkpoint does
    print(f"wrote {out} ({len(weights) / 1e6:.1f} MB, sha256 {ck.sha256[:12]}, step {meta['step']})")


if __name__ == "__main__":
    main()
