"""Sharded (DCP) checkpoints: their `.metadata` is a pickle, which torch reads with plain
`pickle.load`; here only DCP's own metadata classes may be unpickled, and the entries are checked."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

from vlm.checkpoint.files import MAX_CONFIG_BYTES, CheckpointError, one_line, read_capped

_DCP_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", n)
    for n in (
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "TensorProperties",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a lookup in torch's layouts; returns nothing callable
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """The classes a torch.distributed.checkpoint `.metadata` file holds, and nothing else: no
    global that could run code is ever looked up (plain `pickle.load` runs any)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _DCP_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(
            getattr(torch, name, None), (torch.dtype, torch.memory_format, torch.layout)
        ):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def read_dcp_metadata(path: str | Path):
    """The `.metadata` of a sharded (DCP) checkpoint directory, unpickled with only DCP's own
    classes allowed and checked (entries, file names inside the directory, no transforms)."""
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorStorageMetadata,
    )

    p = Path(path)
    f = p / ".metadata"
    data = read_capped(f, MAX_CONFIG_BYTES, "the sharded checkpoint's .metadata")
    try:
        md = _DCPMetadataUnpickler(io.BytesIO(data)).load()
    except Exception as e:
        raise CheckpointError(f"{f}: not a sharded checkpoint's metadata ({one_line(e, 200)})") from None
    ok = (
        isinstance(md, Metadata)
        and isinstance(md.state_dict_metadata, dict)
        and all(
            isinstance(k, str) and isinstance(v, (TensorStorageMetadata, BytesStorageMetadata))
            for k, v in md.state_dict_metadata.items()
        )
    )
    storage = getattr(md, "storage_data", None)
    if ok and storage is not None:
        ok = isinstance(storage, dict) and all(
            isinstance(k, MetadataIndex)
            and isinstance(getattr(v, "relative_path", None), str)
            and Path(v.relative_path).name == v.relative_path
            and v.relative_path not in ("", ".", "..")
            and isinstance(v.offset, int)
            and isinstance(v.length, int)
            and v.offset >= 0
            and v.length >= 0
            and not getattr(v, "transform_descriptors", None)
            for k, v in storage.items()
        )
    if not ok:
        raise CheckpointError(f"{f}: not a sharded checkpoint's metadata (unexpected entries)")
    return md


def _dcp_reader_class():
    import torch.distributed.checkpoint as dcp

    class SafeFileSystemReader(dcp.FileSystemReader):
        """`FileSystemReader` whose metadata is read by `read_dcp_metadata` (restricted unpickling)."""

        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:
                raise CheckpointError(f"{self.path}: per-rank metadata is not supported")
            md = read_dcp_metadata(self.path)
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(md, "storage_meta", None) is None:
                md.storage_meta = StorageMeta()
            md.storage_meta.load_id = self.load_id
            return md

    return SafeFileSystemReader


def safe_dcp_reader(path: str | Path):
    """A DCP storage reader for `path` that never unpickles anything but DCP's metadata classes."""
    return _dcp_reader_class()(str(path))
