"""The layering of DESIGN.md ("Layers"), read from the sources with ``ast`` (nothing is imported).

- ``kernels/`` (installed as ``cpattn.kernels``) imports nothing of ``cpattn`` outside
  ``cpattn.kernels``: the API layer sits on the kernels, never the other way round.
- The installed packages (``cpattn/``, ``kernels/``) import nothing that lives only in the
  repository (``tests/``, ``bench/``), and no ahead-of-time compile machinery of Triton:
  the compile gate's tool is ``bench/aot.py``.
- Every ``cpattn`` module and name that tests, benchmarks, examples or the packages themselves
  import, or reach as ``cpattn.<module>.<name>``, exists, so a module moved out of the package
  (e.g. ``cpattn.kernels.aot``) or a function renamed leaves no user behind.
- No file reaches a private module or name (``_x``) of a cpattn package it is not part of, by
  import or as an attribute: tests and benchmarks use public names too.
Every import counts, also one inside a function (a lazy import is still a dependency).
"""
import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"cpattn": ROOT / "cpattn", "cpattn.kernels": ROOT / "kernels"}  # setup.py's package_dir
# Modules found only because a test or a script puts its own folder on sys.path.
REPOSITORY_ONLY = {p.stem for folder in ("tests", "bench") for p in (ROOT / folder).rglob("*.py")} | {"tests", "bench"}
COMPILE_TOOLING = ("triton.compiler", "triton.backends")


def _module_name(path):
    """The dotted name ``path`` is installed under (None for files outside the packages)."""
    for package, folder in sorted(PACKAGES.items(), key=lambda item: -len(str(item[1]))):
        if path.is_relative_to(folder):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    return None


@functools.lru_cache(maxsize=None)
def _tree(path):
    return ast.parse(path.read_text(), str(path))


def imports(path):
    """(line, module, name) of every import in ``path``: ``import a.b`` gives (line, "a.b", None),
    ``from a import b`` (line, "a", "b"), b a module or a name in it; relative imports are
    resolved against the file's package."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else (module.rpartition(".")[0] if module else None)
    found = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                assert node.level <= len(parts), f"{path}:{node.lineno}: relative import above the package"
                anchor = ".".join(parts[:len(parts) - (node.level - 1)])
                base = f"{anchor}.{base}" if base else anchor
            found += [(node.lineno, base, alias.name) for alias in node.names]
    return found


def _sources(*folders):
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py") if "egg-info" not in str(p))


def _file(module):
    """The source file of cpattn module ``module`` (its __init__.py for a package), or None."""
    for package, folder in PACKAGES.items():
        if module == package or module.startswith(package + "."):
            rest = Path(folder, *module[len(package) + 1:].split(".")) if module != package else Path(folder)
            for candidate in (rest.with_suffix(".py"), rest / "__init__.py"):
                if candidate.is_file():
                    return candidate
    return None


def _binds(path, name):
    """Whether the source ``path`` binds ``name`` anywhere (def, class, assignment, import)."""
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store) and node.id == name:
            return True
        if isinstance(node, (ast.Import, ast.ImportFrom)) and any(
                (alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
            return True
    return False


def _exists(module, name=None):
    """Whether cpattn module ``module`` exists and (``name`` given) has ``name``: a submodule of that
    name, or a name its source binds."""
    source = _file(module)
    if source is None:
        return False
    return name is None or name == "*" or _file(f"{module}.{name}") is not None or _binds(source, name)


def _is_cpattn(module):
    return module == "cpattn" or module.startswith("cpattn.")


def dotted_uses(path):
    """(line, module, name) of every ``cpattn.a.b...`` attribute chain in ``path``: the longest prefix
    that names a module, and the name looked up in it."""
    found = []
    for node in ast.walk(_tree(path)):
        if not isinstance(node, ast.Attribute):
            continue
        parts, inner = [], node
        while isinstance(inner, ast.Attribute):
            parts.insert(0, inner.attr)
            inner = inner.value
        if not (isinstance(inner, ast.Name) and inner.id == "cpattn"):
            continue
        module = "cpattn"
        for part in parts:
            if _file(f"{module}.{part}") is None:
                found.append((node.lineno, module, part))
                break
            module = f"{module}.{part}"
    return found


def _violations(paths, bad):
    return [f"{p.relative_to(ROOT)}:{line}: {module}{'' if name is None else ' -> ' + name}"
            for p in paths for line, module, name in imports(p) if bad(module, name)]


def test_kernels_import_nothing_of_cpattn_outside_cpattn_kernels():
    def api_layer(module, name):
        full = module if name is None else f"{module}.{name}"
        return _is_cpattn(full) and not (full == "cpattn.kernels" or full.startswith("cpattn.kernels."))
    assert _violations(_sources("kernels"), api_layer) == []


def test_installed_packages_import_no_repository_only_module_and_no_compile_tooling():
    def outside(module, name):
        return module.split(".")[0] in REPOSITORY_ONLY or module.startswith(COMPILE_TOOLING)
    assert _violations(_sources("cpattn", "kernels"), outside) == []


def test_every_imported_cpattn_module_and_name_exists():
    def missing(module, name):
        return _is_cpattn(module) and not _exists(module, name)
    assert _violations(_sources("cpattn", "kernels", "tests", "bench"), missing) == []


def test_every_cpattn_module_and_name_reached_by_attribute_exists():
    paths = _sources("cpattn", "kernels", "tests", "bench")
    unknown = [f"{p.relative_to(ROOT)}:{line}: {module}.{name}" for p in paths for line, module, name in dotted_uses(p)
               if not _exists(module, name)]
    assert unknown == []


@pytest.mark.parametrize("module,name,expected", [
    ("cpattn.kernels.mask", "MaskSpec", True), ("cpattn.kernels", "aot", False), ("cpattn.kernels", "MaskSpec", True),
    ("cpattn.kernels.mask", "no_such_name", False), ("cpattn.checks", None, True), ("cpattn.examples", "demo", True)])
def test_the_existence_check_itself(module, name, expected):
    assert _exists(module, name) == expected


def _private(part):
    return part.startswith("_") and not part.startswith("__")


def _module_aliases(path):
    """{local name: cpattn module} for every name ``path`` binds to a cpattn module by an import."""
    aliases = {}
    for line, module, name in imports(path):
        if not _is_cpattn(module):
            continue
        if name is None:  # import cpattn.a.b [as x]: without "as" the name is cpattn itself
            node = next(n for n in ast.walk(_tree(path)) if getattr(n, "lineno", None) == line
                        and isinstance(n, ast.Import))
            for alias in node.names:
                if alias.name == module:
                    aliases[alias.asname or "cpattn"] = module if alias.asname else "cpattn"
        elif _file(f"{module}.{name}") is not None:
            node = next(n for n in ast.walk(_tree(path)) if getattr(n, "lineno", None) == line
                        and isinstance(n, ast.ImportFrom))
            for alias in node.names:
                if alias.name == name:
                    aliases[alias.asname or name] = f"{module}.{name}"
    return aliases


def private_uses(path):
    """(line, owner, private part) of every private module or name of cpattn that ``path`` reaches (by
    import, or as an attribute of a cpattn module) from outside the package that owns it; ``owner``
    is the module the private part belongs to."""
    module = _module_name(path)
    package = (module if path.name == "__init__.py" else module.rpartition(".")[0]) if module else None
    found = []

    def check(line, dotted):
        parts = dotted.split(".")
        for i, part in enumerate(parts):
            if _private(part):
                owner = ".".join(parts[:i])
                owner_package = owner if _file(f"{owner}.{part}") is not None else owner.rpartition(".")[0]
                if _file(owner) is not None and _file(owner).name == "__init__.py":
                    owner_package = owner
                if package != owner_package:
                    found.append((line, owner, part))
                return
    for line, imported, name in imports(path):
        if _is_cpattn(imported):
            check(line, imported if name is None else f"{imported}.{name}")
    aliases = _module_aliases(path)
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases:
            check(node.lineno, f"{aliases[node.value.id]}.{node.attr}")
    for line, owner, name in dotted_uses(path):
        check(line, f"{owner}.{name}")
    return sorted(set(found))  # an attribute chain is seen once per link


def test_no_file_reaches_a_private_member_of_another_package():
    # DESIGN.md: a module uses another's public names only. Tests, benchmarks and examples included:
    # what they need is public (kernels/autotune.py, kernels/launcher.py, cpattn/ops.py, ...).
    found = [f"{p.relative_to(ROOT)}:{line}: {owner} -> {part}"
             for p in _sources("cpattn", "kernels", "tests", "bench") for line, owner, part in private_uses(p)]
    assert found == []


@pytest.mark.parametrize("source,expected", [
    ("from cpattn.kernels import _autotune\n", [(1, "cpattn.kernels", "_autotune")]),
    ("import cpattn.inference as inference\ninference._attend = None\n", [(2, "cpattn.inference", "_attend")]),
    ("import cpattn\ncpattn.attention._warned.clear()\n", [(2, "cpattn.attention", "_warned")]),
    ("from cpattn.ops import kernel_dtype\nfrom cpattn import ring\nring.plan_step\n", []),
])
def test_private_uses_finds_planted_ones(tmp_path, source, expected):
    path = tmp_path / "planted.py"
    path.write_text(source)
    assert private_uses(path) == expected
