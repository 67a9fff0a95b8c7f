"""One decision for all the processes of a distributed run (``accelerate launch``,
torchrun): the main process makes it, every process learns it."""
from __future__ import annotations

from typing import Any, Callable


def on_main(fn: Callable[[], Any], rank: int) -> Any:
    """Run ``fn`` in the main process (``rank`` 0) only and give every process its result
    (it must pickle); an exception it raises is raised in every process, so no process
    waits at a barrier for one that has already stopped. Without an initialised process
    group (one process) it is just ``fn()`` on rank 0."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:
            error = exc
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [result, error]
        dist.broadcast_object_list(box, src=0)
        result, error = box
    if error is not None:
        raise error
    return result
