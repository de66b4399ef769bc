"""The TensorRT API the code uses exists in both supported majors, checked offline against the binding wheels.

tests/data/tensorrt-<version>-names.txt are the identifier strings of tensorrt-cu12-bindings' compiled module
(tools/scripts/trt_api_names.py); ofbdeploy/deploy/trt_api.py holds every TensorRT call the package makes.
"""

from __future__ import annotations

import ast
import builtins
import re
from pathlib import Path

import pytest

import ofbdeploy
from ofbdeploy.deploy import trt_api

DATA = Path(__file__).parents[1] / "data"
VERSIONS = ("10.11.0.33", "11.4.0.106")
PACKAGE = Path(ofbdeploy.__file__).parent
# What TensorRT 11 removed (deprecated since 10.1 for strongly typed networks and explicit Q/DQ quantisation).
REMOVED_IN_11 = ("int8_calibrator", "set_calibration_profile", "IInt8EntropyCalibrator2", "IInt8MinMaxCalibrator",
                 "IInt8LegacyCalibrator", "IInt8Calibrator")


def binding_names(version: str) -> set[str]:
    lines = (DATA / f"tensorrt-{version}-names.txt").read_text().splitlines()
    assert lines[0].startswith(f"# tensorrt-cu12-bindings=={version} ")
    return set(lines[1:])


def defined(name: str, names: set[str]) -> bool:
    """Present as a string of its own, or as the tail of a longer identifier (the linker merges such tails)."""
    return name in names or any(other.endswith(name) for other in names)


def used_names(source: str) -> set[str]:
    """Attribute names and keyword names the module uses on TensorRT objects.

    Names rooted at something the module imports (importlib, OfbError, ...), at a builtin (``str(...).split``) or at
    a literal are not TensorRT's; ``self.<field>``
    is the module's own field (what is reached through it is TensorRT's); dunders are Python's protocol.
    """
    tree = ast.parse(source)
    imported = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import | ast.ImportFrom) for alias in node.names}
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):  # every level of a chain is visited on its own
            base = node.value
            while isinstance(base, ast.Attribute | ast.Call | ast.Subscript):
                base = base.func if isinstance(base, ast.Call) else base.value
            own_field = isinstance(node.value, ast.Name) and node.value.id == "self"
            foreign = not isinstance(base, ast.Name) or base.id in imported or hasattr(builtins, base.id)
            if not (foreign or own_field):
                names.add(node.attr)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            names.update(k.arg for k in node.keywords if k.arg)
    return {n for n in names if not (n.startswith("__") and n.endswith("__"))}


def test_name_lists_tell_the_majors_apart() -> None:
    """The lists are what they claim: 10.11 still has the implicit-int8 API, 11.4 has none of it; both have the
    strongly typed API."""
    v10, v11 = binding_names("10.11.0.33"), binding_names("11.4.0.106")
    for name in REMOVED_IN_11:
        assert defined(name, v10) and not defined(name, v11), name
    assert "FP16" in v10 and not defined("FP16", v11)  # BuilderFlag.FP16 is gone (HALF names the fp16 type)
    for name in ("STRONGLY_TYPED", "execute_async_v3", "deserialize_cuda_engine", "TF32", "HALF"):
        assert defined(name, v10) and defined(name, v11), name


def test_used_names_are_collected_from_the_code() -> None:
    used = used_names(Path(trt_api.__file__).read_text())
    assert {"STRONGLY_TYPED", "build_serialized_network", "execute_async_v3", "set_tensor_address",
            "get_tensor_profile_shape", "ignore_mismatch", "TF32"} <= used
    assert not {"input", "output", "dtypes", "_context", "import_module", "__version__"} & used
    # a name the module does not have would be found
    assert "made_up" in used_names("def f(trt):\n    trt.Builder(x).made_up(ignore=1)\n")


@pytest.mark.parametrize("version", VERSIONS)
def test_every_tensorrt_name_the_code_uses_exists(version: str) -> None:
    names = binding_names(version)
    missing = sorted(n for n in used_names(Path(trt_api.__file__).read_text()) if not defined(n, names))
    assert not missing, f"not in tensorrt-cu12-bindings {version}: {missing}"


def test_tensorrt_is_only_used_through_trt_api() -> None:
    """Every other module goes through trt_api, so the check above covers the whole package."""
    pattern = re.compile(r"import tensorrt\b|import_module\(\"tensorrt\"\)|from tensorrt\b")
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text()))
    assert users == ["deploy/trt_api.py"]


def test_no_removed_api_anywhere() -> None:
    """No module names the weakly typed or implicit-int8 API, even in a path the name check does not reach."""
    pattern = re.compile(r"BuilderFlag\.(FP16|INT8|BF16|FP8)|" + "|".join(REMOVED_IN_11))
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if p.name != "trt_api.py" and pattern.search(p.read_text())]
    code = Path(trt_api.__file__).read_text()
    body = code.split('"""', 2)[2]  # the module docstring names the removed API on purpose
    assert not offenders and not pattern.search(body)
