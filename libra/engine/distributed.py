"""Process-group helpers: one process per device, started by torchrun or by ``--gpus N``.

Two ways to run N processes:
- ``torchrun --nnodes M --nproc-per-node N train.py ...``: torchrun sets RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``launch`` reads them and calls the worker once.
- ``train.py --gpus N``: ``launch`` spawns N local processes with ``torch.multiprocessing``
  and a free local port.
The backend is NCCL for CUDA devices and gloo for CPU (``--device cpu``).
All helpers degrade to no-ops when no process group is initialised (single process).
"""
from __future__ import annotations

import datetime
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class DistributedContext:
    """Where this process runs: global rank, world size, rank within the machine, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def synchronize() -> None:
    """Barrier across all processes (no-op when single-process)."""
    if is_dist() and get_world_size() > 1:
        dist.barrier()


def torchrun_environment() -> bool:
    """True when launched by torchrun (or any launcher setting RANK/WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def find_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _device_for(device_type: str, local_rank: int) -> torch.device:
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda was requested but no CUDA GPU is visible: pass --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise ValueError(
                f"local rank {local_rank} needs GPU {local_rank} but only {torch.cuda.device_count()} are visible"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(
    rank: int, world_size: int, local_rank: int, device_type: str, init_method: str | None = None
) -> DistributedContext:
    """Initialise the default process group (NCCL on CUDA, gloo on CPU) and return this process's context."""
    device = _device_for(device_type, local_rank)
    if world_size > 1:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend=backend,
            init_method=init_method or "env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=30),
            **kwargs,
        )
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def destroy_process_group() -> None:
    if is_dist():
        dist.destroy_process_group()


def _spawned_worker(local_rank: int, worker: Callable, num_processes: int, device_type: str, port: int, args: Any) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    ctx = init_process_group(local_rank, num_processes, local_rank, device_type)
    try:
        code = worker(ctx, args)
    finally:
        destroy_process_group()
    if code:
        sys.exit(int(code))


def launch(worker: Callable[[DistributedContext, Any], int | None], num_processes: int, device_type: str, args: Any) -> int:
    """Run ``worker(ctx, args)`` in every process and return the exit code for the launcher.

    - torchrun environment present: this process is one rank; call the worker directly.
    - ``num_processes > 1``: spawn that many local processes (rank = local rank).
    - otherwise: call the worker in this process with world size 1.
    A worker signals an expected failure by returning a non-zero code (after printing a message).
    """
    if torchrun_environment():
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        ctx = init_process_group(rank, world_size, local_rank, device_type)
        try:
            return int(worker(ctx, args) or 0)
        finally:
            destroy_process_group()
    if num_processes <= 1:
        ctx = init_process_group(0, 1, 0, device_type)
        return int(worker(ctx, args) or 0)
    if device_type == "cuda" and torch.cuda.device_count() < num_processes:
        raise ValueError(
            f"--gpus {num_processes} needs {num_processes} GPUs but {torch.cuda.device_count()} are visible "
            "(use --device cpu for CPU processes)"
        )
    port = find_free_port()
    try:
        mp.spawn(_spawned_worker, args=(worker, num_processes, device_type, port, args), nprocs=num_processes, join=True)
    except mp.ProcessExitedException as error:
        # A worker exited with a non-zero code after printing its own message: pass the code on.
        return int(error.exit_code or 1)
    return 0


def all_reduce_dict(values: dict[str, torch.Tensor], average: bool = True) -> dict[str, torch.Tensor]:
    """Sum (or average) a dict of scalar tensors over all processes, in one collective.

    Keys are sorted so every rank packs the same order. Returns detached tensors.
    """
    world_size = get_world_size()
    if world_size < 2:
        return {k: v.detach() for k, v in values.items()}
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float().reshape(()) for k in names])
    dist.all_reduce(stacked)
    if average:
        stacked /= world_size
    return dict(zip(names, stacked))


def all_gather_object(obj: Any) -> list[Any]:
    """Gather a picklable object from every process; each process receives the full list (rank order)."""
    world_size = get_world_size()
    if world_size < 2:
        return [obj]
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send ``obj`` from rank ``src`` to every process and return it."""
    if get_world_size() < 2:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def all_ok(ok: bool) -> bool:
    """True on every rank when ``ok`` is true on every rank (to stop all ranks together)."""
    if get_world_size() < 2:
        return ok
    flags = all_gather_object(bool(ok))
    return all(flags)


__all__ = [
    "DistributedContext",
    "all_gather_object",
    "all_ok",
    "all_reduce_dict",
    "broadcast_object",
    "destroy_process_group",
    "find_free_port",
    "get_rank",
    "get_world_size",
    "init_process_group",
    "is_main_process",
    "launch",
    "synchronize",
    "torchrun_environment",
]
