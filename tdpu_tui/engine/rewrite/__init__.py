"""Graph rewrites: the MatMul inventory and its patterns, node selection, BitLinear and bf16 lm_head."""
