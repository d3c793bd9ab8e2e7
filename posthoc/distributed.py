"""Many processes, one command: ``torchrun --nproc-per-node N -m posthoc ...``.

When the environment says ``WORLD_SIZE > 1`` (torchrun sets it, with ``RANK``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``), :func:`run` starts a ``torch.distributed`` process group (gloo for
CPU tensors, NCCL for CUDA tensors when there are GPUs), runs the command on every process and ends it
on all of them together. With one process nothing here starts and every helper does what one process
would do, so single-process behaviour does not change.

- **Who does what**: :func:`rank`, :func:`world_size`, :func:`local_rank`, :func:`is_main` (rank 0 is
  the only process that prints, writes results and writes artifacts), :func:`shard` (a contiguous block
  of ``n`` work items per process).
- **Samplers**: :class:`ShardedBatches` hands each process whole batches of the single-process batching
  (every image to exactly one process, no padding duplicates, in the batch it has with one process, so
  outputs are bit-identical); :class:`SplitBatches` cuts every single-process batch into one slice per
  process (data-parallel training on the same global batches).
- **Collectives**: :func:`map_shards` (each process maps its block of a list, results gathered in
  order), :func:`all_gather`, :func:`gather_tensors`, :func:`sum_across`, :func:`barrier`,
  :func:`on_main` (rank 0 runs a step, e.g. writing the artifact, once every process got there; every
  process gets its result), :func:`data_parallel` (``DistributedDataParallel``).
- **Failures**: a :class:`~posthoc.errors.PosthocError` inside :func:`map_shards` or
  :func:`all_gather` is raised on every process. Any other failure of one process (an exception
  outside them, a process that stops) is posted to the rendezvous store; a watcher thread on every
  process sees it within :data:`POLL_SECONDS`, rank 0 prints the one line, and every process exits with
  status 2, even those blocked in a collective. Nothing is written after a failure: rank 0 writes only
  in :func:`on_main`, after every process got there.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pickle
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import PosthocError, first_line

if TYPE_CHECKING:  # torch is imported when it is needed: ``posthoc --help`` starts without it
    import torch
    from torch import nn

T = TypeVar("T")
R = TypeVar("R")

POLL_SECONDS = 0.2  # how often each process looks for another process's failure
JOIN_TIMEOUT = timedelta(minutes=5)  # for every process to reach the rendezvous
COLLECTIVE_TIMEOUT = timedelta(minutes=30)  # a collective that waits longer fails (a hung GPU, a lost node)
REPORT_SECONDS = 30.0  # how long a failing process waits for rank 0 to print its line
GRACE_SECONDS = 2.0  # how long another process's failure waits for rank 0 to post the same one first

ERROR, REPORTED, FINISHED, LEFT = "error", "reported", "finished", "left"  # keys in the rendezvous store


# ------------------------------------------------------------------------------------ who does what
@dataclass
class _Session:
    rank: int
    world: int
    local_rank: int
    store: Any  # torch.distributed.Store (prefixed): failures, barriers and rank-0 results
    report: Callable[[str], None]
    handling: threading.Lock = field(default_factory=threading.Lock)  # held by whoever handles a failure
    stop: threading.Event = field(default_factory=threading.Event)
    watcher: threading.Thread | None = None
    steps: itertools.count = field(default_factory=itertools.count)  # barriers and on_main calls, in order


_SESSION: _Session | None = None


def launched() -> bool:
    """True when the environment asks for several processes (``WORLD_SIZE > 1``, as torchrun sets it)."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """True while a multi-process command runs (:func:`run` started the process group)."""
    return _SESSION is not None


def rank() -> int:
    """This process's rank (0 with one process)."""
    return _SESSION.rank if _SESSION else 0


def world_size() -> int:
    """Number of processes (1 with one process)."""
    return _SESSION.world if _SESSION else 1


def local_rank() -> int:
    """This process's rank on its node, which picks its GPU (``LOCAL_RANK``; 0 with one process)."""
    return _SESSION.local_rank if _SESSION else 0


def is_main() -> bool:
    """True on rank 0, the process that prints, writes results and writes artifacts."""
    return rank() == 0


def shard(n: int) -> range:
    """This process's contiguous block of ``n`` work items (blocks differ in size by at most one)."""
    return _block(n, rank(), world_size())


# ------------------------------------------------------------------------------------ samplers
class ShardedBatches:
    """This process's whole batches of ``batches`` (a batch sampler that gives the same batches on every
    process): a contiguous block of them, so every image goes to exactly one process, with no padding
    duplicates, in the very batch it has with one process (model outputs are then bit-identical).
    Concatenating the processes' outputs in rank order gives the single-process order."""

    def __init__(self, batches: Iterable[list[int]]):
        self.batches = batches
        self.block = shard(len(batches))  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        return itertools.islice(iter(self.batches), self.block.start, self.block.stop)

    def __len__(self) -> int:
        return len(self.block)


class SplitBatches:
    """Every batch of ``batches`` (the same on every process: a seeded shuffle) cut into one contiguous
    slice per process, this process taking its own: data-parallel training whose global batches are the
    single-process batches."""

    def __init__(self, batches: Iterable[list[int]]):
        self.batches = batches

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            part = _block(len(batch), rank(), world_size())
            yield batch[part.start : part.stop]

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]


def _block(n: int, r: int, world: int) -> range:
    q, extra = divmod(n, world)
    start = r * q + min(r, extra)
    return range(start, start + q + (r < extra))


# ------------------------------------------------------------------------------------ collectives
def all_gather(obj: T) -> list[T]:
    """Every process's ``obj``, in rank order, on every process (``[obj]`` with one process)."""
    if _SESSION is None:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * _SESSION.world
    dist.all_gather_object(out, obj)
    return out


def raise_any(error: PosthocError | None) -> None:
    """Agree on a failure: every process passes the :class:`PosthocError` it caught (or ``None``), and the
    first failing process's error is raised on every process (with one process: ``error`` itself)."""
    if _SESSION is None:
        if error is not None:
            raise error
        return
    posted = all_gather(None if error is None else (getattr(error, "rank", rank()), str(error)))
    first = next((e for e in posted if e is not None), None)
    if first is not None:
        raise _error_from(first)


def map_shards(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    main_only: bool = False,
    loop: Callable[[Iterable[T]], Iterable[T]] = iter,
) -> list[R] | None:
    """``[fn(x) for x in items]`` with each process computing its :func:`shard` of ``items``; the results,
    in ``items``' order, on every process (with ``main_only``, on rank 0 only, ``None`` elsewhere).
    ``loop`` wraps the iteration over this process's items (a progress bar).

    ``fn(x)`` must not depend on which process computes it (seed it by ``x``): the results are then the
    same for any number of processes. A :class:`PosthocError` raised by ``fn`` on any process is raised
    on every process that receives the results, naming the process it came from.
    """
    if _SESSION is None:
        return [fn(x) for x in loop(items)]
    import torch.distributed as dist

    block = shard(len(items))
    try:
        local, error = [fn(x) for x in loop([items[i] for i in block])], None
    except PosthocError as e:
        local, error = None, (rank(), str(e))
    if main_only:
        parts: list[Any] | None = [None] * _SESSION.world if is_main() else None
        dist.gather_object((local, error), parts, dst=0)
        if parts is None:
            if error is not None:
                raise _error_from(error)
            return None
    else:
        parts = all_gather((local, error))
    failed = [e for _, e in parts if e is not None]
    if failed:
        raise _error_from(failed[0])
    return [r for part, _ in parts for r in part]


def gather_tensors(tensor: torch.Tensor | None, *, main_only: bool = False) -> torch.Tensor | None:
    """Every process's ``tensor`` concatenated along the first dimension in rank order (sizes may differ;
    ``None`` from a process that had no work), on every process, or on rank 0 only with ``main_only``
    (``None`` elsewhere). Tensors travel through gloo as tensors, not pickles."""
    if _SESSION is None:
        return tensor
    import torch
    import torch.distributed as dist

    shapes = all_gather(None if tensor is None else (tuple(tensor.shape), tensor.dtype))
    known = next((s for s in shapes if s is not None), None)
    if known is None:
        return None
    (_, *rest), dtype = known
    sizes = [0 if s is None else s[0][0] for s in shapes]
    padded = torch.zeros((max(sizes), *rest), dtype=dtype)
    if tensor is not None:
        padded[: tensor.shape[0]] = tensor.detach().cpu()
    if main_only:
        parts = [torch.empty_like(padded) for _ in sizes] if is_main() else None
        dist.gather(padded, parts, dst=0)
        if parts is None:
            return None
    else:
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)])


def sum_across(value: float) -> float:
    """The sum of ``value`` over every process (float64), on every process."""
    if _SESSION is None:
        return value
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def barrier() -> None:
    """Wait until every process got here. Through the rendezvous store, so it has no time limit (rank 0
    may work for hours while the others wait); a failure anywhere still ends every process."""
    if _SESSION is None:
        return
    key = f"barrier/{next(_SESSION.steps)}"
    _SESSION.store.add(key, 1)
    _wait_count(_SESSION.store, key, _SESSION.world)


def on_main(fn: Callable[[], R]) -> R:
    """Run ``fn`` on rank 0 once every process got here (so none of them failed before it); every process
    returns its result (pickled through the store, so keep it small). With one process: ``fn()``."""
    if _SESSION is None:
        return fn()
    barrier()
    key = f"result/{next(_SESSION.steps)}"
    if is_main():
        result = fn()
        _SESSION.store.set(key, pickle.dumps(result))
        return result
    while not _SESSION.store.check([key]):
        time.sleep(POLL_SECONDS)
    return pickle.loads(_SESSION.store.get(key))


def data_parallel(model: nn.Module, device: torch.device) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (gradients averaged over the processes after every
    backward pass, weights identical on every process), or ``model`` itself with one process."""
    if _SESSION is None:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


# ------------------------------------------------------------------------------------ running a command
def run(body: Callable[[], int], report: Callable[[str], None]) -> int:
    """Run a command ``body`` (returns an exit status) on this process, and return its exit status.

    With one process: ``body()``, a :class:`PosthocError` becoming ``report(line)`` and status 2. When
    launched with ``WORLD_SIZE > 1``: join the other processes, run ``body`` on every one, and wait until
    all have finished. A failure on any process ends every process with status 2, after rank 0 called
    ``report`` once with the first failure's line (naming its rank when it was not rank 0).
    """
    global _SESSION
    if not launched():
        try:
            return body()
        except PosthocError as e:
            report(str(e))
            return PosthocError.exit_code
    try:
        _SESSION = _start(report)
    except PosthocError as e:
        if _env_int("RANK", 0) == 0:
            report(str(e))
        return PosthocError.exit_code
    session = _SESSION
    try:
        try:
            code = body()
        except (Exception, KeyboardInterrupt) as e:  # every failure must end every process
            return _fail(session, e)
        _finish(session)
        return code
    finally:
        _SESSION = None
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _start(report: Callable[[str], None]) -> _Session:
    """Join the rendezvous named by the environment and start the process group and the failure watcher."""
    import torch
    import torch.distributed as dist

    if not dist.is_available():
        raise PosthocError(
            "WORLD_SIZE > 1 asks for several processes, but this PyTorch has no torch.distributed; run one process"
        )
    world, rank_ = _env_int("WORLD_SIZE", 1), _env_int("RANK", -1)
    host, port = os.environ.get("MASTER_ADDR"), _env_int("MASTER_PORT", 0)
    if not 0 <= rank_ < world or not host or not port:
        raise PosthocError(
            f"WORLD_SIZE={world} needs RANK (0..{world - 1}), MASTER_ADDR and MASTER_PORT in the environment; "
            "launch with torchrun --nproc-per-node N -m posthoc ..."
        )
    local = _env_int("LOCAL_RANK", rank_)
    cuda = torch.cuda.is_available()
    if cuda:
        if local >= torch.cuda.device_count():
            raise PosthocError(
                f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s); start at most that many "
                "processes per node (--nproc-per-node)"
            )
        torch.cuda.set_device(local)
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"  # torchrun's agent hosts the store
    try:
        store = dist.TCPStore(host, port, world, is_master=rank_ == 0 and not agent, timeout=JOIN_TIMEOUT, multi_tenant=True)
    except (RuntimeError, OSError) as e:  # DistStoreError / DistNetworkError are RuntimeErrors
        raise PosthocError(
            f"process {rank_} could not join the rendezvous at {host}:{port} ({first_line(e)}); start all {world} "
            "processes with the same MASTER_ADDR, MASTER_PORT and WORLD_SIZE (torchrun does)"
        ) from None
    backend = "cpu:gloo,cuda:nccl" if cuda and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, store=store, rank=rank_, world_size=world, timeout=COLLECTIVE_TIMEOUT)
    session = _Session(rank_, world, local, dist.PrefixStore("posthoc", store), report)
    session.watcher = threading.Thread(target=_watch, args=(session,), name="posthoc-failure-watcher", daemon=True)
    session.watcher.start()
    return session


def _watch(session: _Session) -> None:
    """Another process posted a failure: rank 0 reports it; every process exits (even from a collective)."""
    while not session.stop.wait(POLL_SECONDS):
        try:
            failed = session.store.check([ERROR])
        except Exception:  # the store is gone: the process hosting it (rank 0 or torchrun's agent) stopped
            if not session.stop.is_set():
                print("error: lost contact with the other processes (rank 0 stopped); see its output", file=sys.stderr)
                _exit(PosthocError.exit_code)
            return
        if not failed:
            continue
        if not session.handling.acquire(blocking=False):
            return  # this process's own failure is being handled by its main thread
        if session.rank == 0:
            _report(session, session.store.get(ERROR))
        else:
            session.store.add(LEFT, 1)
        _exit(PosthocError.exit_code)


def _fail(session: _Session, e: BaseException) -> int:
    """This process failed: post the failure (the first one posted wins), rank 0 reports it, all exit 2."""
    session.handling.acquire()  # if the watcher holds it, it ends the process
    origin = getattr(e, "rank", session.rank)
    if isinstance(e, PosthocError):
        line = str(e)
    elif isinstance(e, KeyboardInterrupt):
        line = "interrupted"
    else:
        traceback.print_exc()  # a bug: its traceback on this process's stderr, as with one process
        line = f"{type(e).__name__}: {first_line(e)}"
    try:
        if session.rank != 0:  # a failure every process meets (a wrong argument) is reported as rank 0's own
            _wait_key(session.store, ERROR, GRACE_SECONDS)
        winner = session.store.compare_set(ERROR, "", f"{origin}\n{line}")
        if session.rank == 0:
            _report(session, winner)
        else:
            _wait_key(session.store, REPORTED, REPORT_SECONDS)
            session.store.add(LEFT, 1)
    except Exception:  # the store is gone too: rank 0 stopped, and the launcher reports it
        pass
    session.stop.set()
    return PosthocError.exit_code


def _report(session: _Session, posted: bytes) -> None:
    """Rank 0: print the posted failure once, then wait (briefly) until every other process has seen it."""
    origin, _, line = posted.decode().partition("\n")
    session.report(line if origin == "0" else f"{line} (rank {origin})")
    _flush()
    session.store.set(REPORTED, "1")
    deadline = time.monotonic() + REPORT_SECONDS
    while int(session.store.add(LEFT, 0)) < session.world - 1 and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS / 4)


def _finish(session: _Session) -> None:
    """Wait until every process has finished (the watcher still ends this one if another fails), then leave
    together: rank 0 keeps the store up until every process is done with it."""
    session.store.add(FINISHED, 1)
    _wait_count(session.store, FINISHED, session.world)
    session.stop.set()
    if session.watcher is not None:
        session.watcher.join()
    session.store.add(LEFT, 1)
    if session.rank == 0:
        deadline = time.monotonic() + REPORT_SECONDS
        while int(session.store.add(LEFT, 0)) < session.world and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS / 4)


def _error_from(error: tuple[int, str]) -> PosthocError:
    origin, line = error
    e = PosthocError(line)
    e.rank = origin  # type: ignore[attr-defined]
    return e


def _wait_count(store: Any, key: str, target: int) -> None:
    while int(store.add(key, 0)) < target:
        time.sleep(POLL_SECONDS / 4)


def _wait_key(store: Any, key: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not store.check([key]) and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS / 4)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed or broken stream: nothing more to say
            stream.flush()


def _exit(code: int) -> None:
    _flush()
    os._exit(code)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        raise PosthocError(f"{name}={os.environ[name]!r} in the environment is not a whole number; unset it or fix it") from None
