"""Run a function on several local processes joined by ``torch.distributed`` (gloo on 127.0.0.1).

:func:`run_distributed` is the book's launcher for data-parallel (DDP) and sharded (FSDP2)
experiments on one CPU machine: it starts ``nprocs`` fresh processes (spawn, never fork),
joins them in a gloo process group on a free loopback port, calls the worker on each rank,
and returns the ranks' results in rank order. A whole-job time limit kills every process
that is still running; an exception on any rank is raised again in the parent with the
rank's traceback. No process is left behind in any case.

The helpers :func:`is_sharded`, :func:`is_ddp` and :func:`unwrap` let the rest of gradstab
treat a DDP-wrapped or FSDP2-sharded model like the plain model it wraps.
"""
from __future__ import annotations

import datetime
import importlib
import importlib.util
import math
import os
import pickle
import socket
import sys
import time
import traceback
from multiprocessing.connection import wait

import torch
from torch import nn

__all__ = [
    "data_parallel_group",
    "free_port",
    "full_tensor",
    "is_ddp",
    "is_sharded",
    "mean_over_ranks",
    "parallel_kind",
    "reshard",
    "run_distributed",
    "unwrap",
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _load_worker(worker):
    """The callable named by ``worker``: itself, or ``"path/to/file.py:function"`` imported by path."""
    if callable(worker):
        return worker
    path, _, name = worker.rpartition(":")
    path = os.path.abspath(path)
    module_name = "_gradstab_worker_" + str(abs(hash(path)))
    module = sys.modules.get(module_name)
    if module is None:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # so that classes defined there pickle by reference
        spec.loader.exec_module(module)
    return getattr(module, name)


def _check_worker(worker) -> None:
    if isinstance(worker, str):
        path, sep, name = worker.rpartition(":")
        if not sep or not path or not name.isidentifier():
            raise ValueError(f"worker must be a callable or 'path/to/file.py:function'; got {worker!r}")
        if not os.path.isfile(path):
            raise ValueError(f"worker names a file that does not exist: {path!r}")
        return
    if not callable(worker):
        raise ValueError(f"worker must be a callable or 'path/to/file.py:function'; got {worker!r}")
    qualname = getattr(worker, "__qualname__", repr(worker))
    try:
        pickle.dumps(worker)  # a spawned process gets it by name: a lambda or a nested function cannot travel
    except Exception:  # noqa: BLE001 - any pickling failure means the same thing here
        raise ValueError(
            f"worker must be importable by name in a fresh process (a module-level function) or a "
            f"'path/to/file.py:function' string; got {worker!r}"
        ) from None
    if getattr(worker, "__module__", None) == "__main__" and not hasattr(sys.modules.get("__main__"), "__file__"):
        raise ValueError(
            f"worker {qualname!r} is defined in an interactive session, which a spawned process cannot import; "
            "write it to a .py file and pass 'path/to/file.py:function'"
        )


def _child(rank: int, world_size: int, port: int, worker, kwargs: dict, timeout: float, conn) -> None:
    """Body of each spawned process: join the group, run the worker, send back ("ok", value) or ("error", text)."""
    from .device import configure_cpu

    configure_cpu(threads=1)  # 2 ranks on 2 cores: one thread each, whatever GRADSTAB_THREADS says
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already fixed in this process
        pass
    import torch.distributed as dist

    message = None
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=max(timeout, 1.0)),
        )
        try:
            fn = _load_worker(worker)
            message = ("ok", fn(rank, world_size, **kwargs))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - everything goes back to the parent as text
        message = ("error", f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
    try:  # plain pickle: tensors travel by value, not through shared memory that dies with this process
        payload = pickle.dumps(message)
    except Exception as exc:  # noqa: BLE001 - the result could not be pickled
        payload = pickle.dumps(("error", f"the result of rank {rank} could not be pickled: {exc!r}"))
    conn.send_bytes(payload)
    conn.close()


def _stop(processes) -> None:
    """Kill every process still alive and reap them all."""
    for p in processes:
        if p.is_alive():
            p.kill()
    for p in processes:
        p.join(timeout=10)


def run_distributed(worker, nprocs: int = 2, *, timeout: float = 120.0, **kwargs) -> list:
    """Run ``worker(rank, world_size, **kwargs)`` on ``nprocs`` processes joined by gloo; results by rank.

    - ``worker``: a module-level function (importable by name in a fresh process), or a string
      ``"path/to/file.py:function"`` whose file each process imports by path (how a notebook ships
      its per-rank code: write it to a temporary .py file).
    - Each process uses one CPU thread (:func:`~gradstab.device.configure_cpu` with ``threads=1``),
      starts by ``torch.distributed.init_process_group("gloo")`` on 127.0.0.1 and a free port, and
      always ends with ``destroy_process_group()``. ``kwargs`` and the return values must pickle;
      tensors among ``kwargs`` are moved to shared memory in place (``torch.multiprocessing``).
    - ``timeout``: seconds for the whole job. When it passes, every process is killed and a
      TimeoutError names the ranks still running. An exception on a rank kills the others and is
      raised here as RuntimeError naming the rank, with that rank's traceback in the message.

    Raises ValueError for a bad ``worker``, ``nprocs`` (an int >= 1), ``timeout`` (a number > 0) or
    ``kwargs`` that do not pickle, before any process starts.
    """
    _check_worker(worker)
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"nprocs must be an integer >= 1, got {nprocs!r}")
    try:
        limit = float(timeout)
    except (TypeError, ValueError):
        raise ValueError(f"timeout must be a number > 0 (seconds), got {timeout!r}") from None
    if isinstance(timeout, bool) or not math.isfinite(limit) or limit <= 0:
        raise ValueError(f"timeout must be a finite number > 0 (seconds), got {timeout!r}")

    try:
        pickle.dumps(kwargs)
    except Exception as error:  # noqa: BLE001 - any pickling failure means the same thing here
        raise ValueError(f"kwargs must pickle (each process receives a copy); {error}") from None

    deadline = time.monotonic() + limit
    for attempt in range(3):
        try:
            return _launch(worker, nprocs, kwargs, limit, deadline)
        except _PortTaken:  # another program took the free port between our look and rank 0's bind
            if attempt == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


class _PortTaken(RuntimeError):
    """Rank 0 could not bind the port :func:`free_port` found."""


def _launch(worker, nprocs: int, kwargs: dict, limit: float, deadline: float) -> list:
    """One attempt of :func:`run_distributed` on a fresh port."""
    context = torch.multiprocessing.get_context("spawn")
    port = free_port()
    processes, pipes = [], []
    results: dict[int, object] = {}
    try:
        for rank in range(nprocs):
            receiver, sender = context.Pipe(duplex=False)
            pipes.append(receiver)  # closed in the finally, whatever happens
            p = context.Process(
                target=_child,
                args=(rank, nprocs, port, worker, kwargs, limit, sender),
                name=f"gradstab-rank{rank}",
                daemon=True,
            )
            try:
                p.start()
            finally:
                sender.close()  # the child holds its own copy
            processes.append(p)
        pending = set(range(nprocs))
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                ranks = sorted(pending)
                raise TimeoutError(
                    f"run_distributed: timeout of {limit:g} s passed; rank(s) {ranks} still running were killed"
                )
            handles = {pipes[r]: r for r in pending}
            handles.update({processes[r].sentinel: r for r in pending})
            for handle in wait(list(handles), timeout=remaining):
                rank = handles[handle]
                if rank not in pending:
                    continue
                conn = pipes[rank]
                if conn.poll():
                    try:
                        status, value = pickle.loads(conn.recv_bytes())
                    except EOFError:
                        status, value = "died", None
                else:
                    processes[rank].join(timeout=1)
                    if conn.poll():  # the message arrived just as the process ended
                        continue
                    status, value = "died", None
                if status == "ok":
                    results[rank] = value
                    pending.discard(rank)
                elif status == "error":
                    taken = "address already in use" in value.lower() or "eaddrinuse" in value.lower()
                    error = _PortTaken if taken and "init_process_group" in value else RuntimeError
                    raise error(f"run_distributed: rank {rank} raised {value}")
                else:
                    code = processes[rank].exitcode
                    raise RuntimeError(f"run_distributed: rank {rank} ended (exit code {code}) without a result")
    finally:
        _stop(processes)
        for conn in pipes:
            conn.close()
    return [results[r] for r in range(nprocs)]


# --- helpers for models that are DDP-wrapped or FSDP2-sharded -------------------------------------------------


def _dtensor_type():
    """DTensor's class, or None while ``torch.distributed.tensor`` is not loaded: nothing can be a DTensor
    before it is, and importing it costs most of a second, which a single-process run need not pay."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (a tensor sharded or replicated over a process group)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """``t`` as one ordinary tensor: the assembled full tensor of a DTensor (a collective: all ranks call it)."""
    if is_dtensor(t):
        return t.full_tensor()
    return t


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in ``torch.nn.parallel.DistributedDataParallel``."""
    return isinstance(model, nn.parallel.DistributedDataParallel)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (e.g. the model was sharded by FSDP2 ``fully_shard``)."""
    return any(is_dtensor(p) for p in model.parameters())


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (``model.module``), else ``model`` itself."""
    while is_ddp(model):
        model = model.module
    return model


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, or ``(0, 1)`` when none is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def reshard(model: nn.Module) -> None:
    """Put every FSDP2 module of ``model`` back into its sharded state (no-op for other models).

    A forward pass that is not followed by a backward (an eval-mode check, a probe under ``no_grad``) can
    leave FSDP2's root module unsharded, its parameters then being plain tensors, not the DTensors that
    the optimizer, the clipping and the monitor must hold. Call this after such a pass.
    """
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not loaded: no module can be an FSDP2 one
    if fsdp is None:
        return
    FSDPModule = fsdp.FSDPModule  # noqa: N806
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def parallel_kind(model: nn.Module) -> str:
    """``"DDP"`` for a DistributedDataParallel wrapper, ``"FSDP2"`` for a model with DTensor parameters
    (sharded by ``fully_shard``), else ``""``."""
    if is_ddp(model):
        return "DDP"
    return "FSDP2" if is_sharded(model) else ""


def data_parallel_group(model: nn.Module):
    """The process group over which ``model``'s ranks split the data: DDP's group, the device mesh's group of
    a model with DTensor parameters, else None (a model on one process)."""
    if is_ddp(model):
        import torch.distributed as dist

        return model.process_group if model.process_group is not None else dist.group.WORLD
    for p in model.parameters():
        if is_dtensor(p):
            mesh = p.device_mesh
            if mesh.ndim != 1:
                raise ValueError(f"model is sharded over a {mesh.ndim}-D device mesh; gradstab supports FSDP2 on a "
                                 "1-D mesh (every rank a data-parallel rank), where the loss is averaged over all")
            return mesh.get_group()
    return None


def mean_over_ranks(value: torch.Tensor, group) -> torch.Tensor:
    """The average of ``value`` over the ranks of ``group`` (gloo has no AVG: a SUM divided by the size)."""
    import torch.distributed as dist

    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return total / dist.get_world_size(group)
