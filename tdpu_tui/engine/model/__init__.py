"""BitNet b1.58 itself: the checkpoint, the synthetic one, the PyTorch reference, comparisons with it."""
