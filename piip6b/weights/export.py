"""Write safetensors files in this project's (the reference's) key layout, streaming.

`safetensors.torch.save_file` needs the whole state dict in memory; a 6B backbone does not fit
that twice. The format is simple (8-byte little-endian header length, a JSON header of names,
dtypes, shapes and byte offsets, then the raw little-endian bytes in header order), so the header
is written from the known shapes first and the tensors are streamed after it, one at a time.
The file appears atomically (temporary name, fsync, rename). The hash of all tensor bytes is
computed on the way and patched into a fixed-width metadata slot at the end.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from .formats import SAFETENSORS_DTYPE_NAMES, TensorInfo
from .layouts import PIIP6B_FORMAT_KEY, PIIP6B_TARGET_KEY

# "2": every preset's names are the reference's (DeiT III gamma_1/gamma_2, interaction sides
# branch1/branch2); "1" files are read through layouts.LEGACY_RENAMES.
FORMAT_VERSION = "2"
TENSORS_SHA256_KEY = "piip6b.tensors_sha256"
_HASH_PLACEHOLDER = "0" * 64


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(
    path: str | os.PathLike[str],
    header: Sequence[tuple[str, TensorInfo]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str] | None = None,
    target: str = "",
) -> str:
    """Stream `tensors` (in `header` order, with exactly those shapes/dtypes) into a safetensors file.

    target: the module path the names are rooted at ("" = the model root; "branch1" for a file
    holding one converted branch), recorded so that loading it defaults to the same place.
    Returns the sha256 of all tensor bytes (also stored as metadata `piip6b.tensors_sha256`).
    """
    if sys.byteorder != "little":
        raise RuntimeError("safetensors stores little-endian data; writing from a big-endian host is not supported")
    path = Path(path)
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    meta.update({"format": "pt", PIIP6B_FORMAT_KEY: FORMAT_VERSION, PIIP6B_TARGET_KEY: target,
                 TENSORS_SHA256_KEY: _HASH_PLACEHOLDER})
    table: dict[str, object] = {"__metadata__": meta}
    offset = 0
    for name, info in header:
        if info.dtype not in SAFETENSORS_DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {info.dtype} cannot be stored in safetensors")
        nbytes = info.numel * torch.empty((), dtype=info.dtype).element_size()
        table[name] = {"dtype": SAFETENSORS_DTYPE_NAMES[info.dtype], "shape": list(info.shape),
                       "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header_bytes = json.dumps(table, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # data starts 8-byte aligned
    hash_at = 8 + header_bytes.index(_HASH_PLACEHOLDER.encode())

    digest = hashlib.sha256()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f:
            f.write(len(header_bytes).to_bytes(8, "little"))
            f.write(header_bytes)
            expected = iter(header)
            for name, tensor in tensors:
                want_name, want = next(expected, (None, None))
                if name != want_name or tuple(tensor.shape) != want.shape or tensor.dtype != want.dtype:
                    raise ValueError(
                        f"tensor stream out of step with the header: got {name} {tuple(tensor.shape)} {tensor.dtype}, "
                        f"expected {want_name} {want.shape if want else None} {want.dtype if want else None}"
                    )
                data = _tensor_bytes(tensor)
                digest.update(data)
                f.write(data)
            leftover = next(expected, None)
            if leftover is not None:
                raise ValueError(f"tensor stream ended before '{leftover[0]}'")
            f.seek(hash_at)
            f.write(digest.hexdigest().encode())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest.hexdigest()


def save_state_dict(
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    target: str = "",
) -> str:
    """Write an in-memory state dict (e.g. a consolidated engine checkpoint) as safetensors.

    Tensors that share storage are written as separate copies (safetensors has no aliasing).
    """
    header = [(name, TensorInfo(tuple(t.shape), t.dtype)) for name, t in state_dict.items()]
    return write_safetensors(path, header, ((name, t.detach().cpu()) for name, t in state_dict.items()),
                             metadata, target)


def file_sha256(path: str | os.PathLike[str], chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    buf = bytearray(chunk)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()
