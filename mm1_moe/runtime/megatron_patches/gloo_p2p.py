"""Ordered, unbatched pipeline p2p on gloo (``when: cpu``, a setting).

gloo matches point-to-point messages by peer and order only. At PP=2 the previous and next
stage are the same rank, and the interleaved schedule's batched isend/irecv then pairs
recv_prev with send_next: micro-batches 3+ got swapped activations (loss off by 1e-3 vs PP=1).
Unbatched, ordered p2p (``overlap_p2p_comm``) is exact; NCCL keeps the batched path. This is a
value our ``decoder_transformer_config`` passes to Megatron, not a rebinding."""

from __future__ import annotations

from typing import Dict, List, Optional

from .record import Patch, missing_text


def p2p_settings(on_cpu: bool, virtual_pipeline: Optional[int]) -> Dict[str, bool]:
    """The ``TransformerConfig`` p2p fields for this runtime."""
    return dict(batch_p2p_comm=not on_cpu,
                overlap_p2p_comm=on_cpu and virtual_pipeline is not None)


def check() -> List[str]:
    return missing_text("megatron.core.pipeline_parallel.p2p_communication",
                        "batch_isend_irecv")


def probe() -> None:
    assert p2p_settings(True, 2) == dict(batch_p2p_comm=False, overlap_p2p_comm=True)
    assert p2p_settings(True, None) == dict(batch_p2p_comm=False, overlap_p2p_comm=False)
    assert p2p_settings(False, 2)["batch_p2p_comm"] is True


PATCH = Patch(
    name="gloo_p2p",
    targets=(),
    when="cpu",
    why="gloo pairs batched isend/irecv by peer and order only: at PP=2 with interleaving, "
        "recv_prev met send_next and activations were swapped.",
    check=check,
    probe=probe,
    kind="setting",
)
