"""The key table of docs/configuration.md, generated from the schema in fastcls/config.py.

    python docs/config_table.py            # print the tables
    python docs/config_table.py --write    # rewrite them in docs/configuration.md
    python docs/config_table.py --check    # exit 1 when the page differs (tests run this)

One table per section (`model`, `data`, `data.rrc`, ...), one row per field: the dotted key,
the default, the valid values (a `Literal`'s names, or the range on the field) and the
field's help text. The section's docstring introduces its table.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fastcls.config import Config  # noqa: E402
from fastcls.schema import choices, range_text  # noqa: E402

PAGE = ROOT / "docs" / "configuration.md"
BEGIN = "<!-- docs/config_table.py: begin (generated from fastcls/config.py, do not edit) -->"
END = "<!-- docs/config_table.py: end -->"


def _value(v) -> str:
    """A default as YAML would spell it."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, str):
        return f'"{v}"' if v == "" else v
    return str(v)


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        return _type_name(next(a for a in args if a is not type(None))) + " or null"
    if origin in (tuple, list):
        inner = _type_name(args[0])
        return f"[{inner}, {inner}]" if origin is tuple else f"list of {inner}"
    return {bool: "true/false", int: "integer", float: "number", str: "string"}.get(tp, str(tp))


def _values(tp, meta) -> str:
    names = choices(tp)
    if names is not None:
        return " \\| ".join(f"`{n}`" for n in names)
    kind = _type_name(tp)
    if "gt" not in meta:
        return kind
    pair = typing.get_origin(tp) is tuple and bool(meta.get("ordered"))
    rng = range_text(meta, pair=pair)
    if typing.get_origin(tp) is list:
        rng = ("non-empty, " if meta.get("nonempty") else "") + (f"each {rng}" if rng else "") + \
            (", increasing" if meta.get("ordered") else "")
    return f"{kind}, {rng}" if rng else kind


def _cell(text: str) -> str:
    """Help text inside a table cell: `|` and `<` escaped (GitHub would read <name> as HTML)."""
    return text.replace("|", "\\|").replace("<", "\\<")


def tables() -> str:
    """The generated Markdown: one table per section, in schema order."""
    out: list[str] = []

    def section(cls, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        rows, subs = [], []
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                subs.append((tp, f"{prefix}{f.name}."))
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            rows.append(f"| `{prefix}{f.name}` | `{_value(default)}` | {_values(tp, f.metadata)} | "
                        f"{_cell(f.metadata.get('help', ''))} |")
        if not prefix:  # the top level's own keys after its sections
            for tp, sub in subs:
                section(tp, sub)
            subs = []
        if rows:
            title = prefix.rstrip(".") or "top level"
            doc = (cls.__doc__ or "").strip()
            out.append(f"### `{title}`\n")
            if doc and not doc.startswith(cls.__name__ + "("):  # not dataclass's generated one
                out.append(" ".join(doc.split()) + "\n")
            out.append("| key | default | values | meaning |\n|---|---|---|---|")
            out.extend(rows)
            out.append("")
        for tp, sub in subs:
            section(tp, sub)

    section(Config, "")
    return "\n".join(out).rstrip() + "\n"


def render(page: str) -> str:
    """`page` with the text between the markers replaced by the generated tables."""
    if BEGIN not in page or END not in page:
        raise SystemExit(f"{PAGE}: markers {BEGIN!r} / {END!r} not found")
    head, rest = page.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{tables()}\n{END}{tail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python docs/config_table.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--write", action="store_true", help=f"rewrite the tables in {PAGE.name}")
    g.add_argument("--check", action="store_true", help=f"exit 1 when {PAGE.name} differs")
    args = p.parse_args(argv)
    if not (args.write or args.check):
        sys.stdout.write(tables())
        return 0
    page = PAGE.read_text()
    new = render(page)
    if args.write:
        PAGE.write_text(new)
        print(f"wrote {PAGE}")
    elif new != page:
        print(f"{PAGE} differs from the schema: run python docs/config_table.py --write",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
