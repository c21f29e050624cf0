"""Writing the synthetic checkpoint: time and peak memory, against writing the same bytes.

    python benchmarks/bench_synthetic.py [--preset 2b4t] [--dir /tmp/x] [--reference]

The baseline is a plain write of as many zero bytes, in the same chunks, to the same disk:
the ratio shows what generating the values costs on top of the I/O. `--reference` also
loads the written checkpoint into the PyTorch reference and times one short forward pass.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tdpu_tui.engine.model.checkpoint import open_checkpoint  # noqa: E402
from tdpu_tui.engine.osutil.files import human_bytes  # noqa: E402
from tdpu_tui.engine.model.synthetic import write_synthetic  # noqa: E402
from tdpu_tui.engine.osutil.platform import peak_rss_bytes


def peak_rss() -> int:
    return peak_rss_bytes()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="2b4t")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--reference", action="store_true")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-synthetic-", dir=args.dir))
    try:
        rss0 = peak_rss()
        t0 = time.perf_counter()
        path = write_synthetic(root / args.preset, args.preset, args.seed)
        t_write = time.perf_counter() - t0
        rss_write = peak_rss()
        size = (path / "model.safetensors").stat().st_size

        chunk = bytes(1 << 22)
        t0 = time.perf_counter()
        with open(root / "zeros.bin", "wb") as fh:
            for _ in range(0, size, len(chunk)):
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        t_zeros = time.perf_counter() - t0
        (root / "zeros.bin").unlink()

        print(f"preset {args.preset}: {human_bytes(size)} in {t_write:.1f} s "
              f"({size / t_write / 1e6:.0f} MB/s); plain write of as many bytes {t_zeros:.1f} s; "
              f"ratio {t_write / t_zeros:.2f}")
        print(f"peak RSS: {human_bytes(rss0)} before, {human_bytes(rss_write)} after writing "
              f"(+{human_bytes(rss_write - rss0)})")

        t0 = time.perf_counter()
        with open_checkpoint(path) as ckpt:
            names = ckpt.projection_names()
            for name in names:
                ckpt.ternary(name)
        print(f"loader: {len(names)} projections unpacked in {time.perf_counter() - t0:.1f} s")

        if args.reference:
            import torch

            from tdpu_tui.engine.model.reference import BitNetForCausalLM

            t0 = time.perf_counter()
            with open_checkpoint(path) as ckpt:
                model = BitNetForCausalLM.from_checkpoint(ckpt)
            t_load = time.perf_counter() - t0
            ids = torch.randint(0, ckpt.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
            t0 = time.perf_counter()
            logits = model(input_ids=ids)
            t_fwd = time.perf_counter() - t0
            print(f"reference: loaded in {t_load:.1f} s, forward [1, 32] in {t_fwd:.1f} s, "
                  f"peak RSS {human_bytes(peak_rss())}, logits finite {bool(torch.isfinite(logits).all())}, "
                  f"distinct argmax {len(set(logits.argmax(-1).flatten().tolist()))}/32, "
                  f"std {logits.std().item():.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
