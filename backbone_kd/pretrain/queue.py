"""The global queue loss: student and teacher image embeddings scored against a queue of recent teacher embeddings.

lightly-train's distillation v3 global term, written from its description: the teacher's CLS embeddings of recent
images form pseudo-class weights; each image's softmax over its similarities to them (temperature ``T``) is a soft
"which past images does this one resemble" label, and the student's pooled embedding must give the same
distribution (KL). Unlike ``1 - cos(student, CLS)`` it transfers relations between images, not absolute directions.

The queue lives in each process (as in lightly-train; no cross-process gather, so no extra sync) and is saved in
every checkpoint, so resume is exact.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def auto_queue_size(n_images: int) -> int:
    """Queue length for ``global_queue_size=auto``: the largest power of two <= half the data set, in [16, 8192].

    Roughly lightly-train's buckets (a queue of 25-50 % of the data set): a queue longer than the data set would
    hold the same image twice and make its own past embedding an easy match.
    """
    half = max(16, n_images // 2)
    return int(min(8192, 2 ** math.floor(math.log2(half))))


def queue_kl(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    temperature: float,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of the softmax similarities to the queue, averaged over the batch.

    Args:
        student: (B, D) student image embeddings (any scale; normalised here).
        teacher: (B, D) teacher image embeddings (any scale; normalised here).
        queue: (Q, D) L2-normalised teacher embeddings.
        temperature: Softmax temperature (lightly-train: 0.07).
        valid: (Q,) bool, the filled slots (None: all). Empty slots get a large negative similarity rather than
            -inf, so both distributions put exactly zero mass there without 0 * inf = nan in the KL.

    Returns:
        Scalar >= 0.
    """
    s = F.normalize(student.float(), dim=-1) @ queue.T  # (B, Q)
    t = F.normalize(teacher.float(), dim=-1) @ queue.T
    if valid is not None:
        s, t = s.masked_fill(~valid, _EMPTY), t.masked_fill(~valid, _EMPTY)
    return F.kl_div(F.log_softmax(s / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")


_EMPTY = -1e4  # similarity of an empty queue slot (cosines are in [-1, 1])


class TeacherQueue(nn.Module):
    """FIFO of L2-normalised teacher embeddings, (size, D); ``state_dict`` holds it for exact resume.

    Args:
        size: Queue length Q.
        dim: Embedding width D.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        if size < 1:
            raise ValueError(f"global_queue_size={size} must be >= 1")
        self.register_buffer("queue", torch.zeros(size, dim))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Insert a batch (newest first); return the queue (Q, D) and its filled-slot mask (Q,) bool.

        The batch goes in before it is scored (as lightly-train does), so each image's own embedding is among the
        targets: the teacher distribution is never built from an empty queue at step 0. The mask is computed on the
        device (no host sync per step).

        Args:
            teacher: (B, D) teacher embeddings of the current batch.
        """
        size = self.queue.shape[0]
        new = F.normalize(teacher.detach().float(), dim=-1)[:size].to(self.queue.device)
        b = new.shape[0]
        self.queue.copy_(torch.cat([new, self.queue[: size - b]]))
        self.filled.add_(b).clamp_(max=size)
        return self.queue, torch.arange(size, device=self.queue.device) < self.filled


def global_queue(loss: str, size: int | str, n_images: int, dim: int | None) -> TeacherQueue | None:
    """The queue for ``global_loss=queue`` (None for ``cosine``), sized by ``global_queue_size`` (``auto``: see
    :func:`auto_queue_size`; capped at the data-set size, where a longer queue holds repeats).

    Args:
        loss: ``global_loss``. size: ``global_queue_size``. n_images: training images. dim: teacher CLS width.
    """
    if loss != "queue":
        return None
    if dim is None:
        raise ValueError("global_loss=queue needs a teacher with a CLS embedding (a ViT); use global_loss=cosine")
    q = auto_queue_size(n_images) if size == "auto" else int(size)
    return TeacherQueue(max(1, min(q, n_images)), dim)
