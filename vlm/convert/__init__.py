"""Converters from common data formats to `vlm` shards (see ``data/README.md``).

Four converters share one machinery:

``convert_llava``
    LLaVA / ShareGPT conversation JSON + an image folder -> chat samples.
``convert_captions``
    a folder of images with same-stem ``.txt`` captions, or a CSV / JSONL of (path, caption)
    -> chat samples (user: image + a prompt drawn from a list, assistant: the caption).
``convert_interleaved``
    JSONL documents of text and images (OBELICS parallel lists, ``items`` lists, or MMC4
    ``text_list`` + ``image_info``) -> ``document`` samples.
``convert_parquet``
    Parquet files / Arrow ``datasets.save_to_disk`` folders with conversations (ShareGPT
    ``conversations``, ``messages``, The Cauldron ``texts``) and images (bytes or paths) -> chat
    samples. Needs pyarrow (the ``parquet`` extra), imported only when it runs.

Machinery (all converters):

* **Streaming.** Input records are read one at a time: ``.jsonl`` line by line, ``.json`` arrays
  with an incremental ``JSONDecoder.raw_decode`` over a buffered file, CSV with :mod:`csv`, image
  folders by a sorted walk. Records are grouped into chunks of ``maxcount``; at most
  ``2 * workers`` chunks are in flight, so memory is bounded whatever the input size.
* **One chunk = one shard.** Chunk ``i`` (records ``i*maxcount`` .. ``(i+1)*maxcount-1``) becomes
  ``out/NAME-%06d.tar``, written by a process pool (fork) of ``workers`` processes
  (``workers <= 1``: in-process). Because a chunk maps to exactly one shard, shard ``i`` is the
  same whatever the number of workers, and resuming only needs the chunk index. ``maxsize`` is
  therefore a *soft* cap: a shard that ends up bigger is kept and reported (``over_maxsize`` in its
  report, a warning on stdout); lower ``maxcount`` if that happens.
* **Resumable.** A shard is written to ``*.tar.tmp`` and renamed when complete, then its report
  ``NAME-%06d.json`` is written (also atomically). Re-running skips every chunk whose report
  exists and was made with the same options (a report from other options is an error unless
  ``overwrite=True``, which first deletes this converter's files for ``NAME``). ``dataset.json``
  is removed at the start and written last.
* **Validated media, original bytes.** Every image is read from under ``image_root`` (paths that
  leave it: ``path_escape``; URLs: ``url_not_allowed``; no network is ever used), fully decoded
  with :func:`vlm.data.media.decode_image` (refusals count as ``media_<reason>``, e.g.
  ``media_missing``, ``media_corrupt``, ``media_too_many_pixels``), and stored as the original
  bytes under an extension sniffed from the data (``KEY.0.jpg``, ``KEY.1.png``), never the file
  name's.
* **Keys** are ``NAME-SSSSSS-IIIIII`` (shard, index in the shard: never a dot); the record's own id
  goes to ``meta.id``.
* **Reports.** Per shard and in ``dataset.json``: records read, samples written, skipped by reason
  (exact counts), images written, images dropped by reason (interleaved), shards, bytes, the
  options, and a few example messages per reason. Run facts (seconds, shards written / reused,
  peak RSS) live under ``run`` so that the rest of ``dataset.json`` is identical after a resume.

Skip reasons (whole record): ``bad_json`` (a JSONL line that is not JSON), ``bad_record`` (not the
expected structure), ``path_escape``, ``url_not_allowed``, ``bad_path``, ``media_*``,
``image_marker_mismatch``, ``bad_roles``, ``empty_turn``, ``empty_caption``, ``no_text``,
``bad_text`` (text that cannot be encoded as UTF-8, e.g. a lone surrogate), ``internal_error`` (an
unexpected exception while building one record: counted with its message, the run goes on).
Parquet rows add ``wrong_column_type``, ``empty_conversation`` and ``missing_image``
(``parquet.SKIP_REASONS``). When a record fails several checks, the first one that fails is counted.

Files: ``common.py`` (errors, the builder registry, report helpers), ``records.py`` (streaming
JSON readers), ``images.py`` (path confinement, validated image bytes), ``llava.py``,
``captions.py``, ``interleaved.py``, ``parquet.py`` (one source format each: record builder +
public function), ``shards.py`` (one chunk -> one shard + report), ``pipeline.py``
(``convert()``: chunks, pool, resume, ``dataset.json``), ``cli.py`` (helpers of the
``data/convert_*.py`` scripts).
"""

from __future__ import annotations

from vlm.convert.captions import DEFAULT_CAPTION_PROMPTS, convert_captions, iter_caption_records
from vlm.convert.cli import add_common_arguments, common_kwargs, run_cli
from vlm.convert.common import BUILDERS, BadRecord, ConvertError, Skip
from vlm.convert.images import resolve_image_path
from vlm.convert.interleaved import convert_interleaved
from vlm.convert.llava import convert_llava
from vlm.convert.parquet import convert_parquet
from vlm.convert.pipeline import convert, format_report
from vlm.convert.records import iter_json_array, iter_records

__all__ = [
    "BUILDERS",
    "DEFAULT_CAPTION_PROMPTS",
    "BadRecord",
    "ConvertError",
    "Skip",
    "add_common_arguments",
    "common_kwargs",
    "convert",
    "convert_captions",
    "convert_interleaved",
    "convert_llava",
    "convert_parquet",
    "format_report",
    "iter_caption_records",
    "iter_json_array",
    "iter_records",
    "resolve_image_path",
    "run_cli",
]
