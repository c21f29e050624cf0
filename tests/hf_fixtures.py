"""Tiny BitNet checkpoints saved by transformers itself, and transformers' own logits.

How it works in transformers 5.x (found by trying; see the notes in each function):
our synthetic tiny checkpoint (with the asked-for `linear_class`) is loaded with
`BitNetForCausalLM.from_pretrained` and written back with `save_pretrained`, so the files
under test are transformers' serialization, not ours:
- `autobitlinear` (offline): transformers unpacks on load (`BitNetDeserialize`) and saves the
  *unpacked* ternary weight as float `[N, K]` plus `weight_scale`; the default
  `save_original_format=True` fails (`NotImplementedError`: the deserialize op has no
  reverse), hence `save_original_format=False`.
- `bitlinear`: the packed uint8 buffer is kept and saved as it is; transformers computes
  `y = acc / (s · weight_scale)` (it divides by the scale).
Saved configs carry `rope_parameters` instead of `rope_theta`.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from pathlib import Path

import numpy as np
import torch

from tdpu_tui.engine.model.synthetic import write_synthetic


@contextlib.contextmanager
def _quiet_eager():
    """transformers' BitNet layers are `@torch.compile`d: compiling takes seconds on CPU, so run eager."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        with torch._dynamo.config.patch(disable=True):
            yield transformers
    finally:
        transformers.logging.set_verbosity(verbosity)
        transformers.logging.enable_progress_bar()


def _load(path: Path):
    with _quiet_eager() as transformers, warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit notices raised by the lazy import
        model = transformers.BitNetForCausalLM.from_pretrained(path, dtype=torch.float32)
    # `dtype=float32` leaves the embeddings and norms in the checkpoint's bf16, and `.float()`
    # is refused on a quantized model: widen them one by one.
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.dtype == torch.bfloat16:
            t.data = t.data.float()
    return model.eval()


def hf_saved_checkpoint(tmp_path: Path, linear_class: str, seed: int = 0, **overrides: int) -> Path:
    """A tiny checkpoint in `tmp_path`, serialized by transformers' `save_pretrained`."""
    ours = write_synthetic(Path(tmp_path) / f"ours-{linear_class}", "tiny", seed, overrides or None,
                           linear_class=linear_class)
    out = Path(tmp_path) / f"hf-{linear_class}"
    model = _load(ours)
    with _quiet_eager():
        model.save_pretrained(out, save_original_format=False)
    return out


def hf_logits(path: Path, input_ids: np.ndarray) -> np.ndarray:
    """transformers' own forward (eager attention, float32): logits [B, S, V]."""
    model = _load(path)
    with _quiet_eager(), torch.inference_mode():
        out = model(input_ids=torch.as_tensor(np.asarray(input_ids), dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()
