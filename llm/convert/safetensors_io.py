"""Reading and writing safetensors without a framework: memory-mapped numpy views, bf16 included.

The format: 8 bytes little-endian header length, a JSON header {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian bytes. Reading maps
the file and views one tensor at a time, so a checkpoint larger than memory can be converted
tensor by tensor. A sharded checkpoint is several files plus `model.safetensors.index.json`
(its `weight_map`: tensor name -> file).
"""

from __future__ import annotations

import json
import os
import shutil
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}  # fmt: skip
NAMES = {v: k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class Reader:
    """Tensors of a HF model directory by name, read lazily from (possibly sharded) safetensors."""

    def __init__(self, directory: str):
        index = os.path.join(directory, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                files = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, "model.safetensors")):
            files = None
        else:
            raise FileNotFoundError(f"no model.safetensors or {INDEX} in {directory} (pytorch_model.bin is not read: "
                                    "re-save the model with save_pretrained(safe_serialization=True))")  # fmt: skip
        self.directory = directory
        self._headers: dict[str, tuple[dict, int]] = {}
        self.file_of: dict[str, str] = {}
        for file in sorted(set(files.values())) if files else ["model.safetensors"]:
            header, start = _header(os.path.join(directory, file))
            self._headers[file] = (header, start)
            self.file_of.update({k: file for k in header if k != "__metadata__"})

    def names(self) -> list[str]:
        return sorted(self.file_of)

    def get(self, name: str) -> np.ndarray:
        """A read-only memory-mapped view of the tensor (copied only when converted)."""
        if name not in self.file_of:
            raise KeyError(f"tensor {name!r} is not in {self.directory}")
        file = self.file_of[name]
        header, start = self._headers[file]
        meta = header[name]
        begin, end = meta["data_offsets"]
        dtype = DTYPES[meta["dtype"]]
        mm = np.memmap(os.path.join(self.directory, file), dtype=np.uint8, mode="r", offset=start + begin,
                       shape=(end - begin,))  # fmt: skip
        return mm.view(dtype).reshape(meta["shape"])


def _header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


class ShardedWriter:
    """Writes tensors as they come into shards of at most `shard_bytes` (plus the index when > 1).

    Each tensor's bytes go straight to a temporary data file (only the tensor at hand is in
    memory); closing a shard writes the header and streams the data after it."""

    def __init__(self, directory: str, shard_bytes: int = 2 << 30):
        self.directory, self.shard_bytes = directory, shard_bytes
        os.makedirs(directory, exist_ok=True)
        self.shards: list[dict[str, dict]] = []  # per written shard: name -> header entry
        self.tmp_names: list[str] = []
        self._data = None
        self._entries: dict[str, dict] = {}
        self._offset = 0

    def add(self, name: str, tensor: np.ndarray) -> None:
        tensor = np.ascontiguousarray(tensor)
        if self._entries and self._offset + tensor.nbytes > self.shard_bytes:
            self._flush()
        if self._data is None:
            self._data = open(os.path.join(self.directory, f".data-{len(self.shards):05d}.tmp"), "wb")
        self._entries[name] = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape),
                               "data_offsets": [self._offset, self._offset + tensor.nbytes]}  # fmt: skip
        self._data.write(memoryview(tensor.reshape(-1).view(np.uint8)))  # no copy of the tensor
        self._offset += tensor.nbytes

    def _flush(self) -> None:
        data_path = self._data.name
        self._data.close()
        name = f"shard-{len(self.shards):05d}.safetensors.tmp"
        header = {"__metadata__": {"format": "pt"}, **self._entries}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(os.path.join(self.directory, name), "wb") as out, open(data_path, "rb") as data:
            out.write(struct.pack("<Q", len(raw)))
            out.write(raw)
            shutil.copyfileobj(data, out, 16 << 20)
        os.remove(data_path)
        self.shards.append(self._entries)
        self.tmp_names.append(name)
        self._data, self._entries, self._offset = None, {}, 0

    def close(self) -> list[str]:
        """Write what is left and name the files as transformers expects; returns the file names."""
        if self._entries or not self.shards:
            if self._data is None:
                self._data = open(os.path.join(self.directory, f".data-{len(self.shards):05d}.tmp"), "wb")
            self._flush()
        n = len(self.shards)
        finals = (
            ["model.safetensors"]
            if n == 1
            else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        for tmp, final in zip(self.tmp_names, finals, strict=True):
            os.replace(os.path.join(self.directory, tmp), os.path.join(self.directory, final))
        if n > 1:
            weight_map = {k: final for shard, final in zip(self.shards, finals, strict=True) for k in shard}
            total = sum(
                e["data_offsets"][1] - e["data_offsets"][0] for shard in self.shards for e in shard.values()
            )
            with open(os.path.join(self.directory, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
        return finals
