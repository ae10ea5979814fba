"""The layout of ``kernels/`` (issue 11, docs/ARCHITECTURE.md "Kernels"), checked by parsing the
sources with ``ast`` (nothing is imported, nothing runs on a device):

* a family module (``sliding_window.py``, ``segment.py``, ``lsg.py``) takes its launch plumbing from
  ``kernels/_launch.py`` and its device helpers from ``kernels/_core.py``; from another family it may
  import only that family's public launchers (names in its ``__all__``: a whole pass, e.g. LSG's dense
  path ``sliding_window_fwd``), never a private name;
* the plumbing is defined once, in ``_launch.py``, and no family defines its own copy;
* ``_launch.py`` holds no ``@triton.jit`` code and imports no family.
"""

import ast
import os

import pytest

KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
FAMILIES = ("sliding_window", "segment", "lsg")
SHARED = ("_core", "_launch")

PLUMBING = {
    "INTERPRET_BLOCKS", "INTERPRET_SPLIT_CHUNK", "_meta", "_meta_for", "_split", "_split_for",
    "_strides", "_mask_u8", "_mask_arg", "_global_keys_arg", "_scale_args", "_bwd_common",
    "_dropout_args", "_token_dropout_args", "_seg_dropout_args", "_drop_offset_args", "_drop_cols_arg", "_check_qkv",
    "_configs", "_fwd_configs", "_dkdv_configs", "_tile_cost", "_pruner", "_tuned", "_lsg_tuned",
    "_REG_BUDGET", "_SMEM_BUDGET",
}
"""Names that are plumbing wherever they appear: defined in ``_launch.py`` (``_seg_dropout_args``, the old
name of ``_token_dropout_args``, must not come back anywhere)."""

RENAMED = {"_seg_dropout_args"}


def _tree(module: str) -> ast.Module:
    with open(os.path.join(KERNELS, module + ".py"), encoding="utf-8") as f:
        return ast.parse(f.read(), filename=module + ".py")


def _imports(tree: ast.Module):
    """``(source module, imported name, local name)`` of every ``from .x import ...`` in the module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            for alias in node.names:
                yield node.module, alias.name, alias.asname or alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kernels":
            for alias in node.names:
                yield node.module.split(".", 1)[-1], alias.name, alias.asname or alias.name


def _all(tree: ast.Module) -> set:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def _defined(tree: ast.Module) -> dict:
    """Top-level name -> what defines it: "def", "class" or "assign" (imports excluded)."""
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[node.name] = "def"
        elif isinstance(node, ast.ClassDef):
            out[node.name] = "class"
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if isinstance(t, ast.Name):
                    out[t.id] = "assign"
    return out


def _is_jit(node) -> bool:
    for dec in getattr(node, "decorator_list", []):
        target = dec.func if isinstance(dec, ast.Call) else dec
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def test_the_kernel_modules_are_the_expected_ones():
    found = {f[:-3] for f in os.listdir(KERNELS) if f.endswith(".py") and f != "__init__.py"}
    assert found == set(FAMILIES) | set(SHARED), (
        f"kernels/ holds {sorted(found)}; a new module must be added to FAMILIES or SHARED in this test "
        "and to docs/ARCHITECTURE.md")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_imports_no_plumbing_from_another_family(family):
    tree = _tree(family)
    for source, name, _ in _imports(tree):
        if source in FAMILIES and source != family:
            public = _all(_tree(source))
            assert not name.startswith("_") and name in public and name not in PLUMBING, (
                f"kernels/{family}.py imports {name!r} from kernels/{source}.py: only whole passes (the public "
                f"launchers in its __all__: {sorted(public)}) may cross families; plumbing comes from "
                "kernels/_launch.py")
        if name in PLUMBING and source != "_launch":
            pytest.fail(f"kernels/{family}.py imports the plumbing name {name!r} from {source!r}, "
                        "not from kernels/_launch.py")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_defines_no_plumbing_of_its_own(family):
    defined = _defined(_tree(family))
    copies = {name: how for name, how in defined.items() if name in PLUMBING and how != "assign"}
    assert not copies, f"kernels/{family}.py defines plumbing that belongs in kernels/_launch.py: {copies}"
    # the only plumbing names a family may bind itself: its views of the per-family interpreter knobs
    bound = {name for name, how in defined.items() if name in PLUMBING}
    assert bound <= {"_meta", "_split"}, f"kernels/{family}.py binds {sorted(bound)}"


def test_the_per_family_views_come_from_launch():
    """``_meta = _meta_for(globals())`` (and ``_split = _split_for(globals())``): the shared function,
    reading the family's own ``INTERPRET_BLOCKS`` / ``INTERPRET_SPLIT_CHUNK``."""
    for family in FAMILIES:
        tree = _tree(family)
        for node in tree.body:
            if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] in (["_meta"],
                                                                                                   ["_split"]):
                name = node.targets[0].id
                call = node.value
                assert (isinstance(call, ast.Call) and getattr(call.func, "id", None) == f"{name}_for"
                        and len(call.args) == 1 and getattr(call.args[0].func, "id", None) == "globals"), (
                    f"kernels/{family}.py: {name} must be {name}_for(globals())")


def test_the_plumbing_lives_in_launch():
    tree = _tree("_launch")
    defined = _defined(tree)
    missing = sorted(PLUMBING - RENAMED - set(defined))
    assert not missing, f"kernels/_launch.py does not define {missing}"
    assert not RENAMED & set(defined)
    jit = [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and _is_jit(n)]
    assert not jit, f"kernels/_launch.py is host code only, found @triton.jit {jit}"
    families = {source for source, _, _ in _imports(tree) if source in FAMILIES}
    assert not families, f"kernels/_launch.py imports from the families {sorted(families)}"


@pytest.mark.parametrize("family", FAMILIES)
def test_launchers_are_named_after_their_family(family):
    """``F_fwd`` / ``F_bwd`` in ``kernels/F.py``, public (``__all__``)."""
    tree = _tree(family)
    defined = _defined(tree)
    for name in (f"{family}_fwd", f"{family}_bwd"):
        assert defined.get(name) == "def" and name in _all(tree), f"kernels/{family}.py must define {name}"
