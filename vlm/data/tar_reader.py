"""Read raw samples out of one local WebDataset tar shard, refusing what could hurt the reader.

A shard is untrusted input. Before any member's bytes are read, its tar header is checked:

- only regular files are read (links, devices, FIFOs are counted as ``tar_not_a_file``;
  directories are passed over quietly, tar tools write them);
- a member whose declared size is over ``max_member_bytes`` is skipped without reading it
  (``tar_member_too_large``). The size is the *declared* one, so a 14 KB GNU sparse member that
  expands to 2 GiB is refused from its header;
- a sample whose members add up to more than ``max_sample_bytes``, or that has more than
  ``MAX_MEMBERS`` members, is dropped (``tar_sample_too_large``).

Members are grouped into samples as WebDataset does: ``dir/KEY.EXT`` belongs to sample
``dir/KEY`` (the name up to the first dot of the base name), the extension is lower-cased, and
consecutive members with one key form one sample. A member name without an extension
(``tar_no_key``), an extension repeated within one sample (``tar_duplicate_member``) and a key that
comes back later in the same shard (``duplicate_key``, which would otherwise train twice) are
counted and skipped. Anything the tar library cannot read (a zero-byte file, random bytes, a
truncated archive) ends that shard with ``tar_error``.

Counts go to a :class:`ShardErrors`, which the loader folds into its per-reason skip counts.
"""

from __future__ import annotations

import logging
import re
import tarfile
from collections import Counter
from collections.abc import Iterator

log = logging.getLogger("vlm.data")

# ``dir/KEY.EXT``: the key is everything up to the first dot of the base name.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
MAX_MEMBERS = 4096  # members of one sample (a video as frames has one per frame)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's metadata members (``__key__`` …): not media


class ShardErrors:
    """Per-reason counts of what the reader refused; logs the first ``warn_limit`` of them."""

    def __init__(self, warn_limit: int = 20):
        self.counts: Counter = Counter()
        self.warn_limit, self.warned = warn_limit, 0

    def add(self, reason: str, url: str, detail: str) -> None:
        self.counts[reason] += 1
        if self.warned < self.warn_limit:
            self.warned += 1
            log.warning("skipping shard data [%s] in %s: %s", reason, url, detail)


def read_samples(url: str, errors: ShardErrors, max_member_bytes: int, max_sample_bytes: int) -> Iterator[dict]:
    """Raw samples ``{"__key__", "__url__", EXT: bytes, …}`` of the tar file at ``url``, in order."""
    seen: set[str] = set()
    current: dict | None = None
    size = 0

    def finish(sample: dict | None) -> dict | None:
        if sample is None or sample.get("__bad__"):
            return None
        key = sample["__key__"]
        if key in seen:
            errors.add("duplicate_key", url, f"sample {key!r} appears twice; the second is skipped")
            return None
        seen.add(key)
        return sample

    try:
        with open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for member in tar:
                if member.isdir():
                    continue
                if not member.isreg():
                    errors.add("tar_not_a_file", url, f"{member.name!r} is not a regular file")
                    continue
                if _META.match(member.name):
                    continue
                m = _KEY_EXT.match(member.name)
                if m is None:
                    errors.add("tar_no_key", url, f"member {member.name!r} has no KEY.EXT name")
                    continue
                key, ext = m.group(1), m.group(2).lower()
                if current is None or current["__key__"] != key:
                    done = finish(current)
                    if done is not None:
                        yield done
                    current, size = {"__key__": key, "__url__": url}, 0
                if current.get("__bad__"):
                    continue
                if member.size > max_member_bytes:
                    errors.add(
                        "tar_member_too_large",
                        url,
                        f"{member.name!r} declares {member.size} bytes > data.max_member_bytes={max_member_bytes}",
                    )
                    current["__bad__"] = True
                    continue
                size += member.size
                if size > max_sample_bytes or len(current) > MAX_MEMBERS:
                    errors.add(
                        "tar_sample_too_large",
                        url,
                        f"sample {key!r} is over data.max_sample_bytes={max_sample_bytes} or {MAX_MEMBERS} members",
                    )
                    current["__bad__"] = True
                    continue
                if ext in current:
                    errors.add("tar_duplicate_member", url, f"sample {key!r} has two {ext!r} members")
                    current["__bad__"] = True
                    continue
                current[ext] = tar.extractfile(member).read(member.size)
    except Exception as e:  # any archive the tar library cannot read: the rest of this shard is lost
        errors.add("tar_error", url, f"{type(e).__name__}: {e}")
        return  # a sample cut by the error may be incomplete: drop it
    done = finish(current)
    if done is not None:
        yield done
