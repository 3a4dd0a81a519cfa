"""Memory and speed of the Parquet converter on a large generated file.

    python bench/parquet_memory.py                                          # 100k rows, row groups of 1000, 2 writers
    python bench/parquet_memory.py --rows 100000 --row-group-size 100000    # one huge row group
    python bench/parquet_memory.py --format arrow                           # a save_to_disk folder (Arrow IPC stream)
    python bench/parquet_memory.py --work-dir /tmp/pq --workers 1 --maxcount 500

Writes a ShareGPT-layout Parquet file (``id``, ``image`` = ``{bytes, path}`` structs, ``conversations``)
of ``--rows`` rows with ``pyarrow.parquet.ParquetWriter``, one row group at a time. The images are
``--distinct-images`` small JPEGs (48x32, about 1 KB), each row's copy made unique by a JPEG comment
segment so that Parquet's dictionary encoding cannot shrink the file. A few rows are broken: every
1000th image null, every 997th conversation empty, every 991st image truncated bytes.

Then ``vlm.convert.convert_parquet`` runs in a fresh child process, and the bench prints rows/s,
seconds, the counts by reason (checked against what was generated), and the child's peak RSS from
``resource.getrusage`` (the converter's main process, and its largest writer process), next to that
of a child that only imports the converter (the floor every run pays: Python, PIL, and torch pulled
in by ``vlm.data``). The input is generated in a child process too: a child's ``ru_maxrss`` starts
from its parent's RSS at fork, so this parent stays small.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, resource, sys, time
t0 = time.perf_counter()
from vlm.convert import convert_parquet
import pyarrow, pyarrow.parquet
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
info = None
if sys.argv[1] != "--import-only":
    info = convert_parquet(sys.argv[1], sys.argv[2], maxcount=int(sys.argv[3]), workers=int(sys.argv[4]),
                           batch_size=int(sys.argv[5]), overwrite=True, verbose=False)
hwm = next((int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmHWM")), None)
print(json.dumps({
    "vmhwm_main_mb": hwm,
    "seconds": time.perf_counter() - t0,
    "rss_after_import_mb": imported,
    "peak_rss_main_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "peak_rss_writer_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    "info": info and {k: info[k] for k in ("records", "samples", "skipped", "images", "bytes", "run")},
}))
"""


def small_jpegs(n: int) -> list[bytes]:
    from PIL import Image, ImageDraw

    out = []
    for i in range(n):
        img = Image.new("RGB", (48, 32), ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256))
        ImageDraw.Draw(img).ellipse((4 + i % 9, 4, 30, 28), fill=(255 - (i * 37) % 256, 40, 90))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


class _ArrowFolder:
    """A ``datasets.save_to_disk``-style folder: one Arrow IPC stream file + state.json."""

    def __init__(self, folder: Path, schema):
        import pyarrow as pa
        import pyarrow.ipc

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
        (folder / "dataset_info.json").write_text("{}")
        self.sink = pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb")
        self.writer = pyarrow.ipc.new_stream(self.sink, schema)

    def write_table(self, table, row_group_size: int) -> None:
        self.writer.write_table(table, max_chunksize=row_group_size)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.writer.close()
        self.sink.close()


def write_input(path: Path, rows: int, row_group_size: int, distinct: int) -> dict:
    """A Parquet file at ``path``, or (``path`` without a .parquet suffix) a save_to_disk folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    turn = pa.struct([("from", pa.string()), ("value", pa.string())])
    schema = pa.schema([("id", pa.string()), ("image", image), ("conversations", pa.list_(turn))])
    jpegs = small_jpegs(distinct)
    expected = {"missing_image": 0, "empty_conversation": 0, "media_corrupt": 0}
    is_parquet = path.suffix == ".parquet"
    with pq.ParquetWriter(str(path), schema) if is_parquet else _ArrowFolder(path, schema) as w:
        for start in range(0, rows, row_group_size):
            batch = []
            for i in range(start, min(rows, start + row_group_size)):
                tag = f"row {i}".encode()
                data = jpegs[i % distinct]
                data = data[:2] + b"\xff\xfe" + (len(tag) + 2).to_bytes(2, "big") + tag + data[2:]  # JPEG COM segment
                img = {"bytes": data, "path": f"img{i}.jpg"}
                conv = [
                    {"from": "human", "value": f"<image>\nWhat colour is the ellipse in picture {i}?"},
                    {"from": "gpt", "value": f"It is colour number {i % distinct}."},
                ]
                if i % 1000 == 999:
                    img, expected["missing_image"] = None, expected["missing_image"] + 1
                elif i % 997 == 996:
                    conv, expected["empty_conversation"] = [], expected["empty_conversation"] + 1
                elif i % 991 == 990:
                    img = {"bytes": img["bytes"][:100], "path": None}
                    expected["media_corrupt"] += 1
                batch.append({"id": f"row{i}", "image": img, "conversations": conv})
            w.write_table(pa.Table.from_pylist(batch, schema=schema), row_group_size=row_group_size)
    return expected


def child(args: list[str], code: str = _CHILD) -> dict:
    r = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True)
    if r.returncode:
        sys.exit(f"converter child failed ({r.returncode}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--row-group-size", type=int, default=1000, help="Parquet row group / Arrow record batch rows")
    ap.add_argument("--format", choices=("parquet", "arrow"), default="parquet", help="arrow: a save_to_disk folder")
    ap.add_argument("--distinct-images", type=int, default=500)
    ap.add_argument("--maxcount", type=int, default=1000, help="rows per shard")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="rows read at a time")
    ap.add_argument("--work-dir", default=None, help="keep the input and shards here (default: a temp folder)")
    args = ap.parse_args()

    tmp = None
    if args.work_dir:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory()
        work = Path(tmp.name)
    src = work / (f"rows{args.rows}_rg{args.row_group_size}" + (".parquet" if args.format == "parquet" else "_arrow"))
    t0 = time.perf_counter()
    gen = child(
        [str(src), str(args.rows), str(args.row_group_size), str(args.distinct_images)],
        "import json, pathlib, resource, sys; sys.path.insert(0, 'bench'); from parquet_memory import write_input; "
        "e = write_input(pathlib.Path(sys.argv[1]), *map(int, sys.argv[2:])); "
        "print(json.dumps({'expected': e, 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))",
    )
    expected, gen_rss = gen["expected"], gen["rss"]
    gen_s = time.perf_counter() - t0

    size = sum(f.stat().st_size for f in ([src] if src.is_file() else src.iterdir()))
    floor = child(["--import-only"])
    res = child([str(src), str(work / "shards"), str(args.maxcount), str(args.workers), str(args.batch_size)])
    info = res["info"]
    conv_s = info["run"]["seconds"]
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"input: {args.rows} rows, {size / 1e6:.1f} MB {args.format}, row groups / record batches of {args.row_group_size} "
        f"(written in {gen_s:.1f} s, generator peak RSS {gen_rss:.0f} MB)"
    )
    print(
        f"convert: workers={args.workers} maxcount={args.maxcount} batch_size={args.batch_size}: "
        f"{info['samples']} samples of {info['records']} rows, {info['images']} images, "
        f"{info['bytes'] / 1e6:.1f} MB of shards in {conv_s:.1f} s = {info['records'] / conv_s:.0f} rows/s"
    )
    print(f"skipped: {info['skipped']} (expected {expected})")
    print(
        f"peak RSS: main {res['peak_rss_main_mb']:.0f} MB (after imports {floor['rss_after_import_mb']:.0f} MB: "
        f"+{res['peak_rss_main_mb'] - floor['peak_rss_main_mb']:.0f} MB for the conversion), "
        f"largest writer {res['peak_rss_writer_mb']:.0f} MB (main process VmHWM {res['vmhwm_main_mb']:.0f} MB)"
    )
    if info["skipped"] != {k: v for k, v in expected.items() if v}:
        sys.exit("counts by reason differ from what was generated")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
