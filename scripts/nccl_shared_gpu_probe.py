"""Two processes forming an NCCL group on one GPU: NCCL refuses it ("Duplicate GPU detected"), which is why
training/joint.py lets Ray Train workers that share a GPU talk over gloo. Run on a CUDA machine."""
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def rank(r: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533")
    dist.init_process_group("nccl", rank=r, world_size=2, device_id=torch.device("cuda:0"))
    x = torch.ones(4, device="cuda:0")
    dist.all_reduce(x)
    torch.cuda.synchronize()
    print(f"rank {r}: all_reduce over NCCL on a shared device gave {x.tolist()}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    print(torch.__version__, torch.cuda.nccl.version(), flush=True)
    mp.spawn(rank, nprocs=2)
