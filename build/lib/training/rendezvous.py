"""Process-group rendezvous through a file when every Train worker runs on this machine.

Ray Train's TorchConfig meets through torch's TCPStore, whose server listens on every interface and takes no
bind address. A private local Ray must expose nothing to the network, and on one machine a FileStore does the
same job; a cluster the user names keeps Ray Train's own rendezvous.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

import ray
from ray.train.torch import TorchConfig
from ray.train.torch.config import _setup_torch_process_group, _TorchBackend


@dataclass
class FileRendezvousTorchConfig(TorchConfig):
    """TorchConfig whose workers meet through a file under `directory` (one machine only)."""

    directory: str = ""

    @property
    def backend_cls(self):
        return _FileRendezvousBackend


class _FileRendezvousBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: FileRendezvousTorchConfig) -> None:
        # a fresh file for every start: a restarted worker group must not meet the previous group's store
        url = f"file://{os.path.join(backend_config.directory, f'pg-{uuid.uuid4().hex}')}"
        ray.get([worker_group.execute_single_async(i, _setup_torch_process_group, backend=backend_config.backend,
                                                   world_rank=i, world_size=len(worker_group), init_method=url,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])
