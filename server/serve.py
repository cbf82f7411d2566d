"""Ray Serve app: one HTTP pose endpoint, per-person models = shared base + that person's delta.

HTTP:
    POST /v1/persons/{person_id}/pose[?bbox=x,y,w,h]   body: a JPEG or PNG
        -> {person_id, model_version, keypoints: [{name, x, y, score} x 13], latency_ms, fallback}
    GET  /v1/persons/{person_id}                        model info (version, memory of the cached person)
    GET  /healthz

Two deployments. `PoseIngress` (FastAPI) validates the request, decodes the
image and crops it with `core.crops`; `PoseModel` holds the base model
once per replica and, multiplexed by person id (`@serve.multiplexed`, LRU),
each person's model as a shallow copy of the base in which only the tensors the
delta changed are new (`apply_delta`); `@serve.batch` batches requests, which
Serve splits per person. With `colocate: true` there is one deployment: the
ingress runs the same PoseModel code in its own replica (one Ray hop less).
Every person's `latest.json` is re-read at most every `ttl_s`, so a newly
landed delta serves the next request without a restart.
A delta the store refuses (corrupt, tampered, for another base) makes that
person fall back to the base model with the reason logged and returned.

Run:  posettp serve --checkpoint CK --store URL [--host 127.0.0.1 --port 8100 --config configs/serve.yaml]
      RAY_ADDRESS=local serve run configs/serve.yaml        (args from the file; ${VAR} expanded;
                                                             note: serve run also starts a dashboard on 8265)
      RAY_ADDRESS=local serve run server.serve:build_app checkpoint=CK store=URL auth=false
      serve deploy configs/serve.yaml --address http://127.0.0.1:8265
"""
import asyncio
import contextlib
import copy
import dataclasses
import io as _io
import json
import logging
import math
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from PIL import Image
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.crops import prepare_crop
from core.local_ray import init_local_ray, loopback_grpc_servers
from model import io
from model.checkpoint import META, checkpoint_url, load_checkpoint
from model.config import config_path, from_dict, setting, settings_from_mapping
from model.delta import DEFAULT_NORM_BOUND, DeltaRejected, apply_delta
from model.joints import joint_set
from model.network import PoseTTPNet
from model.predict import predict_crops
from model.transforms import full_image_bbox, keypoints_json
from server.auth import AuthError, TokenTable, default_tokens_url
from store.deltas import DeltaStore
from store.policy import DeltaPolicy, check_person_id

log = logging.getLogger("ray.serve")

APP_NAME = "posettp"
INLINE_DECODE_BYTES = 640 * 480 * 3  # decoded bytes: a VGA frame decodes in about a millisecond
EXIF_ORIENTATION = 0x0112  # the EXIF tag; values 5-8 turn the image by 90 degrees (width and height swap)
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


# ---------------------------------------------------------------------------------------------
# settings (the `args` of configs/serve.yaml)


@dataclass
class ServeSettings:
    checkpoint: str = setting("", "checkpoint directory URL; \"\" -> $POSETTP_CHECKPOINT")
    store: str = setting("", "delta store URL; \"\" -> $POSETTP_STORE")
    replicas: int = setting(1, "PoseModel replicas (PoseIngress replicas when colocate)")
    colocate: bool = setting(False, "one deployment: the ingress holds the models itself (saves a hop; no routing "
                                    "by person unless clients send the serve_multiplexed_model_id header)")
    num_cpus: float = setting(1.0, "CPUs per PoseModel replica")
    num_gpus: float = setting(0.0, "GPUs per PoseModel replica (the model moves to CUDA when > 0 and available)")
    ingress_replicas: int = setting(1, "PoseIngress replicas")
    ingress_num_cpus: float = setting(0.25, "CPUs per PoseIngress replica")
    lru_size: int = setting(16, "person models cached per replica (@serve.multiplexed)")
    ttl_s: float = setting(2.0, "re-read a person's latest.json at most this often (seconds)")
    max_body_bytes: int = setting(8 * 1024 * 1024, "largest request body; 413 above")
    max_image_pixels: int = setting(16_777_216, "largest decoded image (width x height); 413 above")
    max_image_side: int = setting(8192, "largest decoded image side; 413 above")
    decode_budget_bytes: int = setting(128 * 1024 * 1024, "decoded image bytes in flight per ingress replica; "
                                                          "requests beyond it wait their turn")
    batch_size: int = setting(8, "@serve.batch max batch (Serve splits batches per person)")
    batch_wait_ms: float = setting(0.0, "@serve.batch wait for a batch to fill (requests arriving during a batch "
                                        "form the next one anyway)")
    max_ongoing_requests: int = setting(32, "concurrent requests per PoseModel replica (at least batch_size)")
    auth: bool = setting(False, "per-person bearer tokens")
    tokens: str = setting("", "hashed tokens file URL; \"\" -> {store}/auth/tokens.json")
    tokens_ttl_s: float = setting(5.0, "re-read the tokens file at most this often (seconds)")
    torch_threads: int = setting(0, "torch threads per PoseModel replica; 0 -> ceil(num_cpus)")
    malloc_arena_max: int = setting(2, "MALLOC_ARENA_MAX of PoseModel replicas (keeps RSS flat as persons come and "
                                       "go); 0 = leave glibc's default")
    max_delta_bytes: int = setting(0, "largest delta served; 0 = the delta policy's cap: every tensor a delta may "
                                      "carry in fp32 + header room")
    delta_norm_bound: float = setting(DEFAULT_NORM_BOUND, "largest ||delta|| / ||base weights it touches|| served")
    flip_test: bool = setting(False, "average each crop's heatmaps with its mirror's (twice the inference); this "
                                     "setting decides, not the checkpoint's model.flip_test")

    @classmethod
    def from_args(cls, args: dict | None) -> "ServeSettings":
        """Typed settings from a config `args` mapping (values may be strings, as `serve run k=v` gives)."""
        s = settings_from_mapping(cls, args, what="serve setting")
        s.checkpoint = _resolve_url(os.path.expandvars(s.checkpoint) or os.environ.get("POSETTP_CHECKPOINT", ""))
        s.checkpoint = checkpoint_url(s.checkpoint) if s.checkpoint else s.checkpoint
        s.store = _resolve_url(os.path.expandvars(s.store) or os.environ.get("POSETTP_STORE", ""))
        s.tokens = _resolve_url(os.path.expandvars(s.tokens))
        for name, value in (("checkpoint", s.checkpoint), ("store", s.store)):
            if not value or "${" in value or value.startswith("$"):
                raise ValueError(f"serve setting {name!r} is not set: pass --{name}, set it in the config's args, "
                                 f"or set POSETTP_{name.upper()}")
        if s.auth and not s.tokens:
            s.tokens = default_tokens_url(s.store)
        for name in ("replicas", "ingress_replicas", "lru_size", "batch_size", "max_body_bytes", "max_image_pixels",
                     "max_image_side", "max_ongoing_requests", "decode_budget_bytes"):
            if getattr(s, name) < 1:
                raise ValueError(f"serve setting {name} must be >= 1, got {getattr(s, name)}")
        if s.max_ongoing_requests < s.batch_size:
            s.max_ongoing_requests = s.batch_size
        return s

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _resolve_url(url: str) -> str:
    """Local paths become absolute (replicas may run elsewhere in the filesystem); URLs stay."""
    if not url or "://" in url or "$" in url:
        return url
    return os.path.abspath(os.path.expanduser(url))


# ---------------------------------------------------------------------------------------------
# request parsing and validation (no Ray here: unit-tested directly)


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def validate_person_id(person_id: str) -> str:
    try:
        return check_person_id(person_id)
    except DeltaRejected as exc:
        raise ApiError(400, str(exc)) from None


def parse_bbox(text: str | None, width: int, height: int) -> tuple[float, float, float, float]:
    """`x,y,w,h` in original pixels; absent -> the whole image (`full_image_bbox`)."""
    if text is None or text == "":
        return full_image_bbox(width, height)
    parts = text.split(",")
    if len(parts) != 4:
        raise ApiError(400, f"bad bbox {text[:64]!r}: expected x,y,w,h")
    try:
        x, y, w, h = (float(p) for p in parts)
    except ValueError:
        raise ApiError(400, f"bad bbox {text[:64]!r}: x,y,w,h must be numbers") from None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise ApiError(400, "bad bbox: values must be finite")
    if w < 1 or h < 1:
        raise ApiError(400, f"bad bbox: width and height must be >= 1 pixel, got {w:g}x{h:g}")
    if x >= width or y >= height or x + w <= 0 or y + h <= 0:
        raise ApiError(400, f"bad bbox: ({x:g},{y:g},{w:g},{h:g}) does not overlap the {width}x{height} image")
    if max(w, h) > 16 * max(width, height):
        raise ApiError(400, "bad bbox: far larger than the image")
    return x, y, w, h


@dataclass(frozen=True)
class ImageHeader:
    fmt: str
    width: int
    height: int
    orientation: int  # EXIF orientation (1 = as stored)

    @property
    def decoded_bytes(self) -> int:
        return self.width * self.height * 3


def decode_image(data: bytes, max_pixels: int, max_side: int) -> np.ndarray:
    """JPEG/PNG bytes -> HxWx3 uint8 RGB (decoded like `data.sources`: OpenCV, BGR -> RGB)."""
    return decode_pixels(data, read_header(data, max_pixels, max_side))


def read_header(data: bytes, max_pixels: int, max_side: int) -> ImageHeader:
    """The image's format and size from its header (Pillow, no pixels decoded): a gigantic or zero-sized image is
    refused, and the size of the decoded pixels known, before any memory is spent on it."""
    if not data:
        raise ApiError(400, "empty body: send a JPEG or PNG image")
    try:
        with Image.open(_io.BytesIO(data)) as im:
            fmt, (w, h) = im.format, im.size
            orientation = im.getexif().get(EXIF_ORIENTATION, 1) if fmt == "JPEG" else 1
    except Image.DecompressionBombError:
        raise ApiError(413, "image too large") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for garbage input
        raise ApiError(400, "body is not a decodable JPEG or PNG image") from None
    if fmt not in ("JPEG", "PNG"):
        raise ApiError(400, f"unsupported image format {fmt}: send JPEG or PNG")
    if w < 1 or h < 1:
        raise ApiError(400, f"image is {w}x{h}")
    if w * h > max_pixels or max(w, h) > max_side:
        raise ApiError(413, f"image is {w}x{h}, over the limit ({max_pixels} pixels, {max_side} per side)")
    return ImageHeader(fmt, w, h, orientation)


def decode_pixels(data: bytes, header: ImageHeader) -> np.ndarray:
    """The pixels, HxWx3 uint8 RGB. A JPEG's EXIF orientation is applied (OpenCV does, as browsers do): the image,
    its bbox and the keypoints are in the orientation a viewer shows, so a portrait phone photo is upright."""
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    w, h = header.width, header.height
    shown = (w, h) if header.orientation in TRANSPOSING_ORIENTATIONS else (h, w)
    if bgr is None or bgr.shape[:2] != shown:
        raise ApiError(400, f"{header.fmt} image is truncated or corrupt")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def decode_and_crop(data: bytes, header: ImageHeader, bbox: str | None, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's crop of the image and its affine: the decoded pixels live only inside this call."""
    image = decode_pixels(data, header)
    box = parse_bbox(bbox, image.shape[1], image.shape[0])
    return prepare_crop(image, box, size)


class DecodeBudget:
    """Decoded pixel bytes in flight in one ingress replica: a request waits for its share instead of growing
    memory with what clients send (a 56 kB PNG can decode to 50 MB). An image larger than the whole budget waits
    until it has the budget to itself."""

    def __init__(self, limit_bytes: int):
        self.limit, self.used = limit_bytes, 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, nbytes: int):
        nbytes = min(nbytes, self.limit)
        async with self._changed:
            await self._changed.wait_for(lambda: self.used + nbytes <= self.limit)
            self.used += nbytes
        try:
            yield
        finally:
            async with self._changed:
                self.used -= nbytes
                self._changed.notify_all()


async def read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise ApiError(400, "bad Content-Length") from None
        if n > limit:
            raise ApiError(413, f"body is {n} bytes, over the {limit}-byte limit")
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise ApiError(413, f"body is over the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


# ---------------------------------------------------------------------------------------------
# person models: base + delta, shallow copies (no Ray here either)


def shallow_clone(root: torch.nn.Module, overrides: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `root` whose parameters/buffers named in `overrides` are replaced and all others shared.

    Only the modules on the path to a replaced tensor are copied (module objects,
    not tensors); every other submodule is the very same object as in `root`.
    """
    unknown = set(overrides) - set(root.state_dict())
    if unknown:
        raise KeyError(f"not tensors of the model: {sorted(unknown)[:3]}")
    need = {""}
    for name in overrides:
        parts = name.split(".")[:-1]
        need.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return _clone_module(root, "", need, overrides)


def _clone_module(module: torch.nn.Module, prefix: str, need: set, overrides: dict) -> torch.nn.Module:
    # a module-level function, not a closure: a recursive closure is a reference cycle that would keep
    # `overrides` (megabytes per person) alive after the LRU drops the person, until the next full gc
    new = copy.copy(module)
    new._parameters = dict(module._parameters)
    new._buffers = dict(module._buffers)
    new._modules = dict(module._modules)
    for name, child in module._modules.items():
        path = f"{prefix}.{name}" if prefix else name
        if child is not None and path in need:
            new._modules[name] = _clone_module(child, path, need, overrides)
    for name in module._parameters:
        path = f"{prefix}.{name}" if prefix else name
        if path in overrides:
            new._parameters[name] = torch.nn.Parameter(overrides[path], requires_grad=False)
    for name in module._buffers:
        path = f"{prefix}.{name}" if prefix else name
        if path in overrides:
            new._buffers[name] = overrides[path]
    return new


@dataclass(eq=False)
class PersonModel:
    """One person's materialized model and what is known about where it came from."""

    person_id: str
    model: PoseTTPNet
    version: str = "base"
    record: dict | None = None  # the latest.json record the model was built from
    fallback: dict | None = None  # {reason, version} when a stored delta was refused
    memory_bytes: int = 0  # bytes of the tensors this person does not share with the base
    changed_tensors: int = 0
    loaded_at: float = 0.0
    load_ms: float = 0.0
    checked_at: float = 0.0  # time.monotonic() of the last latest.json read
    seen: tuple | None = None  # (version, sha256) of the latest.json acted on
    lock: asyncio.Lock | None = field(default=None, repr=False)

    def snapshot(self) -> tuple:
        return self.model, self.version, self.fallback

    def describe(self) -> dict:
        return {"person_id": self.person_id, "model_version": self.version, "fallback": self.fallback,
                "delta": ({k: self.record.get(k) for k in ("version", "sha256", "bytes", "dtype", "scenario",
                                                            "created_at")} if self.record and not self.fallback
                          else None),
                "memory_bytes": self.memory_bytes, "changed_tensors": self.changed_tensors,
                "loaded_at": self.loaded_at, "load_ms": round(self.load_ms, 3),
                "checked_s_ago": round(time.monotonic() - self.checked_at, 3)}


class PersonModels:
    """Base model loaded once; person models built from it and the delta store; predictions."""

    def __init__(self, checkpoint: str, store: str, device: str = "cpu", ttl_s: float = 2.0,
                 max_delta_bytes: int = 0, norm_bound: float = DEFAULT_NORM_BOUND, flip_test: bool = False):
        ck = load_checkpoint(checkpoint, map_location=device)
        self.base = ck.model.eval()
        self.base.cfg.flip_test = flip_test  # person models share the base's cfg
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.config = ck.config
        self.sha256 = ck.sha256
        self.store = DeltaStore(store, DeltaPolicy.for_checkpoint(ck, max_bytes=max_delta_bytes, norm_bound=norm_bound))
        self.base_state = self.store.policy.state
        self.ttl_s = ttl_s
        self.image_size = ck.config.model.image_size
        self.names = ck.joint_set.joints  # the checkpoint's own joint set
        self._live = weakref.WeakSet()  # the cached persons (the LRU drops them)
        self._live_lock = threading.Lock()
        self.base_bytes = sum(t.numel() * t.element_size() for t in self.base.state_dict().values())
        self.loads = 0  # person models built here: with the LRU's hits, the cache-hit ratio across replicas

    # -- building ------------------------------------------------------------------------------

    def _base_entry(self, person_id: str, record: dict | None = None, fallback: dict | None = None,
                    seen: tuple | None = None) -> PersonModel:
        return PersonModel(person_id, self.base, "base", record, fallback, 0, 0, time.time(), 0.0,
                           time.monotonic(), seen)

    def load(self, person_id: str) -> PersonModel:
        """Build a person's model from the store (base when there is no delta or it is refused)."""
        check_person_id(person_id)
        self.loads += 1
        t0 = time.perf_counter()
        try:
            record = self.store.latest(person_id)
        except Exception as exc:  # noqa: BLE001 - storage errors: serve base, retry at the next check
            return self._fallback(person_id, None, exc, None)
        if record is None:
            entry = self._base_entry(person_id)
        else:
            seen = (record.get("version"), record.get("sha256"))
            try:
                found = self.store.load_latest(person_id)
            except DeltaRejected as exc:
                return self._fallback(person_id, record, exc, seen)
            except Exception as exc:  # noqa: BLE001 - missing/unreadable file: retry at the next check
                return self._fallback(person_id, record, exc, None)
            if found is None:  # latest.json vanished in between
                entry = self._base_entry(person_id)
            else:
                delta, _meta, record = found
                merged = apply_delta(self.base_state, delta)
                overrides = {k: merged[k] for k in delta}
                model = shallow_clone(self.base, overrides)
                entry = PersonModel(person_id, model, record["version"], record, None,
                                    sum(t.numel() * t.element_size() for t in overrides.values()), len(overrides),
                                    time.time(), 0.0, time.monotonic(), (record.get("version"), record.get("sha256")))
        entry.load_ms = (time.perf_counter() - t0) * 1e3
        self._remember(entry)
        return entry

    def _fallback(self, person_id: str, record: dict | None, exc: Exception, seen: tuple | None) -> PersonModel:
        """The base model, with the reason the client sees: a refusal's own words, or for a storage error only its
        kind (its message may name the server's paths; the log has it whole)."""
        version = record.get("version") if record else None
        log.warning("person %s: delta %s refused (%s: %s); serving the base model", person_id, version,
                    type(exc).__name__, exc)
        unreadable = f"the stored delta is unreadable ({type(exc).__name__})"
        reason = str(exc) if isinstance(exc, DeltaRejected) else unreadable
        entry = self._base_entry(person_id, record, {"reason": reason, "version": version}, seen)
        self._remember(entry)
        return entry

    def _remember(self, entry: PersonModel) -> None:
        with self._live_lock:
            self._live.add(entry)

    def _forget(self, entry: PersonModel) -> None:
        with self._live_lock:
            self._live.discard(entry)

    def needs_check(self, entry: PersonModel) -> bool:
        return time.monotonic() - entry.checked_at >= self.ttl_s

    def check(self, entry: PersonModel) -> PersonModel | None:
        """Re-read latest.json; a new PersonModel when it names another version (or a retry is due), else None.

        Safe in a worker thread: `entry` itself is not changed (see `adopt`) except its check time.
        """
        try:
            record = self.store.latest(entry.person_id)
        except Exception as exc:  # noqa: BLE001 - keep serving what we have
            log.warning("person %s: cannot read latest.json (%s); keeping %s", entry.person_id, exc, entry.version)
            entry.checked_at = time.monotonic()
            return None
        key = (record.get("version"), record.get("sha256")) if record else None
        if key == entry.seen and (record is not None or entry.fallback is None):
            entry.checked_at = time.monotonic()
            return None
        new = self.load(entry.person_id)
        self._forget(new)
        return new

    def adopt(self, entry: PersonModel, new: PersonModel) -> bool:
        """Move `new` into the cached `entry` (in the thread that serves requests, so no request sees half)."""
        changed = new.version != entry.version or new.fallback != entry.fallback
        for f in dataclasses.fields(PersonModel):
            if f.name not in ("person_id", "lock"):
                setattr(entry, f.name, getattr(new, f.name))
        if changed:
            log.info("person %s: now serving %s", entry.person_id, entry.version)
        return changed

    def refresh(self, entry: PersonModel) -> bool:
        """check + adopt in one call (single-threaded callers). True if the model changed."""
        new = self.check(entry)
        return self.adopt(entry, new) if new is not None else False

    # -- inference -----------------------------------------------------------------------------

    def predict(self, model: PoseTTPNet, crops: np.ndarray, matrices: np.ndarray) -> np.ndarray:
        return predict_crops(model, torch.from_numpy(np.ascontiguousarray(crops, dtype=np.float32)),
                             np.asarray(matrices, dtype=np.float64))

    def stats(self) -> dict:
        with self._live_lock:
            live = list(self._live)
        return {"cached_persons": len(live), "cached_bytes": sum(e.memory_bytes for e in live),
                "base_bytes": self.base_bytes, "rss_bytes": rss_bytes(), "person_loads": self.loads}


def _replica_id() -> str:
    """This Serve replica's id ("" outside a replica, as in the colocated unit tests)."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - no replica context
        return ""


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------
# Ray Serve deployments


@serve.deployment(name="PoseModel", graceful_shutdown_timeout_s=5)
class PoseModel:
    """Base model once per replica; person models multiplexed (LRU) by person id; batched inference."""

    def __init__(self, settings: dict):
        loopback_grpc_servers()
        s = ServeSettings(**settings)
        threads = s.torch_threads or max(1, math.ceil(s.num_cpus))
        torch.set_num_threads(threads)
        device = "cuda" if s.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.device = device
        self.models = PersonModels(s.checkpoint, s.store, device, s.ttl_s, s.max_delta_bytes, s.delta_norm_bound,
                                   s.flip_test)
        self.lru_size = s.lru_size
        # one loader thread for store reads and delta application (Serve loads one model at a time
        # anyway); with MALLOC_ARENA_MAX (settings.malloc_arena_max) this keeps RSS flat as persons are
        # loaded and dropped (measured: glibc's default arenas let it creep ~3 MB per 200 cold loads)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="posettp-load")

        async def load_person(person_id: str) -> PersonModel:
            entry = await asyncio.get_running_loop().run_in_executor(self._loader, self.models.load, person_id)
            entry.lock = asyncio.Lock()
            return entry

        self._get_person = serve.multiplexed(max_num_models_per_replica=s.lru_size)(load_person)
        self._predict_batch.set_max_batch_size(s.batch_size)
        self._predict_batch.set_batch_wait_timeout_s(s.batch_wait_ms / 1e3)
        log.info("PoseModel ready: base %s, image %d, device %s, LRU %d, TTL %.1fs, batch %d/%.1fms, "
                 "MALLOC_ARENA_MAX=%s", self.models.sha256[:12], self.models.image_size, device, s.lru_size, s.ttl_s,
                 s.batch_size, s.batch_wait_ms, os.environ.get("MALLOC_ARENA_MAX", "default"))

    async def _person(self, person_id: str | None = None) -> PersonModel:
        entry = await self._get_person(person_id or serve.get_multiplexed_model_id())
        if self.models.needs_check(entry):
            async with entry.lock:
                if self.models.needs_check(entry):
                    new = await asyncio.get_running_loop().run_in_executor(self._loader, self.models.check, entry)
                    if new is not None:
                        self.models.adopt(entry, new)
        return entry

    async def predict(self, crop: np.ndarray, matrix: np.ndarray, person_id: str | None = None) -> dict:
        entry = await self._person(person_id)
        return await self._predict_batch(entry.snapshot(), crop, matrix)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)  # both set from the settings in __init__
    async def _predict_batch(self, snapshots: list, crops: list, matrices: list) -> list[dict]:
        # Serve splits batches by multiplexed model id, so one batch is one person (colocated: any persons,
        # and a hot update landing mid-batch can give two snapshots): group by model object
        groups: dict[int, list[int]] = {}
        for i, (model, _, _) in enumerate(snapshots):
            groups.setdefault(id(model), []).append(i)
        out: list[dict | None] = [None] * len(snapshots)
        for idx in groups.values():
            model, version, fallback = snapshots[idx[0]]
            # computed on the replica's user event loop on purpose: requests arriving meanwhile queue up
            # and form the next batch (Serve forms batches independently of the running one)
            pred = self.models.predict(model, np.stack([crops[i] for i in idx]), np.stack([matrices[i] for i in idx]))
            for k, i in enumerate(idx):
                out[i] = {"model_version": version, "fallback": fallback, "keypoints": pred[k].tolist()}
        return out

    async def info(self, person_id: str | None = None) -> dict:
        entry = await self._person(person_id)
        return {**entry.describe(), "base_sha256": self.models.sha256,
                "replica": {**self.models.stats(), "lru_size": self.lru_size, "id": _replica_id()}}

    async def health(self) -> dict:
        return {"base_sha256": self.models.sha256, "image_size": self.models.image_size, "device": self.device,
                "num_joints": len(self.models.names), "flip_test": self.models.base.cfg.flip_test,
                **self.models.stats(), "lru_size": self.lru_size, "replica": _replica_id()}


api = FastAPI(title="posettp pose API", version="1")


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


@api.exception_handler(ApiError)
async def _api_error(request: Request, exc: ApiError):
    return _error(exc.status, exc.message)


@api.exception_handler(AuthError)
async def _auth_error(request: Request, exc: AuthError):
    return _error(exc.status, exc.message, {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException):
    return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError):
    return _error(400, f"bad request: {exc.errors()[:1]}")


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception):
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return _error(500, f"internal error: {type(exc).__name__}")


@serve.deployment(name="PoseIngress", graceful_shutdown_timeout_s=5)
@serve.ingress(api)
class PoseIngress:
    def __init__(self, model, settings: dict):
        loopback_grpc_servers()
        self.s = ServeSettings(**settings)
        self.model = model
        # colocated: the same PoseModel code, run inside this replica instead of behind a handle
        self.local = PoseModel.func_or_class(settings) if model is None else None
        meta = json.loads(io.read_bytes(io.join(self.s.checkpoint, META)))
        mcfg = from_dict(meta["config"]).model
        self.image_size = mcfg.image_size
        self.names = joint_set(mcfg.joint_set).joints
        self.tokens = TokenTable(self.s.tokens, self.s.tokens_ttl_s) if self.s.auth else None
        self.budget = DecodeBudget(self.s.decode_budget_bytes)

    async def _authorize(self, person_id: str, request: Request) -> None:
        if self.tokens is None:
            return
        if self.tokens.stale():
            try:
                await asyncio.to_thread(self.tokens.reload)
            except Exception as exc:  # noqa: BLE001 - keep the last good table
                log.warning("cannot read tokens file %s: %s", self.tokens.url, exc)
        self.tokens.check(person_id, request.headers.get("authorization"))

    async def _call(self, method: str, person_id: str, *args):
        try:
            if self.local is not None:
                return await getattr(self.local, method)(*args, person_id=person_id)
            return await getattr(self.model.options(multiplexed_model_id=person_id), method).remote(*args)
        except Exception as exc:  # noqa: BLE001 - replica died, timed out, ...
            log.exception("PoseModel.%s failed for person %s", method, person_id)
            raise ApiError(503, f"model unavailable: {type(exc).__name__}") from None

    @api.post("/v1/persons/{person_id}/pose")
    async def pose(self, person_id: str, request: Request, bbox: str | None = None):
        t0 = time.perf_counter()
        validate_person_id(person_id)
        await self._authorize(person_id, request)
        body = await read_body(request, self.s.max_body_bytes)
        header = read_header(body, self.s.max_image_pixels, self.s.max_image_side)
        async with self.budget.hold(header.decoded_bytes):
            if header.decoded_bytes <= INLINE_DECODE_BYTES:  # small frames: a thread hand-off costs more
                crop, matrix = decode_and_crop(body, header, bbox, self.image_size)
            else:  # off the event loop, so /healthz and small requests keep answering
                crop, matrix = await asyncio.to_thread(decode_and_crop, body, header, bbox, self.image_size)
        out = await self._call("predict", person_id, crop, matrix)
        return {"person_id": person_id, "model_version": out["model_version"],
                "keypoints": keypoints_json(out["keypoints"], self.names),
                "latency_ms": round((time.perf_counter() - t0) * 1e3, 3), "fallback": out["fallback"]}

    @api.get("/v1/persons/{person_id}")
    async def person(self, person_id: str, request: Request):
        validate_person_id(person_id)
        await self._authorize(person_id, request)
        return await self._call("info", person_id)

    @api.get("/healthz")
    async def healthz(self):
        try:
            info = await (self.local.health() if self.local is not None
                          else asyncio.wait_for(self.model.health.remote(), timeout=10))
        except Exception as exc:  # noqa: BLE001
            return _error(503, f"model unavailable: {type(exc).__name__}")
        return {"status": "ok", "auth": self.s.auth, **info}


def build_app(args: dict):
    """Serve application builder (`import_path: server.serve:build_app`, args = ServeSettings fields)."""
    s = ServeSettings.from_args(args)
    load_checkpoint(s.checkpoint)  # a missing, corrupt or mismatched checkpoint fails here, in one line, before Ray
    settings = s.to_dict()
    actor = {"num_cpus": s.num_cpus, "num_gpus": s.num_gpus}
    if s.malloc_arena_max > 0:
        actor["runtime_env"] = {"env_vars": {"MALLOC_ARENA_MAX": str(s.malloc_arena_max)}}
    if s.colocate:
        return PoseIngress.options(
            num_replicas=s.replicas, max_ongoing_requests=max(64, 4 * s.max_ongoing_requests),
            ray_actor_options=actor,
        ).bind(None, settings)
    model = PoseModel.options(
        num_replicas=s.replicas, max_ongoing_requests=s.max_ongoing_requests, ray_actor_options=actor,
    ).bind(settings)
    return PoseIngress.options(
        num_replicas=s.ingress_replicas, max_ongoing_requests=max(64, 4 * s.max_ongoing_requests),
        ray_actor_options={"num_cpus": s.ingress_num_cpus},
    ).bind(model, settings)


# ---------------------------------------------------------------------------------------------
# `posettp serve`: local Ray + Serve in the foreground


def read_serve_config(path: str | None) -> dict:
    """(app args, app name, route prefix) from a Serve config file (applications[0]) or a flat args mapping."""
    import yaml

    if not path:
        return {"args": {}, "name": APP_NAME, "route_prefix": "/"}
    data = yaml.safe_load(config_path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: top level must be a mapping")
    if "applications" in data:
        apps = data["applications"] or []
        if not apps:
            raise ValueError(f"{path}: no applications")
        app = apps[0]
        return {"args": app.get("args") or {}, "name": app.get("name", APP_NAME),
                "route_prefix": app.get("route_prefix", "/")}
    return {"args": data, "name": APP_NAME, "route_prefix": "/"}


def main(args) -> int:
    import ray

    conf = read_serve_config(args.config)
    app_args = {**conf["args"], "checkpoint": args.checkpoint, "store": args.store}
    app = build_app(app_args)  # validates settings and the checkpoint before Ray starts
    s = ServeSettings.from_args(app_args)
    if not re.fullmatch(r"[A-Za-z0-9_.:\[\]-]+", args.host or ""):
        raise ValueError(f"bad --host {args.host!r}")

    stop = threading.Event()
    state = {"starting": True}

    def on_signal(signum, _frame):
        if not stop.is_set():
            print(f"posettp serve: {signal.Signals(signum).name}, shutting down", flush=True)
        stop.set()
        if state["starting"]:  # abort a deployment still in progress
            raise KeyboardInterrupt

    own_temp = not os.environ.get("POSETTP_RAY_TEMP_DIR")
    temp_dir = os.environ.get("POSETTP_RAY_TEMP_DIR") or tempfile.mkdtemp(prefix="posettp-ray-", dir="/tmp")
    need_cpus = s.replicas * s.num_cpus + (0 if s.colocate else s.ingress_replicas * s.ingress_num_cpus)
    rc = 0
    original = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    init_local_ray(namespace="posettp-serve", _temp_dir=temp_dir, include_dashboard=False,
                   num_cpus=max(os.cpu_count() or 1, math.ceil(need_cpus)), num_gpus=None if s.num_gpus else 0,
                   log_to_driver=True)
    # after ray.init: Ray installs a SIGTERM handler that kills its processes and exits 1
    for sig in original:
        signal.signal(sig, on_signal)
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": args.host, "port": args.port})
        serve.run(app, name=conf["name"], route_prefix=conf["route_prefix"])
        state["starting"] = False
        url = f"http://{args.host}:{args.port}{conf['route_prefix'].rstrip('/')}"
        print(json.dumps({"event": "ready", "url": url, "checkpoint": s.checkpoint, "store": s.store,
                          "auth": s.auth, "ray_temp_dir": temp_dir}), flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - report, then shut down cleanly
        print(f"posettp serve: error: {type(exc).__name__}: {exc}", flush=True)
        rc = 2
    finally:
        state["starting"] = False
        for sig in original:  # a second signal now must not interrupt the shutdown
            signal.signal(sig, signal.SIG_IGN)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if own_temp:
                shutil.rmtree(temp_dir, ignore_errors=True)
            for sig, handler in original.items():
                signal.signal(sig, handler)
    print("posettp serve: stopped", flush=True)
    return rc
