"""External data: ONNX tensors whose bytes live in a file beside the graph, read and written
through one reader and one writer (page-aligned offsets, one tensor at a time)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from tdpu_tui.engine.core.errors import GraphError
from tdpu_tui.engine.osutil.files import confined, with_filename


# Tensors above this size go to the external-data file; smaller ones stay in the .onnx.
EXTERNAL_THRESHOLD = 1024



# Page-aligned offsets let ONNX Runtime memory-map the external data.
ALIGN = 4096



def set_external(t: TensorProto, location: str, offset: int, length: int) -> None:
    """Point `t` at `length` bytes at `offset` of the external-data file `location`."""
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = t.external_data.add()
        entry.key, entry.value = key, value



class ExternalData:
    """The external-data file being written; every tensor starts at a page-aligned offset.

    The bytes go to the file from a writer thread, so converting the next tensor overlaps
    writing this one (the file system's write-back throttles a 9 GiB export to the disk's
    speed); at most QUEUED pieces wait, so memory stays bounded by the largest few. An error of
    the writer (a full disk) is raised, naming the file, by the next `write` or by `close`.
    """

    QUEUED = 2

    def __init__(self, path: Path, location: str):
        self.path = Path(path)
        self.location = location
        self.offset = 0
        self._fh = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self._open = True
        self._queue: queue.Queue = queue.Queue(maxsize=self.QUEUED)
        self._error: BaseException | None = None
        self._writer = threading.Thread(target=self._drain, name="tdpu-external-data", daemon=True)
        self._writer.start()

    def _drain(self) -> None:
        # The writer takes every piece until the end mark, whatever fails, so a `put` never
        # waits on a writer that is gone; after an error it only discards.
        while (piece := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._fh.write(piece)
                except BaseException as exc:  # noqa: BLE001 (raised by the caller's next write or close)
                    self._error = exc

    def _raise_error(self) -> None:
        exc = self._error
        if isinstance(exc, OSError):
            raise with_filename(exc, self.path) from exc
        if exc is not None:
            raise exc

    def write(self, chunks: Iterable[np.ndarray]) -> tuple[int, int]:
        """Append one tensor, given as consecutive pieces; returns (offset, length) of its bytes.
        The pieces must not change after they are handed over (they are written later)."""
        if not self._open:
            raise ValueError(f"{self.path}: written after close")
        self._raise_error()
        pad = (-self.offset) % ALIGN
        if pad:
            self._queue.put(b"\0" * pad)
            self.offset += pad
        start = self.offset
        for chunk in chunks:
            chunk = np.ascontiguousarray(chunk)
            self._queue.put(memoryview(chunk.reshape(-1)).cast("B"))
            self.offset += chunk.nbytes
            self._raise_error()
        return start, self.offset - start

    def close(self) -> None:
        """Wait for the writer, close the file; raises the writer's error, naming the file."""
        if not self._open:
            return
        self._open = False
        self._queue.put(None)
        self._writer.join()
        try:
            self._fh.close()
        except OSError as exc:
            self._error = self._error or exc
        self._raise_error()


def data_file(base_dir: Path, tensor: str, location: str) -> Path:
    """The external-data file of `tensor`: `location`, which must name a file inside the graph's
    directory `base_dir` (a graph must not make tdpu read or copy anything outside it)."""
    path = confined(base_dir, location)
    if path is None:
        raise GraphError(f"{base_dir}: tensor {tensor!r}: external data location {location!r} is not "
                         "inside the graph's directory; expected a file name relative to it (no "
                         "absolute path, drive or '..')")
    return path


def tensor_array(t: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """An initializer's values: a read-only memory map for external data, else in memory.

    This is the one reader of external data for inventory, replace and validate.
    """
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(int(d) for d in t.dims)
    if t.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in t.external_data}
        if "location" not in info:
            raise GraphError(f"tensor {t.name!r}: external data without a 'location'")
        path = data_file(base_dir, t.name, info["location"])
        offset = int(info.get("offset", 0))
        count = int(np.prod(shape, dtype=np.int64))
        if "length" in info and int(info["length"]) != count * dtype.itemsize:
            raise GraphError(f"{path}: tensor {t.name!r} {dtype} {list(shape)} needs "
                                 f"{count * dtype.itemsize} bytes, its external data gives length {info['length']}")
        if count == 0:
            return np.zeros(shape, dtype)
        try:
            flat = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))
        except (OSError, ValueError) as exc:
            raise GraphError(f"{path}: cannot read tensor {t.name!r} at offset {offset}: {exc}") from None
        return flat.reshape(shape)
    return numpy_helper.to_array(t)



def tensor_bytes(t: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """The tensor's stored little-endian bytes, flat uint8 (memory-mapped when external)."""
    return np.ascontiguousarray(tensor_array(t, base_dir)).reshape(-1).view(np.uint8)


def placeholder_tensor(name: str, data_type: int, dims: list[int]) -> onnx.TensorProto:
    """An initializer without data; `save_streamed` fills it in."""
    t = onnx.TensorProto()
    t.name, t.data_type = name, data_type
    t.dims.extend(dims)
    return t



def save_streamed(model: onnx.ModelProto, source: Callable[[onnx.TensorProto], np.ndarray],
                  onnx_path: Path, data_path: Path,
                  on_progress: Callable[[int, int, str], None] | None = None) -> None:
    """Write `model` with each initializer's bytes fetched from `source` one at a time.

    Small tensors are stored inline; the rest go to `data_path` at page-aligned offsets.
    """
    inits = model.graph.initializer
    data = ExternalData(data_path, data_path.name)
    try:
        for i, t in enumerate(inits):
            if on_progress is not None:
                on_progress(i, len(inits), t.name)
            array = np.asarray(source(t))
            raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
            del t.external_data[:]
            for f in ("raw_data", "float_data", "int32_data", "int64_data", "double_data",
                      "uint64_data", "string_data"):
                t.ClearField(f)
            if raw.size <= EXTERNAL_THRESHOLD:
                t.data_location = onnx.TensorProto.DEFAULT
                t.raw_data = raw.tobytes()
                continue
            offset, length = data.write([raw])
            set_external(t, data.location, offset, length)
    finally:
        data.close()
    try:
        onnx_path.write_bytes(model.SerializeToString())
    except OSError as exc:
        raise with_filename(exc, onnx_path) from exc
