"""What ``cpattn.integrations.transformers`` says when it cannot use transformers.

A missing or too old transformers gets "needs transformers 5" (install it); a
transformers that is installed but fails to import (a broken dependency) gets
an error saying so, chained to the original one, since installing transformers
again would not help. Simulated in-process with fake ``transformers`` packages;
nothing is uninstalled, and the real modules are back after each test.
"""
import sys

import pytest

import cpattn.integrations.transformers as cpattn_hf


@pytest.fixture
def fake_transformers(tmp_path, monkeypatch):
    """install(source): ``import transformers`` runs ``source`` as the package's __init__."""
    for name in [n for n in sys.modules if n.split(".")[0] == "transformers"]:
        monkeypatch.delitem(sys.modules, name)  # restored after the test

    def install(source):
        (tmp_path / "transformers").mkdir()
        (tmp_path / "transformers" / "__init__.py").write_text(source)
        monkeypatch.syspath_prepend(str(tmp_path))

    yield install
    for name in [n for n in sys.modules if n.split(".")[0] == "transformers"]:
        del sys.modules[name]  # the fake (before monkeypatch puts the real modules back)


def test_a_missing_transformers_needs_transformers_5(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what import sees when it is not installed
    with pytest.raises(ImportError, match=r"needs transformers 5 \(pip install 'cpattn\[transformers\]'\)$") as info:
        cpattn_hf.register()
    assert isinstance(info.value.__cause__, ModuleNotFoundError) and info.value.__cause__.name == "transformers"


def test_an_old_transformers_needs_transformers_5(fake_transformers):
    fake_transformers("__version__ = '4.57.1'\n")
    with pytest.raises(ImportError, match="needs transformers 5.*found transformers 4.57.1"):
        cpattn_hf.register()


@pytest.mark.parametrize("source, cause, says", [
    ("import cpattn_test_missing_dependency\n", ModuleNotFoundError, "No module named 'cpattn_test_missing_dependency'"),
    ("raise RuntimeError('numpy.dtype size changed, may indicate binary incompatibility')\n", RuntimeError,
     "RuntimeError: numpy.dtype size changed"),
], ids=["missing dependency", "binary incompatibility"])
def test_a_transformers_that_fails_to_import_says_so(fake_transformers, source, cause, says):
    fake_transformers(source)
    with pytest.raises(ImportError, match="transformers is installed but failed to import") as info:
        cpattn_hf.register()
    assert says in str(info.value) and "needs transformers 5" not in str(info.value)
    assert type(info.value.__cause__) is cause and says.split(": ")[-1] in str(info.value.__cause__)


def test_a_transformers_5_without_its_interfaces_says_what_failed(fake_transformers):
    fake_transformers("__version__ = '5.25.0'\n")
    with pytest.raises(ImportError, match="transformers 5.25.0 failed to import its attention interfaces: "
                                          "ImportError: cannot import name 'AttentionInterface'") as info:
        cpattn_hf.register()
    assert "needs transformers 5" not in str(info.value) and isinstance(info.value.__cause__, ImportError)
