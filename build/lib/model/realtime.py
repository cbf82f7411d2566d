"""Real-time online TTP (beyond the paper): prediction for frame t never waits for adaptation.

A background thread adapts a private copy of the model on the stream seen so far
(behind the same pose-signal gate as the synchronous online mode) and publishes a
snapshot of the adapted tensors after each update; `predict` runs on whatever
snapshot is newest, swapping it in by reference (no copy on the prediction path
and no lock held while the network runs).
"""
from __future__ import annotations

import copy
import queue
import threading

import numpy as np
import torch

from .config import TTPConfig
from .losses import ReconstructionLoss
from .network import PoseTTPNet
from .personalize import _Adapter, draw_pairs, probe_pairs
from .predict import predict_crops


class FrameStream:
    """The frames and video ids seen so far, in storage that doubles when full.

    Appending is O(1) amortised and `upto(t)` returns views of the first t + 1 entries: the adaptation thread
    reads them without copying the stream (rows already written never change, and a full buffer is replaced,
    not overwritten), so an update costs the same at frame 10 as at frame 10,000.
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self.frames: torch.Tensor | None = None
        self.groups = np.zeros(0, np.int64)
        self.size = 0

    def append(self, crop: torch.Tensor, group: int) -> int:
        """Store a frame; returns its index."""
        if self.frames is None or self.size == len(self.frames):
            capacity = max(self.capacity, 2 * self.size)
            frames, groups = crop.new_empty((capacity, *crop.shape)), np.zeros(capacity, np.int64)
            if self.frames is not None:
                frames[:self.size], groups[:self.size] = self.frames, self.groups
            self.frames, self.groups = frames, groups
        self.frames[self.size], self.groups[self.size] = crop, group
        self.size += 1
        return self.size - 1

    def upto(self, t: int) -> tuple[torch.Tensor, np.ndarray]:
        return self.frames[:t + 1], self.groups[:t + 1]


class RealtimePersonalizer:
    def __init__(self, model: PoseTTPNet, recon_loss: ReconstructionLoss | None, cfg: TTPConfig, seed: int = 0,
                 adapt_threads: int = 1):
        self.adapter = _Adapter(model, recon_loss, cfg, seed)
        self.cfg = cfg
        self.serving = copy.deepcopy(model).eval()  # the copy predictions run on
        self.names = [n for n, p in self.adapter.model.named_parameters() if p.requires_grad]
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._applied = 0
        self._published = 0
        self._stream = FrameStream()
        self._queue: queue.Queue = queue.Queue()
        self._gen = torch.Generator().manual_seed(seed)
        self._seed = seed
        self._lock = threading.Lock()
        self.updates = 0
        self._adapt_threads = adapt_threads
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        torch.set_num_threads(self._adapt_threads)
        while True:
            t = self._queue.get()
            if t is None:
                return
            while not self._queue.empty():  # fall behind gracefully: adapt on the newest frame
                nxt = self._queue.get()
                if nxt is None:
                    return
                t = nxt
            with self._lock:
                crops, groups = self._stream.upto(t)
            probe = lambda: probe_pairs(crops, groups, t + 1, self.cfg.batch_size, self._seed,  # noqa: E731
                                        self.cfg.cross_video)
            if not self.adapter.signal_allows(t + 1, probe) or not (groups[:t] == groups[t]).any():
                continue
            for _ in range(self.cfg.iters):
                self.adapter.step(*draw_pairs(crops, groups, np.full(self.cfg.batch_size, t), t, self._gen,
                                              self.cfg.cross_video))
                self.updates += 1
            params = dict(self.adapter.model.named_parameters())
            self._snapshot = {n: params[n].detach().clone() for n in self.names}
            self._published += 1

    def predict(self, crop: torch.Tensor, matrix: np.ndarray, group: int = 0) -> np.ndarray:
        """Predict this frame with the newest adapted weights, then queue it for adaptation."""
        snapshot, version = self._snapshot, self._published
        if snapshot is not None and version != self._applied:
            params = dict(self.serving.named_parameters())
            with torch.no_grad():
                for n, v in snapshot.items():
                    params[n].data = v  # swap by reference: the adapter never writes a published snapshot
            self._applied = version
        pred = predict_crops(self.serving, crop[None], matrix[None])[0]
        with self._lock:
            t = self._stream.append(crop, group)
        self._queue.put(t)
        return pred

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
