"""Readers for weight files: lazy, memory-mapped, and never executing pickled code.

A `WeightSource` exposes a flat state dict: names, shapes and dtypes straight from the file
headers (nothing is materialised), and per-name tensors that are views into a memory map. After
a tensor has been copied to its destination, `release` drops its pages from this process's
resident set, so streaming a 12 GB file never holds a second copy of it.

Supported containers:
- torch zip files (`torch.save`), read with `weights_only=True, mmap=True`; the state dict may be
  nested under `state_dict` (mmdetection), `module` (DeepSpeed model states) or `model` (timm,
  MAE, DeiT);
- one safetensors file;
- a Hugging Face sharded checkpoint: `model.safetensors.index.json` (or its folder) naming
  `model-0000X-of-0000Y.safetensors` shards.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import mmap
import os
import pickle
import warnings
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

HF_INDEX_NAME = "model.safetensors.index.json"
# Where state dicts live inside torch checkpoints, in the order they are looked for.
STATE_DICT_CONTAINERS = ("state_dict", "module", "model")


class WeightsFormatError(ValueError):
    """A weight file that cannot be read safely or does not look like a state dict."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4  # Linux


def drop_resident_pages(tensor: torch.Tensor) -> None:
    """Drop the pages under a tensor that is a view into a read-only FILE mapping.

    Clean file-backed pages are re-read from the file if touched again, so this never changes
    data; it only stops already-copied weights from accumulating in this process's RSS. Never
    call it on anonymous memory (it would zero it): only `WeightSource`s that know their tensors
    are file-backed do.
    """
    if tensor.is_contiguous():
        start, nbytes = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    else:
        start, nbytes = tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes()
    if nbytes < _PAGE:
        return
    aligned = start - start % _PAGE
    _libc.madvise(ctypes.c_void_p(aligned), ctypes.c_size_t(start + nbytes - aligned), _MADV_DONTNEED)


class WeightSource(ABC):
    """A flat, lazily read state dict."""

    path: Path
    kind: str  # "torch" | "safetensors" | "safetensors-sharded"
    container: str | None = None  # key the state dict was nested under, if any
    file_backed: bool = True  # tensors are views into a file mapping (pages can be dropped)

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def info(self, name: str) -> TensorInfo: ...

    @abstractmethod
    def get(self, name: str) -> torch.Tensor: ...

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def release(self, tensor: torch.Tensor) -> None:
        if self.file_backed:
            drop_resident_pages(tensor)

    def close(self) -> None:
        pass

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        where = f" (state dict under '{self.container}')" if self.container else ""
        return f"{self.path} [{self.kind}{where}, {len(self.keys())} tensors]"


# ----------------------------------------------------------------------------------- torch files
# One line each (they end up as the one line a failed command prints); {detail} and {path} filled in.
_RESAVE = (
    "If, and only if, you trust where it came from, extract the weights once in a separate process and "
    "save them plainly: python -c \"import torch; ck = torch.load('{path}', map_location='cpu', "
    "weights_only=False); sd = next((ck[k] for k in ('state_dict', 'module', 'model') if "
    "isinstance(ck.get(k), dict)), ck); torch.save({{k: v for k, v in sd.items() if torch.is_tensor(v)}}, "
    "'{path}.weights.pth')\" then pass '{path}.weights.pth' (or run `piip6b convert` on it to get a "
    "safetensors file)."
)
_UNSAFE_HELP = (
    "It was refused because loading it needs more than tensors and plain containers: unpickling it "
    "would run Python code named inside the file ({detail}). " + _RESAVE
)
_PROTOCOL_HELP = (
    "It was refused, not found damaged: it was pickled with protocol {detail} (torch.save(..., "
    "pickle_protocol={detail}) or a plain pickle.dump), and torch's safe loader reads only protocol 2, "
    "torch.save's default. " + _RESAVE
)
# torch's safe unpickler implements protocol 2; later protocols bring opcodes it refuses.
_SAFE_PICKLE_PROTOCOL = 2


def _is_zip(path: Path) -> bool:
    try:
        return zipfile.is_zipfile(path)
    except OSError:
        return False


def _pickle_protocol(path: Path, zipped: bool) -> int | None:
    """The protocol of the pickle inside a torch file (its `data.pkl` record when zipped), read
    from the PROTO opcode that starts every pickle of protocol 2 or later."""
    try:
        if zipped:
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return None
                with archive.open(name) as record:
                    head = record.read(2)
        else:
            with open(path, "rb") as file:
                head = file.read(2)
    except (OSError, zipfile.BadZipFile):
        return None
    return head[1] if len(head) == 2 and head[0] == pickle.PROTO[0] else None


def _load_torch_object(path: Path) -> tuple[object, bool]:
    """torch.load with weights_only; mmap for zip files. Returns (object, file_backed)."""
    zipped = _is_zip(path)
    try:
        with warnings.catch_warnings():
            # A later protocol fails below with a message of its own; torch's warning would repeat it.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            if zipped:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
            # Pre-1.6 (legacy, non-zip) files cannot be memory-mapped; they are still read safely.
            return torch.load(path, map_location="cpu", weights_only=True), False
    except Exception as exc:  # torch raises many types for damaged archives; all mean the same here
        protocol = _pickle_protocol(path, zipped)
        if protocol is not None and protocol > _SAFE_PICKLE_PROTOCOL:
            raise WeightsFormatError(f"{path}: not loaded. " + _PROTOCOL_HELP.format(detail=protocol, path=path)) from None
        text = str(exc)
        if isinstance(exc, pickle.UnpicklingError) and "GLOBAL" in text:  # a class or function the file asks to import
            lines = [line.strip() for line in text.splitlines() if line.strip()]
            detail = next((line for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0] if lines else "")
            raise WeightsFormatError(f"{path}: not loaded. " + _UNSAFE_HELP.format(detail=detail, path=path)) from None
        raise WeightsFormatError(_corrupt(path, exc, zipped)) from None


def _corrupt(path: Path, exc: Exception, zipped: bool) -> str:
    hint = "the file is truncated or corrupt (re-download it and compare its checksum)"
    if not zipped:
        hint += "; it is not a torch zip archive either (is it a weight file at all?)"
    # torch's own weights_only text suggests weights_only=False, which is not the fix for damage.
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    summary = next((line for line in lines if "Unsupported" in line), lines[0])
    return f"{path}: cannot be read as a torch checkpoint ({type(exc).__name__}: {summary}). Likely cause: {hint}."


def _is_flat_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items()
    )


def _find_state_dict(obj: object, path: Path) -> tuple[Mapping[str, torch.Tensor], str | None]:
    if not isinstance(obj, Mapping):
        raise WeightsFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors).")
    for key in STATE_DICT_CONTAINERS:
        inner = obj.get(key)
        if key == "module" and key in obj and inner is None:
            raise WeightsFormatError(
                f"{path}: a DeepSpeed model-states file without consolidated weights ('module' is None: "
                "the parameters are in the ZeRO-3 shards next to it). Consolidate the checkpoint folder "
                "first (`piip6b export`, or DeepSpeed's zero_to_fp32) and load the result."
            )
        if isinstance(inner, Mapping) and inner:
            tensors = {k: v for k, v in inner.items() if torch.is_tensor(v)}
            if tensors:
                non_tensors = sorted(k for k, v in inner.items() if not torch.is_tensor(v))
                if non_tensors:
                    raise WeightsFormatError(f"{path}: '{key}' mixes tensors with other values under {non_tensors[:5]}.")
                return inner, key
    if _is_flat_state_dict(obj):
        return obj, None
    raise WeightsFormatError(
        f"{path}: no state dict found: expected a mapping of names to tensors, at the top level or under one "
        f"of {list(STATE_DICT_CONTAINERS)}; top-level keys are {sorted(map(str, obj))[:10]}."
    )


class TorchSource(WeightSource):
    kind = "torch"

    def __init__(self, path: Path) -> None:
        self.path = path
        obj, self.file_backed = _load_torch_object(path)
        self._tensors, self.container = _find_state_dict(obj, path)
        self._keys = list(self._tensors)

    def keys(self) -> list[str]:
        return self._keys

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def close(self) -> None:
        self._tensors = {}


class StateDictSource(WeightSource):
    """An in-memory (or meta-device) state dict seen as a source: for checks and consolidated dicts."""

    kind = "state-dict"
    file_backed = False

    def __init__(self, state_dict: Mapping[str, torch.Tensor], name: str = "<state dict>") -> None:
        self.path = Path(name)
        self._tensors = dict(state_dict)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        t = self._tensors[name]
        return TensorInfo(tuple(t.shape), t.dtype)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]


# ----------------------------------------------------------------------------------- safetensors
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
SAFETENSORS_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # the Rust error type is not importable by a stable name
        raise WeightsFormatError(
            f"{path}: cannot be read as safetensors: {exc}. Likely cause: the file is truncated or corrupt "
            "(an interrupted download or copy); fetch it again and compare its size and checksum."
        ) from None


class SafetensorsSource(WeightSource):
    kind = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = _open_safetensors(path)
        self._keys = list(self._handle.keys())
        self._metadata = dict(self._handle.metadata() or {})

    def keys(self) -> list[str]:
        return self._keys

    def info(self, name: str) -> TensorInfo:
        sl = self._handle.get_slice(name)
        return TensorInfo(tuple(sl.get_shape()), _DTYPES[sl.get_dtype()])

    def get(self, name: str) -> torch.Tensor:
        return self._handle.get_tensor(name)

    @property
    def metadata(self) -> dict[str, str]:
        return self._metadata

    def close(self) -> None:
        self._handle = None


class ShardedSafetensorsSource(WeightSource):
    kind = "safetensors-sharded"

    def __init__(self, index_path: Path) -> None:
        self.path = index_path
        try:
            index = json.loads(index_path.read_text())
            weight_map: dict[str, str] = index["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsFormatError(f"{index_path}: not a valid safetensors index (needs a 'weight_map'): {exc}") from None
        self._metadata = {str(k): str(v) for k, v in (index.get("metadata") or {}).items()}
        self._shards: dict[str, SafetensorsSource] = {}
        missing_files = sorted({f for f in weight_map.values() if not (index_path.parent / f).is_file()})
        if missing_files:
            raise WeightsFormatError(f"{index_path}: shard files named in the index are missing: {missing_files}")
        for shard in sorted(set(weight_map.values())):
            self._shards[shard] = SafetensorsSource(index_path.parent / shard)
        for name, shard in weight_map.items():
            if name not in self._shards[shard]._keys:
                raise WeightsFormatError(f"{index_path}: '{name}' is mapped to {shard}, which does not contain it.")
        self._where = weight_map
        self._keys = list(weight_map)

    def keys(self) -> list[str]:
        return self._keys

    def info(self, name: str) -> TensorInfo:
        return self._shards[self._where[name]].info(name)

    def get(self, name: str) -> torch.Tensor:
        return self._shards[self._where[name]].get(name)

    @property
    def metadata(self) -> dict[str, str]:
        return self._metadata

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


def open_source(path: str | os.PathLike[str]) -> WeightSource:
    """Open a weight file (or a Hugging Face model folder) for lazy, memory-mapped reading."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / HF_INDEX_NAME, path / "model.safetensors"):
            if candidate.is_file():
                path = candidate
                break
        else:
            raise WeightsFormatError(f"{path}: a folder without {HF_INDEX_NAME} or model.safetensors.")
    if not path.is_file():
        raise WeightsFormatError(f"{path}: no such file.")
    if path.name.endswith(".index.json"):
        return ShardedSafetensorsSource(path)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return SafetensorsSource(path)
    return TorchSource(path)


def _looks_like_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len < path.stat().st_size
