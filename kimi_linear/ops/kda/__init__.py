"""Kimi Delta Attention (KDA): public ops, the gate, and the plain-PyTorch references."""

from kimi_linear.ops.kda.chunk import chunk_kda
from kimi_linear.ops.kda.decode import kda_decode_step, kda_decode_step_reference
from kimi_linear.ops.kda.gate import beta_activation, kda_gate
from kimi_linear.ops.kda.naive import naive_chunk_kda, naive_recurrent_dplr, naive_recurrent_kda
from kimi_linear.ops.kda.recurrent import fused_recurrent_kda
from kimi_linear.ops.kda import library  # noqa: F401, E402  (registers the torch.library ops torch.compile sees)

__all__ = [
    "beta_activation",
    "chunk_kda",
    "fused_recurrent_kda",
    "kda_decode_step",
    "kda_decode_step_reference",
    "kda_gate",
    "naive_chunk_kda",
    "naive_recurrent_dplr",
    "naive_recurrent_kda",
]
