"""Model layers (nn.Modules), each owning its parameters and its cache layout.

kda.KimiDeltaAttention, mla.MultiheadLatentAttention (+ mla.RMSNorm), mlp.SwiGLUMLP, moe.MoE,
mamba2.Mamba2Mixer. Import them from their modules; this package imports nothing eagerly.
"""
