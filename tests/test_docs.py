"""The documentation: the configuration table is the schema's, nothing points outside the
repository, and every relative link between the pages resolves."""
import re
import subprocess

from conftest import PY, ROOT, run_env

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_configuration_page_is_generated_from_the_schema():
    proc = subprocess.run([PY, "docs/config_table.py", "--check"], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    page = (ROOT / "docs" / "configuration.md").read_text()
    for key in ("`data.backend`", "`data.rrc.scale`", "`augment.mixup.mode`", "`train.slurm_requeue`"):
        assert key in page


def test_config_table_detects_a_stale_page(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "docs" / "config_table.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    page = (ROOT / "docs" / "configuration.md").read_text()
    stale = page.replace("| `data.hflip` | `0.5` |", "| `data.hflip` | `0.4` |")
    assert stale != page and mod.render(stale) == page


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:  # not a git checkout: the docs and code folders
        tracked = [str(p.relative_to(ROOT)) for d in ("docs", "fastcls", "pipelines", "benchmarks", "cluster")
                   for p in (ROOT / d).rglob("*") if p.is_file()] + ["README.md"]
    pattern = re.compile(r"DESIGN\.md|TRICKS\.md|STYLE\.md|device/README|\.\./shared|\bissues? \d")
    hits = []
    for name in tracked:
        p = ROOT / name
        if p.suffix in (".json", ".png") or not p.is_file() or p.name == "test_docs.py":
            continue
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{name}:{i}: {line.strip()}")
    assert hits == []


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+://", target):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert broken == []


def test_readme_is_the_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert 100 <= len(lines) <= 220
    text = "\n".join(lines)
    for page in ("configuration", "data", "augment", "recipes", "cluster", "benchmarks", "design",
                 "development"):
        assert f"docs/{page}.md" in text
    # the layout line lists the package as it is
    pkg = sorted(p.name for p in (ROOT / "fastcls").iterdir()
                 if p.suffix == ".py" and p.name not in ("__init__.py", "__main__.py"))
    missing = [n for n in pkg if f"`{n}`" not in text]
    assert missing == [], missing
