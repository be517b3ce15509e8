"""Data-parallel helpers: every rank must keep the same units. They do nothing in a single process.

The process group is the launcher's (torchrun, accelerate launch; the transformers Trainer initializes it
when its TrainingArguments are built): satlm never creates one. Before that, and in a single process,
every helper here acts as if this process were the only one.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, TypeVar

import torch

T = TypeVar("T")


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    dist = _dist()
    return dist.get_world_size() if dist is not None else 1


def rank() -> int:
    """This process's global rank (0 in a single process)."""
    dist = _dist()
    return dist.get_rank() if dist is not None else 0


def is_main_process() -> bool:
    """True on global rank 0 and in a single process: the process that writes run files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    dist = _dist()
    if dist is not None:
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """`obj` as rank `src` holds it, on every rank (any picklable object; returned as is in one process)."""
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main_process(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run `fn` on rank 0 only (file-system work: plan, clean and create the run directory) and return its
    result on every rank; if it raises, every rank raises the same exception, so no rank is left waiting
    at the next collective. The other ranks wait until rank 0 is done."""
    if _dist() is None:
        return fn(*args, **kwargs)
    outcome: tuple[bool, Any] = (True, None)
    if is_main_process():
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to every rank, re-raised below
            outcome = (False, e)
    ok, value = broadcast_object(outcome)
    if not ok:
        with contextlib.suppress(AttributeError):  # every rank raises it here: `wait_for_every_rank` waits
            value.satlm_on_every_rank = True
        raise value
    return value


def wait_for_every_rank(error: BaseException) -> None:
    """Before a rank exits on `error`: if every rank raised it together (`on_main_process`), wait until all
    have reached this point (each has printed its message), so that the launcher, which stops the other
    workers once the first one exits, cuts no rank's message off. Any other error returns at once: the
    other ranks may not be failing, and a barrier would hang."""
    if _dist() is None or not getattr(error, "satlm_on_every_rank", False):
        return
    try:
        barrier()
    except Exception:  # noqa: BLE001 - a broken group: exit anyway
        pass


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to fill a cache), then the other ranks run it."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def reduce_scores(scores: torch.Tensor, metric: str = "l2") -> torch.Tensor:
    """Combine a (small) score vector over data-parallel ranks so that all ranks rank units alike.

    Norm-based scores (l2, output) combine as the norm over the union of the ranks' tokens:
    sqrt(sum of squares), so that N ranks with batch b score exactly as one rank with batch N*b.
    Means (l1) and uniform scores are averaged (for l1 that is the mean over the union only when the
    ranks hold equally many tokens).
    """
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return scores
    if metric in ("l2", "output"):
        total = scores.float().square().contiguous()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total.sqrt()
    total = scores.float().contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total / dist.get_world_size()


def all_mean(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of a small tensor over ranks (as is in one process)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return values
    device = torch.device("cuda", torch.cuda.current_device()) if "nccl" in str(dist.get_backend()) else "cpu"
    total = values.to(device).contiguous()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return (total / dist.get_world_size()).to(values.device)


__all__ = ["all_mean", "barrier", "broadcast_object", "is_main_process", "main_process_first", "on_main_process", "rank",
           "reduce_scores", "wait_for_every_rank", "world_size"]
