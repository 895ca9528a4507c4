"""The performance tables of docs/benchmarks.md, generated from the committed JSON in
benchmarks/results/.

    python benchmarks/table.py                 # print the tables
    python benchmarks/table.py --write         # put them into docs/benchmarks.md (between the markers)
    python benchmarks/table.py --check         # exit 1 if docs/benchmarks.md differs (a test runs this)
    python benchmarks/table.py --add bench_out/*.json --write   # file new results, regenerate

Every number docs/benchmarks.md shows is a row of a JSON file in results/ (written by loader.py or
train.py), named DATE_DEVICE_BENCHMARK_TAG.json, so the table cannot drift from the
measurements. Rows are sorted by file name, i.e. by date, then device.
"""
from __future__ import annotations

import argparse
import difflib
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
PAGE = HERE.parent / "docs" / "benchmarks.md"
BEGIN = "<!-- benchmarks/table.py: begin (generated from benchmarks/results/, do not edit) -->"
END = "<!-- benchmarks/table.py: end -->"


def device_of(r: dict) -> str:
    """The device name; results written before benchmarks/common.py only have gpu/host_cpu."""
    m = r["machine"]
    return m.get("device_name") or m.get("gpu") or f"CPU: {m.get('host_cpu', '?')}"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def canonical_name(r: dict) -> str:
    """DATE_DEVICE_BENCHMARK_TAG.json for a result dict of loader.py or train.py."""
    date = r["time"][:10]
    dev = slug(device_of(r))
    s = r["settings"]
    if r["benchmark"] == "loader":
        tag = f"{s['image_size']}px_{slug(data_name(r).split(',')[0])}"
        backends = str(s.get("backends") or "").split(",")
        for copy in ("shards", "parquet"):  # folder vs its tar-shard / Parquet copies
            if copy in backends:
                tag += f"_{copy}"
    elif r["benchmark"] == "train":
        tag = (f"{s['model']}_{s['image_size']}px_bs{s['batch_size']}_"
               f"{'compiled' if s['compile'] else 'eager'}_{s['backend']}")
    else:
        raise ValueError(f"unknown benchmark {r.get('benchmark')!r}")
    return f"{date}_{dev}_{r['benchmark']}_{tag}.json"


def load_results(folder: Path = RESULTS) -> list[tuple[str, dict]]:
    out = []
    for p in sorted(folder.glob("*.json")):
        r = json.loads(p.read_text())
        if r.get("benchmark") not in ("loader", "train"):
            raise ValueError(f"{p}: not a loader.py/train.py result (benchmark={r.get('benchmark')!r})")
        out.append((p.name, r))
    return out


def machine(r: dict) -> str:
    m = r["machine"]
    if m["device"].startswith("cuda") and m.get("cpu_cores"):
        return f"{device_of(r)} ({m['cpu_cores']} CPU cores)"
    return device_of(r)


def data_name(r: dict) -> str:
    d = r.get("dataset") or {"name": Path(r.get("folder", "?")).name}
    kb = f", {d['avg_kbytes']:.0f} KB" if d.get("avg_kbytes") is not None else ""
    return f"{d.get('name', '?')}{kb}"


def num(x) -> str:
    return "-" if x is None else f"{x:,.0f}"


def render(results: list[tuple[str, dict]]) -> str:
    loader = [(f, r) for f, r in results if r["benchmark"] == "loader"]
    train = [(f, r) for f, r in results if r["benchmark"] == "train"]
    lines = [BEGIN, ""]
    notes = []

    def note(f: str, r: dict) -> str:
        """A footnote mark for the JSON's free-text note; equal notes share one number."""
        if not r.get("note"):
            return ""
        if r["note"] not in notes:
            notes.append(r["note"])
        return f" [{notes.index(r['note']) + 1}]"

    lines += ["Loader alone (`benchmarks/loader.py`, no model):", "",
              "| date | machine | data | px | batch | workers | backend | img/s | x PIL | JSON |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for f, r in loader:
        s, tag = r["settings"], note(f, r)
        for row in r["results"]:
            if row["backend"] == "synthetic":  # one prebuilt batch re-yielded: no loader to time
                continue
            ratio = "-" if row.get("ratio_vs_pil") is None else f"{row['ratio_vs_pil']:.2f}"
            lines.append(f"| {r['time'][:10]} | {machine(r)}{tag} | {data_name(r)} | "
                         f"{s['image_size']} | {s['batch_size']} | {s['workers']} | "
                         f"{row['backend']} | {num(row['img_per_s'])} | {ratio} | `{f}` |")
    lines += ["", "Training step, real data vs synthetic (`benchmarks/train.py`, same process):", "",
              "| date | machine | model | px | batch | amp | compile | backend | img/s | "
              "synthetic img/s | real / synthetic | data stall % | JSON |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f, r in train:
        s, tag = r["settings"], note(f, r)
        rows = {row["backend"]: row for row in r["results"]}
        real = rows.get(s["backend"])
        synth = rows.get("synthetic")
        ratio = r.get("ratio_real_vs_synthetic")
        lines.append(f"| {r['time'][:10]} | {machine(r)}{tag} | {s['model']} | {s['image_size']} | "
                     f"{s['batch_size']} | {s['amp']} | {'yes' if s['compile'] else 'no'} | "
                     f"{s['backend']} | {num(real and real['img_per_s'])} | "
                     f"{num(synth and synth['img_per_s'])} | "
                     f"{'-' if ratio is None else f'{ratio:.2f}'} | "
                     f"{'-' if real is None else format(real['data_stall_pct'], '.1f')} | `{f}` |")
    if notes:
        marks = [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
        lines += [""] + [m + "  " for m in marks[:-1]] + marks[-1:]  # "  ": markdown line break
    lines += ["", END]
    return "\n".join(lines)


def splice(page: str, table: str) -> str:
    if page.count(BEGIN) != 1 or page.count(END) != 1:
        raise ValueError(f"docs/benchmarks.md must hold the markers once each:\n{BEGIN}\n{END}")
    head, rest = page.split(BEGIN)
    _, tail = rest.split(END)
    return head + table + tail


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--add", nargs="+", metavar="JSON", default=[],
                   help="copy these loader.py/train.py results into results/ under their canonical name")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--write", action="store_true", help="update docs/benchmarks.md")
    mode.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is stale")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--page", default=str(PAGE), help="the page holding the markers")
    args = p.parse_args(argv)
    results_dir = Path(args.results)
    for src in args.add:
        r = json.loads(Path(src).read_text())
        dst = results_dir / canonical_name(r)
        results_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        print(f"added {dst}")
    table = render(load_results(results_dir))
    if not (args.write or args.check):
        print(table)
        return 0
    page = Path(args.page)
    old = page.read_text()
    new = splice(old, table)
    if args.check:
        if new != old:
            sys.stdout.writelines(difflib.unified_diff(old.splitlines(True), new.splitlines(True),
                                                       str(page), "generated"))
            print(f"\n{page} is stale: run python benchmarks/table.py --write", file=sys.stderr)
            return 1
        print(f"{page}: table up to date ({len(load_results(results_dir))} result files)")
        return 0
    page.write_text(new)
    print(f"wrote the table into {page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
