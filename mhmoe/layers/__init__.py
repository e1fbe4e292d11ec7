"""The layer family: FFN config, dense SwiGLU, router, experts (dispatch and compute), MoE / MH-MoE, attention."""
