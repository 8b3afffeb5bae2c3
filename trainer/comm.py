"""The collectives of model-parallel embeddings: id exchange and the pooled all-to-all.

Every function here is a collective over ``group``: every rank of the group calls it in the
same order with matching split sizes, or the job hangs (that is torch.distributed's
contract, not ours). All tensors stay on the caller's device; gloo runs them on CPU tensors,
NCCL on CUDA tensors, with the same code.

- ``PooledAllToAll`` moves pooled embeddings to the ranks that own the samples and, in
  backward, moves their gradients back the reverse way. The wire type may be bf16/fp16
  (``CommPrecision``) in both directions; values are cast back to the input dtype on arrival.
- ``IdExchange`` ships each destination's packed int64 ids (and optional float weights).
  ``start`` blocks only for the tiny count exchange; the payload is asynchronous, so the
  next batch's ids travel while the current step computes (``wait`` collects them).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from trainer.config import CommPrecision

__all__ = ["wire_dtype", "PooledAllToAll", "pooled_all_to_all", "IdExchange"]


def wire_dtype(precision: CommPrecision, dtype: torch.dtype) -> torch.dtype:
    return {CommPrecision.FP32: dtype, CommPrecision.BF16: torch.bfloat16,
            CommPrecision.FP16: torch.float16}[precision]


def _a2a(flat: torch.Tensor, send_splits: list[int], recv_splits: list[int], group) -> torch.Tensor:
    out = flat.new_empty(sum(recv_splits))
    dist.all_to_all_single(out, flat.contiguous(), recv_splits, send_splits, group=group)
    return out


class PooledAllToAll(torch.autograd.Function):
    """Forward: 1-D ``send`` split by ``send_splits`` goes to ranks 0..W-1; returns what
    arrives, split by ``recv_splits``. Backward: the reverse exchange of the gradient,
    multiplied by ``grad_scale`` (1/W turns the sum of the ranks' local-mean losses into the
    global-batch mean, matching data-parallel gradient averaging)."""

    @staticmethod
    def forward(ctx, send, send_splits, recv_splits, group, precision, grad_scale):
        ctx.send_splits, ctx.recv_splits = send_splits, recv_splits
        ctx.group, ctx.precision, ctx.grad_scale = group, precision, grad_scale
        ctx.dtype = send.dtype
        wire = wire_dtype(precision, send.dtype)
        return _a2a(send.to(wire), send_splits, recv_splits, group).to(send.dtype)

    @staticmethod
    def backward(ctx, grad):
        wire = wire_dtype(ctx.precision, ctx.dtype)
        back = _a2a(grad.to(wire), ctx.recv_splits, ctx.send_splits, ctx.group).to(ctx.dtype)
        if ctx.grad_scale != 1.0:
            back = back * ctx.grad_scale
        return back, None, None, None, None, None


def pooled_all_to_all(send: torch.Tensor, send_splits: list[int], recv_splits: list[int], group,
                      precision: CommPrecision = CommPrecision.FP32, grad_scale: float = 1.0) -> torch.Tensor:
    """Differentiable all-to-all of a 1-D float tensor (see ``PooledAllToAll``)."""
    return PooledAllToAll.apply(send, list(send_splits), list(recv_splits), group, precision, grad_scale)


class IdExchange:
    """One all-to-all of packed ids (int64) and optional weights (float32) per destination.

    ``start(ids_per_dest, weights_per_dest)`` exchanges the counts (blocking, W integers),
    then posts the payload asynchronously; ``wait()`` returns ``(ids_per_source,
    weights_per_source)``, lists in source-rank order (weights None when not sent). Whether
    weights are sent must agree across ranks. Not reusable: one object per batch.
    """

    def __init__(self, group, world_size: int, device: torch.device):
        self.group = group
        self.world_size = world_size
        self.device = device
        self._work: list = []
        self._ids: torch.Tensor | None = None
        self._weights: torch.Tensor | None = None
        self._recv_counts: list[int] = []

    def start(self, ids: list[torch.Tensor], weights: list[torch.Tensor] | None = None) -> "IdExchange":
        if len(ids) != self.world_size:
            raise ValueError(f"need one id tensor per rank ({self.world_size}), got {len(ids)}")
        send_counts = [int(t.numel()) for t in ids]
        counts = torch.tensor(send_counts, dtype=torch.int64, device=self.device)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts, group=self.group)
        self._recv_counts = [int(x) for x in recv.tolist()]
        flat = torch.cat(ids) if ids else torch.empty(0, dtype=torch.int64, device=self.device)
        self._ids = flat.new_empty(sum(self._recv_counts))
        self._work.append(dist.all_to_all_single(self._ids, flat, self._recv_counts, send_counts,
                                                 group=self.group, async_op=True))
        if weights is not None:
            wflat = torch.cat(weights)
            self._weights = wflat.new_empty(sum(self._recv_counts))
            self._work.append(dist.all_to_all_single(self._weights, wflat, self._recv_counts, send_counts,
                                                     group=self.group, async_op=True))
        return self

    def wait(self) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        for w in self._work:
            w.wait()
        self._work = []
        ids = list(torch.split(self._ids, self._recv_counts))
        weights = None if self._weights is None else list(torch.split(self._weights, self._recv_counts))
        return ids, weights
