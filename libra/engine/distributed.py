"""Process-group helpers: one process per device, started by torchrun or by ``--gpus N``.

Two ways to run N processes:
- ``torchrun --nnodes M --nproc-per-node N train.py ...``: torchrun sets RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR and MASTER_PORT; ``launch`` reads them and calls the worker once.
- ``srun ... python train.py ...`` (SLURM, one task per GPU): :func:`apply_slurm_environment`
  turns SLURM's SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID / node list into the torchrun
  variables (master: the first node of the step, port MASTER_PORT or one derived from the job id),
  after which it is the torchrun case.
- ``train.py --gpus N``: ``launch`` spawns N local processes with ``torch.multiprocessing``
  and a free local port.
The backend is NCCL for CUDA devices and gloo for CPU (``--device cpu``).
All helpers degrade to no-ops when no process group is initialised (single process).

Interrupts (``launch(..., interrupts=True)``, as train.py does): while a worker runs, SIGINT
(Ctrl-C) and SIGTERM raise :class:`Interrupted` (a ``KeyboardInterrupt``) in its main thread, so
both take the same clean path (the worker reports and returns 130). With ``--gpus N`` the
launcher process waits for its workers: Ctrl-C at a
terminal reaches every process of the group; a SIGTERM (or a SIGINT sent to the launcher alone)
is passed on to the workers as SIGTERM. When one worker fails, the launcher stops the others
(they exit quietly: their peers' failure is not theirs to report) and returns the first failing
worker's exit code.
"""
from __future__ import annotations

import datetime
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

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


def slurm_step_environment(env: dict | None = None) -> bool:
    """True for a process that ``srun`` started as one task of a multi-task job step (SLURM sets
    SLURM_PROCID and SLURM_STEP_NUM_TASKS for each task; the batch script itself is not a task of a
    step and runs single-process, as does a one-task step)."""
    env = os.environ if env is None else env
    return "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``"gpu[07-09,12],cpu1"`` -> ``"gpu07"`` (the range's
    first number keeps its zero padding), ``"node3,node4"`` -> ``"node3"``, ``"x[1-2]-ib"`` -> ``"x1-ib"``."""
    nodelist = nodelist.strip()
    if not nodelist:
        raise ValueError("the SLURM node list is empty")
    bracket, comma = nodelist.find("["), nodelist.find(",")
    if bracket == -1 or (comma != -1 and comma < bracket):
        return nodelist.split(",")[0]
    prefix = nodelist[:bracket]
    inside, _, rest = nodelist[bracket + 1 :].partition("]")
    first = inside.split(",")[0].split("-")[0]
    suffix = rest.split(",")[0].split("[")[0]  # e.g. "-ib" of "x[1-2]-ib"
    return prefix + first + suffix


def apply_slurm_environment(env: dict | None = None) -> bool:
    """Under ``srun`` (:func:`slurm_step_environment`) set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR
    and MASTER_PORT from SLURM's variables (those already set win), so that :func:`launch` takes the
    torchrun path. Returns True when it did. MASTER_ADDR is the first node of the step
    (SLURM_STEP_NODELIST, else SLURM_JOB_NODELIST); MASTER_PORT, unless set, is derived from the job
    id (20000 + id mod 20000), the same on every node of the job."""
    env = os.environ if env is None else env
    if not slurm_step_environment(env) or ("RANK" in env and "WORLD_SIZE" in env):
        return False
    env["RANK"] = env["SLURM_PROCID"]
    env["WORLD_SIZE"] = env["SLURM_STEP_NUM_TASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise ValueError("srun started this task without a node list (SLURM_STEP_NODELIST): set MASTER_ADDR")
        env["MASTER_ADDR"] = first_slurm_host(nodelist)
    if "MASTER_PORT" not in env:
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000)
    return True


def node_rank() -> int:
    """The node (machine) index of this process under torchrun (``GROUP_RANK``); 0 elsewhere."""
    try:
        return int(os.environ.get("GROUP_RANK", "0"))
    except ValueError:
        return 0


def reports_for_node(ctx: DistributedContext) -> bool:
    """True in the process that reports for its node when something stops the run: global rank 0,
    and under torchrun the first process (``LOCAL_RANK`` 0) of every other node, whose output the
    user sees in that node's log (rank 0's line is on another machine)."""
    if ctx.is_main:
        return True
    return torchrun_environment() and node_rank() != 0 and int(os.environ.get("LOCAL_RANK", "1")) == 0


def process_label(ctx: DistributedContext) -> str:
    """``"(process 3) "`` / ``"(process 8, node 1) "`` for a line printed by another process than
    rank 0 (empty for rank 0)."""
    if ctx.is_main:
        return ""
    node = f", node {node_rank()}" if torchrun_environment() and node_rank() != 0 else ""
    return f"(process {ctx.rank}{node}) "


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


# ---------------------------------------------------------------- interrupts
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's code for a Ctrl-C'd command


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM reached this process (raised by :func:`interrupt_handlers`)."""

    def __init__(self, signum: int) -> None:
        self.signum = int(signum)
        super().__init__(signal.Signals(self.signum).name)


class StoppedByLauncher(BaseException):
    """The launcher stops this worker because another worker of the run failed (reported there)."""


_interrupts: dict[str, Any] = {"signal": None, "stop_event": None}


def interrupt_signal() -> int | None:
    """The signal number of the interrupt this process received (None if none)."""
    return _interrupts["signal"]


def stopped_by_launcher() -> bool:
    """True in a ``--gpus N`` worker that the launcher is stopping because another worker failed."""
    event = _interrupts["stop_event"]
    return event is not None and event.is_set()


def wait_for_launcher_stop(timeout: float) -> bool:
    """In a ``--gpus N`` worker: wait up to ``timeout`` seconds for the launcher to stop this worker
    (it does so when another worker failed); False at once outside such workers."""
    event = _interrupts["stop_event"]
    return bool(event is not None and event.wait(timeout))


_PEER_FAILURE_TEXT = ("connection closed by peer", "connection reset by peer", "remote worker crash", "broken pipe")


def is_peer_failure(error: BaseException) -> bool:
    """True for the error a collective raises when another process of the group has gone away."""
    dist_error = getattr(dist, "DistError", None)
    text = str(error).lower()
    return (dist_error is not None and isinstance(error, dist_error)) or any(t in text for t in _PEER_FAILURE_TEXT)


def _raise_interrupt(signum, frame) -> None:  # noqa: ARG001
    if stopped_by_launcher():
        raise StoppedByLauncher()
    _interrupts["signal"] = signum
    raise Interrupted(signum)


_HANDLED_SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None)


@contextmanager
def interrupt_handlers() -> Iterator[None]:
    """For the duration of the block SIGINT and SIGTERM raise :class:`Interrupted` in the main thread
    (a signal this process ignores, e.g. SIGINT of a background job, stays ignored); the previous
    handlers are restored afterwards. Outside the main thread it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    for signum in _HANDLED_SIGNALS:
        handler = signal.getsignal(signum)
        if handler is signal.SIG_IGN:
            continue
        previous[signum] = handler
        signal.signal(signum, _raise_interrupt)
    _interrupts["signal"] = None
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


def _spawned_worker(
    local_rank: int,
    worker: Callable,
    num_processes: int,
    device_type: str,
    port: int,
    args: Any,
    stop_event: Any = None,
    interrupts: bool = False,
) -> None:
    _interrupts["stop_event"] = stop_event
    code = 0
    with interrupt_handlers() if interrupts else nullcontext():
        try:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(port)
            ctx = init_process_group(local_rank, num_processes, local_rank, device_type)
            try:
                code = worker(ctx, args)
            finally:
                destroy_process_group()
        except StoppedByLauncher:
            code = 1
        except KeyboardInterrupt:  # the worker reports its own interrupts; this is one outside it
            code = EXIT_INTERRUPTED
        except Exception:
            if stopped_by_launcher():  # e.g. a collective that failed because a peer is gone
                code = 1
            else:
                raise
    if code:
        sys.exit(int(code))


EXIT_PEER_LOST = 5  # a process of a multi-process run is gone (killed, or its node lost)


def _join_workers(
    context: Any, stop_event: Any, grace_s: float = 30.0, on_killed: Callable[[int, str], None] | None = None
) -> int:
    """Wait for the spawned workers; returns the exit code for the launcher (see the module doc).

    ``on_killed(index, signal name)``: called when a worker was killed by a signal (``kill -9``, the
    out-of-memory killer: it could print nothing itself) and not because of an interrupt; the
    launcher then returns ``EXIT_PEER_LOST``."""
    processes = list(context.processes)
    received: list[int] = []
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in _HANDLED_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is signal.SIG_IGN:
                continue
            previous[signum] = handler
            signal.signal(signum, lambda signum, frame: received.append(signum))
    first_failure: int | None = None
    failed_index: int | None = None
    forwarded = 0  # signals passed on to the workers
    signal_time: float | None = None
    kill_time: float | None = None
    try:
        while any(p.is_alive() for p in processes):
            multiprocessing.connection.wait([p.sentinel for p in processes if p.is_alive()], timeout=0.2)
            now = time.monotonic()
            if first_failure is None:
                failed = [i for i, p in enumerate(processes) if not p.is_alive() and p.exitcode not in (0, None)]
                if failed:
                    # Several at once: prefer a worker that reported its own error (exit code, no
                    # traceback file) over one that crashed, likely because its peer had gone.
                    failed.sort(key=lambda i: _has_error_file(context, i))
                    failed_index = failed[0]
                    first_failure = processes[failed_index].exitcode
                    if first_failure != EXIT_INTERRUPTED and not received:
                        # A worker failed on its own: the others are stuck waiting for it. Stop them quietly.
                        stop_event.set()
                        for process in processes:
                            if process.is_alive():
                                process.terminate()
                    kill_time = now + grace_s
            if received and signal_time is None:
                signal_time = now
            if received and forwarded < len(received):
                # SIGTERM at once; a SIGINT probably reached the workers too (Ctrl-C at a terminal):
                # pass it on only if they are still running a while later.
                if received[forwarded] != signal.SIGINT or now - signal_time > 10.0:
                    for process in processes:
                        if process.is_alive() and process.pid is not None:
                            try:
                                os.kill(process.pid, signal.SIGTERM)
                            except ProcessLookupError:
                                pass
                    forwarded += 1
                    kill_time = kill_time or now + grace_s
            if kill_time is not None and now > kill_time:
                for process in processes:
                    if process.is_alive():
                        process.kill()
                kill_time = None
        for process in processes:
            process.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    if first_failure is None:
        for index, process in enumerate(processes):
            if process.exitcode:
                first_failure, failed_index = process.exitcode, index
                break
    if first_failure is None:
        return EXIT_INTERRUPTED if received else 0
    if _has_error_file(context, failed_index):
        error_file = context.error_files[failed_index]
        # An unexpected exception (not one of libra's reported errors): show its traceback.
        import pickle

        with open(error_file, "rb") as handle:
            print(f"-- process {failed_index} terminated with the following error:\n{pickle.load(handle)}",
                  file=sys.stderr, flush=True)
    if first_failure < 0:  # killed by a signal
        if on_killed is not None and not received:
            try:
                name = signal.Signals(-first_failure).name
            except ValueError:
                name = f"signal {-first_failure}"
            on_killed(int(failed_index), name)
            return EXIT_PEER_LOST
        return 128 + (-first_failure)
    return int(first_failure)


def _has_error_file(context: Any, index: int) -> bool:
    """torch's spawn wrapper writes the traceback of an uncaught exception into this file."""
    error_file = context.error_files[index]
    return bool(error_file) and os.access(error_file, os.R_OK) and os.path.getsize(error_file) > 0


def launch(
    worker: Callable[[DistributedContext, Any], int | None],
    num_processes: int,
    device_type: str,
    args: Any,
    interrupts: bool = False,
    on_killed: Callable[[int, str], None] | None = None,
) -> int:
    """Run ``worker(ctx, args)`` in every process and return the exit code for the launcher.

    - torchrun environment present: this process is one rank; call the worker directly.
    - ``num_processes > 1``: spawn that many local processes (rank = local rank).
    - otherwise: call the worker in this process with world size 1.
    A worker signals an expected failure by returning a non-zero code (after printing a message).
    With ``interrupts``, SIGINT / SIGTERM raise :class:`Interrupted` in a running worker (see the
    module doc); the worker is expected to report it and return 130 (``EXIT_INTERRUPTED``).
    ``on_killed(index, signal name)``: with ``--gpus N``, report a worker killed by a signal (it could
    not report itself); the launcher then returns ``EXIT_PEER_LOST``.
    """
    handlers = interrupt_handlers if interrupts else nullcontext
    if torchrun_environment():
        rank = int(os.environ["RANK"])
        world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        with handlers():
            ctx = init_process_group(rank, world_size, local_rank, device_type)
            code = 1
            try:
                code = int(worker(ctx, args) or 0)
                return code
            finally:
                try:
                    destroy_process_group()
                except Exception:  # the store's node is gone (the worker reported that already)
                    if code == 0:
                        raise
    if num_processes <= 1:
        with handlers():
            ctx = init_process_group(0, 1, 0, device_type)
            return int(worker(ctx, args) or 0)
    if device_type == "cuda" and torch.cuda.device_count() < num_processes:
        raise ValueError(
            f"--gpus {num_processes} needs {num_processes} GPUs but {torch.cuda.device_count()} are visible "
            "(use --device cpu for CPU processes)"
        )
    port = find_free_port()
    stop_event = mp.get_context("spawn").Event()
    context = mp.start_processes(
        _spawned_worker,
        args=(worker, num_processes, device_type, port, args, stop_event, interrupts),
        nprocs=num_processes,
        join=False,
        start_method="spawn",
    )
    return _join_workers(context, stop_event, on_killed=on_killed)


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
    "EXIT_INTERRUPTED",
    "EXIT_PEER_LOST",
    "DistributedContext",
    "Interrupted",
    "StoppedByLauncher",
    "all_gather_object",
    "all_ok",
    "all_reduce_dict",
    "apply_slurm_environment",
    "first_slurm_host",
    "broadcast_object",
    "destroy_process_group",
    "find_free_port",
    "get_rank",
    "get_world_size",
    "init_process_group",
    "interrupt_handlers",
    "interrupt_signal",
    "is_main_process",
    "is_peer_failure",
    "launch",
    "node_rank",
    "process_label",
    "reports_for_node",
    "stopped_by_launcher",
    "slurm_step_environment",
    "synchronize",
    "torchrun_environment",
    "wait_for_launcher_stop",
]
