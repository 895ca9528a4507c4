"""`python -m fastcls.tools.shard_index SHARDS OUT`: count the samples of tar shards written
elsewhere (brace patterns, `pipe:` URLs) and write a fastcls shard index next to them
(fastcls/data/shards.py describes the layout)."""
from __future__ import annotations

import json
import sys
from typing import Optional

from ..atomic import write_text_atomic
from ..data.shards import FORMAT, INDEX_SUFFIX, ShardSet, expand_urls, scan_shards, shard_name
from ..data.source import DatasetError


def write_index(shards: ShardSet, out: str, source: str = "") -> dict:
    """Write `shards` (e.g. from scan_shards) as a fastcls index at `out`, atomically.
    The shard names are the URLs' file names: the index must sit next to the shards."""
    meta = {"format": FORMAT, "classes": shards.classes, "empty_classes": shards.empty_classes,
            "num_samples": shards.num_samples, "source": source, "skipped": [],
            "shards": [{"name": shard_name(u), "count": int(c),
                        **({"offsets": o.tolist()} if o is not None else {})}
                       for u, c, o in zip(shards.urls, shards.counts, shards.offsets)]}
    write_text_atomic(out, json.dumps(meta))
    return meta


def main(argv: Optional[list[str]] = None) -> int:
    import argparse
    p = argparse.ArgumentParser(
        prog="python -m fastcls.tools.shard_index",
        description="SHARDS OUT: count the samples of tar shards written elsewhere (brace "
                    "patterns, pipe: URLs) and write a fastcls index (OUT must end in "
                    f"{INDEX_SUFFIX} and sit next to the shards: <prefix>{INDEX_SUFFIX} for "
                    "<prefix>-NNNNNN.tar). Classes are named by number unless --classes FILE.")
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "index":
        argv = sys.argv[2:]  # the old spelling: python -m fastcls.data.wds index SHARDS OUT
    p.add_argument("shards", help="brace pattern or URL list of the shards")
    p.add_argument("out", help=f"the index to write (NAME{INDEX_SUFFIX})")
    p.add_argument("--classes", default="", metavar="FILE", help="class names, line i = class i")
    args = p.parse_args(argv)
    try:
        if not args.out.endswith(INDEX_SUFFIX):
            raise DatasetError(f"OUT: the index name must end in {INDEX_SUFFIX}, got {args.out!r}")
        classes = None
        if args.classes:
            from ..data.folder import read_classes
            classes = read_classes(args.classes, "--classes")
        shards = scan_shards(expand_urls(args.shards), "SHARDS", classes)
        if shards.num_samples == 0:
            raise DatasetError(f"SHARDS: {args.shards!r} hold no samples")
        write_index(shards, args.out, args.shards)
    except DatasetError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {len(shards.urls)} shards, {shards.num_samples} samples, "
          f"{len(shards.classes)} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
