"""`posettp info`: parameter counts per submodule and pose-forward GFLOPs."""
from __future__ import annotations

import json

from model.config import load_config
from model.network import build_model, parameter_counts, pose_gflops


def main(args) -> int:
    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model)
    counts = parameter_counts(model)
    gflops = pose_gflops(model)
    if args.json:
        print(json.dumps({"params": counts, "gflops": round(gflops, 4), "dataset": cfg.data.dataset,
                          "joint_set": cfg.model.joint_set, "joints": cfg.model.num_joints}))
        return 0
    print(f"{cfg.name}: variant={cfg.model.variant} backbone={cfg.model.backbone} image={cfg.model.image_size} "
          f"joints={cfg.model.num_joints} ({cfg.model.joint_set}, dataset {cfg.data.dataset})")
    for name, n in counts.items():
        print(f"  {name:14s} {n:>12,}")
    print(f"  pose forward   {gflops:.3f} GFLOP per image (perceptual VGG excluded)")
    return 0
