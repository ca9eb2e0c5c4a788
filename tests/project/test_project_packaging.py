"""The repository's top-level folders never shadow installed packages.

``kernels/`` is installed as ``cpattn.kernels``; when the repository root is on
``sys.path`` (``python -m ...`` or a script run from the root) Python also finds it
as the top-level name ``kernels``, which belongs to Hugging Face's ``kernels``
(a dependency of transformers). These run Python from the repository root, as a
user would, in a fresh interpreter.
"""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _from_root(code):
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)


def _installed(name):
    try:
        importlib.metadata.distribution(name)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_import_kernels_from_the_root_is_the_installed_package_or_none():
    result = _from_root("import kernels, sys; print(kernels.__file__); print(sys.modules['kernels'] is kernels)")
    if _installed("kernels"):  # CI's newest leg: transformers >= 5.25 depends on it
        assert result.returncode == 0, result.stderr
        path, same = result.stdout.split()
        assert not Path(path).resolve().is_relative_to(ROOT) and same == "True"
    else:
        assert result.returncode != 0 and "cpattn.kernels" in result.stderr


def test_cpattn_kernels_is_the_repository_folder_from_the_root():
    result = _from_root("import cpattn.kernels as k; print(k.__file__); print(k.attention_forward.__module__)")
    assert result.returncode == 0, result.stderr
    path, module = result.stdout.split()
    assert Path(path).resolve() == ROOT / "kernels" / "__init__.py" and module == "cpattn.kernels.flash_fwd"


@pytest.mark.skipif(not _installed("transformers"), reason="transformers is an optional extra")
def test_transformers_imports_from_the_root_beside_cpattn():
    # transformers' hub-kernels integration imports Hugging Face's kernels when it is installed.
    result = _from_root("import cpattn, transformers\n"
                        "from transformers.integrations import hub_kernels\n"
                        "from cpattn.integrations import transformers as cpattn_hf\n"
                        "print('ok', transformers.__version__)")
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr


def test_public_surface():
    """``cpattn.__all__`` holds the API; test harnesses and reports stay in their modules."""
    import cpattn
    from cpattn.layout import StripeLayout  # noqa: F401
    from cpattn.work_report import context_parallel_work  # noqa: F401
    from cpattn.ring import simulate_ring_attention, simulate_ring_attention_backward  # noqa: F401
    for name in ("simulate_ring_attention", "simulate_ring_attention_backward", "context_parallel_work"):
        assert name not in cpattn.__all__ and not hasattr(cpattn, name)
    assert all(hasattr(cpattn, name) for name in cpattn.__all__)
    assert cpattn.add_context_parallel_args.__module__ == "cpattn.mindspeed"
    assert callable(cpattn.ContextParallel.from_config) and callable(cpattn.ContextParallel.from_args)
