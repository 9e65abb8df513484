"""The package's layering, read from the source: every `instructblip` import goes down (or sideways where allowed),
and the comments cite this repository's docs, not notes outside it.

The layers and their rules are described in docs/architecture.md#subpackages-and-what-each-may-import. Every import
of every module under src/instructblip is checked, module-level and inside functions alike, absolute and relative.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = ROOT / "src" / "instructblip"
PACKAGE = "instructblip"

# The top-level modules and subpackages of `instructblip`, lowest layer first. A module may import its own layer
# and the layers below, within the exceptions that follow.
LAYERS: dict[str, int] = {
    "files": 0, "hub": 0, "progress": 0,
    "models": 1,
    "weights": 2, "processing": 2, "accel": 2,
    "generation": 3,
    "modeling": 4,
    "api": 5, "training": 5, "evaluation": 5, "serving": 5, "batch": 5,
    "cli": 6, "__main__": 6, "__init__": 6,
}
# The applications: on one layer, and they do not import each other (except as ALLOWED says).
APPLICATIONS = ("api", "training", "evaluation", "serving", "batch")
# The package's own __init__ re-exports the public names, so it may import anything.
UNCHECKED = ("__init__",)

# (importing part, imported module or package) -> why the crossing is allowed
ALLOWED: dict[tuple[str, str], str] = {
    ("training", "instructblip.evaluation.metrics"): "validation scores answers with the benchmarks' metrics",
    ("evaluation", "instructblip.api"): "the eval runner loads models through api.load",
    ("serving", "instructblip.api"): "the server loads its model through api.load and decides sampling by the rule "
                                     "`instructblip ask` follows (api.samples)",
    ("batch", "instructblip.api"): "batch inference loads its model through api.load",
    ("__main__", "instructblip.cli"): "`python -m instructblip` exists to run the CLI",
}
# (importing part, imported part) -> why it is forbidden although the layers alone would allow it
FORBIDDEN: dict[tuple[str, str], str] = {
    ("generation", "accel"): "the CPU speed routes are applied to a loaded model from above (accel.optimize); the "
                             "decoding loop stays plain PyTorch",
}


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    statement: str
    rule: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: `{self.statement}`: {self.rule}"


def module_name(path: Path) -> str:
    """`src/instructblip/models/llama.py` -> `instructblip.models.llama`; a package's `__init__.py` -> the package."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def part_of(module: str) -> str:
    """The top-level entry of `LAYERS` a module belongs to: `instructblip.models.llama` -> `models`; the package
    itself (its `__init__`) -> `__init__`."""
    if module == PACKAGE:
        return "__init__"
    return module.split(".")[1]


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: set[str]):
    """(statement text, imported module) for each name an import statement brings in from `instructblip`."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield f"import {alias.name}", alias.name
        return
    if node.level:  # relative: resolved against the importing module's package
        package = module if is_package else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{node.module}" if node.module else package
    else:
        base = node.module or ""
    by_target: dict[str, list[str]] = {}
    for alias in node.names:
        submodule = f"{base}.{alias.name}"
        # `from pkg import sub` imports the module pkg.sub; `from pkg import name` imports pkg itself
        by_target.setdefault(submodule if submodule in known else base, []).append(alias.name)
    for target, names in by_target.items():
        yield f"from {'.' * node.level}{node.module or ''} import {', '.join(names)}", target


def check_source(source: str, module: str, path: str, is_package: bool = False,
                 known: set[str] | None = None) -> list[Violation]:
    """The layering violations of one module's source. `known`: the package's module names (to tell
    `from pkg import submodule` from `from pkg import name`)."""
    known = set(package_modules()) if known is None else known
    importer = part_of(module)
    if importer in UNCHECKED:
        return []
    found = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        for statement, target in _targets(node, module, is_package, known):
            if target != PACKAGE and not target.startswith(PACKAGE + "."):
                continue
            rule = _broken_rule(importer, target)
            if rule:
                found.append(Violation(path, node.lineno, statement, rule))
    return found


def _broken_rule(importer: str, target: str) -> str | None:
    imported = part_of(target)
    for (who, what), _why in ALLOWED.items():
        if who == importer and (target == what or target.startswith(what + ".")):
            return None
    if importer not in LAYERS:
        return f"`{importer}` is not in the layer table (tests/test_layout.py LAYERS): give it a layer"
    if imported not in LAYERS:
        return f"`{imported}` is not in the layer table (tests/test_layout.py LAYERS): give it a layer"
    if imported == "cli" and importer != "cli":
        return "nothing imports cli"
    if (importer, imported) in FORBIDDEN:
        return f"{importer} may not import {imported}: {FORBIDDEN[(importer, imported)]}"
    if LAYERS[imported] > LAYERS[importer]:
        where = "the package's __init__" if imported == "__init__" else imported
        return (f"upward import: {importer} (layer {LAYERS[importer]}) may not import {where} "
                f"(layer {LAYERS[imported]})")
    if importer in APPLICATIONS and imported in APPLICATIONS and importer != imported:
        return f"applications do not import each other: {importer} may not import {imported}"
    return None


def test_every_top_level_module_has_a_layer():
    parts = {part_of(m) for m in package_modules()}
    assert parts <= set(LAYERS), f"not in LAYERS: {sorted(parts - set(LAYERS))}; give each a layer in this file"


def test_no_module_imports_upward():
    modules = package_modules()
    known = set(modules)
    violations = []
    for module, path in modules.items():
        violations += check_source(path.read_text(encoding="utf-8"), module, str(path.relative_to(ROOT)),
                                   is_package=path.name == "__init__.py", known=known)
    assert not violations, f"{len(violations)} import(s) against the layering:\n" + "\n".join(map(str, violations))


# ---- the checker itself, on synthetic sources ----


@pytest.mark.parametrize("module,is_package,source,line,rule", [
    ("instructblip.models.vision", False, "from instructblip.generation.decode import generate", 1,
     "upward import: models (layer 1) may not import generation (layer 3)"),
    ("instructblip.models.vision", False, "import torch\n\ndef f():\n    from instructblip.modeling import X\n", 4,
     "upward import: models (layer 1) may not import modeling (layer 4)"),
    ("instructblip.models.llama", False, "from ..api import load", 1,
     "upward import: models (layer 1) may not import api (layer 5)"),
    ("instructblip.models", True, "from ..serving import app", 1,
     "upward import: models (layer 1) may not import serving (layer 5)"),
    ("instructblip.models.t5", False, "from .. import accel", 1,
     "upward import: models (layer 1) may not import accel (layer 2)"),
    ("instructblip.models.t5", False, "import instructblip", 1,
     "upward import: models (layer 1) may not import the package's __init__ (layer 6)"),
    ("instructblip.models.t5", False, "from instructblip import InstructBlipConfig", 1,
     "upward import: models (layer 1) may not import the package's __init__ (layer 6)"),
    ("instructblip.api", False, "import instructblip.cli", 1, "nothing imports cli"),
    ("instructblip.training.train", False, "from instructblip.serving.app import serve", 1,
     "applications do not import each other: training may not import serving"),
    ("instructblip.training.train", False, "from instructblip.evaluation.runner import evaluate", 1,
     "applications do not import each other: training may not import evaluation"),
    ("instructblip.api", False, "from instructblip.evaluation import metrics", 1,
     "applications do not import each other: api may not import evaluation"),
    ("instructblip.generation.decode", False, "from instructblip.accel.cpu_linear import pack_for_decoding", 1,
     "generation may not import accel"),
    ("instructblip.hub", False, "from instructblip.files import read_json\nfrom instructblip.models import config", 2,
     "upward import: hub (layer 0) may not import models (layer 1)"),
])
def test_checker_flags(module, is_package, source, line, rule):
    """A synthetic upward (or otherwise forbidden) import is flagged once, and the message names the file, the
    line, the import statement and the rule."""
    found = check_source(source, module, "src/x.py", is_package)
    assert len(found) == 1, found
    assert rule in found[0].rule
    statement = source.splitlines()[line - 1].strip()
    assert str(found[0]).startswith(f"src/x.py:{line}: `{statement}`: "), str(found[0])


@pytest.mark.parametrize("module,source", [
    ("instructblip.generation.decode", "from instructblip.models.llama import KVCache"),
    ("instructblip.weights.checkpoint", "from instructblip.accel.cpu_linear import unpack"),  # same layer
    ("instructblip.training.train", "from instructblip.evaluation.metrics import exact_match"),
    ("instructblip.training.train", "from instructblip.evaluation import metrics"),
    ("instructblip.evaluation.runner", "def f():\n    from instructblip.api import load"),
    ("instructblip.serving.app", "from instructblip import api"),
    ("instructblip.evaluation.tasks.vqa", "from .base import Benchmark\nfrom ..metrics import exact_match"),
    ("instructblip.__main__", "from instructblip.cli import main"),
    ("instructblip.cli", "from instructblip.serving.app import serve"),
    ("instructblip", "from instructblip.cli import main"),  # the package's __init__ may import anything
    ("instructblip.models.vision", "import torch\nfrom torch import nn"),
])
def test_checker_allows(module, source):
    assert check_source(source, module, "src/x.py") == []


# ---- citations in comments and docstrings ----

TEXT_SUFFIXES = {".py", ".md", ".txt", ".yaml", ".yml", ".toml", ".json", ".js", ".html", ".css", ".cfg"}
# notes kept outside this repository: code and docs cite docs/*.md here, or the paper
REFERENCE_NOTE = re.compile(r"\b(?:RECIPE|ARCHITECTURE|PERFORMANCE|EASYVQA)(?:\.md\b|\s*§)|shared/reference")
DOCS_CITATION = re.compile(r"\bdocs/([\w.-]+\.md)(?:#([\w-]+))?")


def _text_files(*folders: str):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*")):
            if (path.is_file() and path.suffix in TEXT_SUFFIXES and path.stat().st_size < 5_000_000
                    and path.resolve() != Path(__file__).resolve()):
                yield path


def _lines(path: Path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return
    yield from enumerate(text.splitlines(), 1)


def test_no_citations_of_notes_outside_the_repository():
    found = [f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
             for path in _text_files("src", "tests", "docs", "benchmarks", "recipes", "configs")
             for n, line in _lines(path) if REFERENCE_NOTE.search(line)]
    assert not found, ("cite docs/*.md (with an anchor) or the paper instead of notes outside the repository:\n"
                       + "\n".join(found))


def heading_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives a Markdown file's headings: lower-cased, punctuation dropped, spaces to hyphens, a
    repeated heading numbered -1, -2, ... Lines inside ``` fences are not headings."""
    anchors: set[str] = set()
    fenced = False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        m = re.match(r"^#{1,6}\s+(.+?)\s*#*\s*$", line)
        if fenced or not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_heading_anchors():
    text = "# Title\n## Generation settings\n```\n# not a heading\n```\n## config.json: quirks\n## Title\n"
    assert heading_anchors(text) == {"title", "generation-settings", "configjson-quirks", "title-1"}


def test_cited_docs_exist():
    """Every `docs/NAME.md` (and `docs/NAME.md#anchor`) cited in the package or the tests exists."""
    missing = []
    for path in _text_files("src", "tests"):
        for n, line in _lines(path):
            for name, anchor in DOCS_CITATION.findall(line):
                doc = ROOT / "docs" / name
                where = f"{path.relative_to(ROOT)}:{n}"
                if not doc.is_file():
                    missing.append(f"{where}: docs/{name} does not exist")
                elif anchor and anchor not in heading_anchors(doc.read_text(encoding="utf-8")):
                    missing.append(f"{where}: docs/{name} has no heading with the anchor #{anchor}")
    assert not missing, "\n".join(missing)
