"""A failed load of the CUDA extension names its real cause, and a build that appears later in
the same process is picked up (nothing is cached from the failure)."""
import sys
import sysconfig

import pytest

from jax_tokenweave.collective import extension


@pytest.fixture
def fake_ext(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_tw_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(extension, "MODULE", "fake_tw_pkg._C")
    monkeypatch.setattr(extension, "_PKG_DIR", str(pkg))
    monkeypatch.setattr(extension, "_C", None)
    yield pkg
    sys.modules.pop("fake_tw_pkg._C", None)
    sys.modules.pop("fake_tw_pkg", None)


def test_not_built_says_so_and_a_later_build_is_picked_up(fake_ext):
    with pytest.raises(RuntimeError, match=r"it is not built: no .*_C.*build_ext --inplace"):
        extension.extension()
    assert not extension.available()
    (fake_ext / "_C.py").write_text("MAX_RANKS = 8\n")   # stands in for the freshly built module
    assert extension.available()
    assert extension.extension().MAX_RANKS == 8


def test_built_for_another_python(fake_ext):
    (fake_ext / "_C.cpython-39-x86_64-linux-gnu.so").write_bytes(b"\x7fELF")
    with pytest.raises(RuntimeError, match=r"built for another Python: found _C\.cpython-39"):
        extension.extension()


def test_loader_error_is_passed_on(fake_ext):
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    (fake_ext / f"_C{suffix}").write_bytes(b"not an ELF file at all")
    with pytest.raises(RuntimeError, match=r"loading .*_C.* failed: .*(ELF|invalid|short)"):
        extension.extension()
