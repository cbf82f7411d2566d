"""The pose path as one self-contained module, for on-device inference: TorchScript or ONNX.

`PosePath` maps crops to keypoints exactly as `model.predict.predict_crops` does before it maps them back to the
original image: (N, 3, S, S) float32 RGB crops in [0, 1] (`model.transforms.to_tensor_layout` of the
`core.crops.prepare_crop` warp; the network takes them as they are, no mean/std) -> encoder, self_head and sup_head
(`PoseTTPNet.pose`) -> supervised heatmaps (averaged with the mirrored crop's under `model.flip_test`) -> the
configured decoder (`model.decode`, `model.heatmaps.DECODERS`) -> (N, J, 3) [x, y, score] with x, y in crop pixels
(`heatmap_to_image`) and the score the heatmap peak. To land in the original image, map x, y through the inverse of
the crop's affine, as `predict_crops` does.

Both decoders are branch-free tensor code (`torch.where`, no data-dependent Python control flow), so tracing records
them as they are: the exported graph calls the project's own decoders, and the batch axis stays dynamic (sizes are
traced, not baked in). Only the modules inference uses are kept: the renderer, appearance and keypoint encoders and
the rotation head are not in the exported file.

Pure PyTorch; the ONNX export needs the `onnx` package (the TorchScript-based exporter, `dynamo=False`, needs no
`onnxscript`), imported by torch only when `export_onnx` runs.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn as nn

from .heatmaps import DECODERS, heatmap_to_image
from .network import PoseTTPNet
from .joints import joint_set

INPUT_NAME = "crops"
OUTPUT_NAME = "keypoints"
ONNX_OPSET = 17


class PosePath(nn.Module):
    """(N, 3, S, S) crops in [0, 1] -> (N, J, 3) [x, y, score], x and y in crop pixels.

    Holds (shares, not copies) the model's `encoder`, `self_head` (transformer variant) and `sup_head`; call it on a
    model in eval mode (the constructor puts the wrapper, and so those modules, in eval mode).
    """

    def __init__(self, model: PoseTTPNet):
        super().__init__()
        cfg = model.cfg
        if cfg.decode not in DECODERS:
            raise ValueError(f"model.decode must be one of {sorted(DECODERS)}, got {cfg.decode!r}")
        self.variant = cfg.variant
        self.decode_name = cfg.decode
        self.image_size = int(cfg.image_size)
        self.num_joints = int(cfg.num_joints)
        self.encoder = model.encoder
        self.self_head = model.self_head if self.variant == "transformer" else None
        self.sup_head = model.sup_head
        self.flip_test = bool(cfg.flip_test)
        perm = joint_set(cfg.joint_set).flip_permutation() if self.flip_test else list(range(cfg.num_joints))
        self.register_buffer("flip_perm", torch.as_tensor(perm, dtype=torch.long), persistent=False)
        self.eval()

    def heatmaps(self, images: torch.Tensor) -> torch.Tensor:
        """`PoseTTPNet.pose(images)["h_sup"]` with only the modules it needs."""
        feats = self.encoder(images)
        if self.variant == "transformer":
            return torch.einsum("bjk,bkhw->bjhw", self.sup_head(feats), self.self_head(feats))
        return self.sup_head(feats)

    def forward(self, crops: torch.Tensor) -> torch.Tensor:
        h_sup = self.heatmaps(crops).float()
        if self.flip_test:  # as model.predict.mirrored_heatmaps: mirror, predict, mirror back, swap left/right
            mirrored = self.heatmaps(crops.flip(-1)).flip(-1)[:, self.flip_perm].float()
            h_sup = 0.5 * (h_sup + mirrored)
        coords, score = DECODERS[self.decode_name](h_sup)
        coords = heatmap_to_image(coords, self.image_size, h_sup.shape[-1])
        return torch.cat([coords, score.unsqueeze(-1).to(coords.dtype)], dim=-1)


def pose_path(model: PoseTTPNet) -> PosePath:
    """The pose path of `model`, on CPU in eval mode, ready to export (`model` is moved to CPU and set to eval)."""
    model.eval().cpu()
    return PosePath(model)


def _example(image_size: int, batch: int = 2) -> torch.Tensor:
    # batch 2, not 1: a size-1 dimension can be specialised away by the tracer; random, so no argmax ties
    return torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))


def _wrapped(model: nn.Module, image_size: int) -> PosePath:
    net = model if isinstance(model, PosePath) else pose_path(model)
    if int(image_size) != net.image_size:  # the crop -> pixel scale is the model's: another size would be wrong
        raise ValueError(f"image_size {image_size} is not the model's crop size {net.image_size} (model.image_size)")
    return net.eval()


def _quiet_tracing() -> None:
    """Inside `warnings.catch_warnings()`: silence what tracing this module always says and never means here.

    TracerWarnings come from shape checks in MultiheadAttention and the norms (static shapes: the crop size is
    fixed, and the batch axis is traced, as the tests check at other batch sizes); TorchScript's own deprecation
    notices (torch 2.13 still ships and supports `torch.jit.trace/save/load`).
    """
    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=DeprecationWarning)


def export_torchscript(model: nn.Module, image_size: int, path: str | Path) -> Path:
    """Trace the pose path (a `PosePath`, or a `PoseTTPNet` to wrap) and save it with `torch.jit.save`.

    Load with `torch.jit.load(path)`; call on any batch of (3, image_size, image_size) crops.
    """
    net = _wrapped(model, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        _quiet_tracing()
        traced = torch.jit.trace(net, _example(image_size), check_trace=False)
        torch.jit.save(traced, str(path))
    return Path(path)


def export_onnx(model: nn.Module, image_size: int, path: str | Path, opset: int = ONNX_OPSET) -> Path:
    """Export the pose path to ONNX (input `crops` (N, 3, S, S), output `keypoints` (N, J, 3), N dynamic).

    Uses the TorchScript-based exporter (`dynamo=False`): it needs the `onnx` package and nothing else
    (the torch.export-based one also needs `onnxscript`). Raises ModuleNotFoundError naming `onnx` without it.
    """
    try:
        import onnx  # noqa: F401  (torch imports it lazily; fail early with a clear name)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError("ONNX export needs the 'onnx' package (pip install 'posettp[export]')",
                                  name="onnx") from exc
    net = _wrapped(model, image_size)
    # In eval mode without grad, nn.MultiheadAttention takes its fused fast path (aten::_native_multi_head_attention),
    # which has no ONNX symbolic: export the same attention written out in plain ops instead (a process-wide switch,
    # put back as it was).
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            _quiet_tracing()
            warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export", category=Warning)
            warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning)
            # the decoders' gathers index with clamped (never negative) positions, and flip(-1) is a step -1 slice
            # that is simply not folded: both warnings are about cases this graph does not have
            warnings.filterwarnings("ignore", message=r".*If indices include negative values.*", category=UserWarning)
            warnings.filterwarnings("ignore", message=r".*Only steps=1 can be constant folded.*", category=UserWarning)
            torch.onnx.export(net, (_example(image_size),), str(path), dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              do_constant_folding=True, verbose=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return Path(path)
