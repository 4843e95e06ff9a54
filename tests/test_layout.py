"""The package's layout holds its rules: folders by concern whose imports point one way, no import cycle, the root
modules (the files a prompt checkpoint carries) importing only the standard library, torch, transformers and each
other, and every import path published for 0.1 still importing."""

from __future__ import annotations

import ast
import importlib
import os
import sys

import pytest
from conftest import REPO_ROOT


PACKAGE = os.path.join(REPO_ROOT, "modeling_vptm")
# what each folder may import from the package (its own modules included): the root and standalone/ at the bottom,
# deploy/ at the top
ALLOWED = {
    "": {""},
    "standalone": {"standalone"},
    "data": {"", "standalone", "data"},
    "pretraining": {"", "standalone", "data", "pretraining"},
    "training": {"", "standalone", "data", "training"},
    "serving": {"", "standalone", "data", "pretraining", "serving"},
    "deploy": {"", "standalone", "data", "pretraining", "training", "serving", "deploy"},
}
# what the files outside the package may be built on, at module level
ROOT_THIRD_PARTY = {"torch", "transformers"}
STANDALONE_THIRD_PARTY = {"numpy", "PIL", "onnxruntime"}


def modules() -> dict[str, str]:
    """Every module of the package, dotted name -> file."""
    found = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                relative = os.path.relpath(path, REPO_ROOT)[: -len(".py")].split(os.sep)
                found[".".join(relative[:-1] if relative[-1] == "__init__" else relative)] = path
    return found


MODULES = modules()


def is_package(module: str) -> bool:
    return MODULES[module].endswith("__init__.py")


def imports(module: str, module_level_only: bool = False, for_type_checkers: bool = False) -> list[tuple[str, str]]:
    """`(what is imported, how: "package" or "third party")` for each import statement of `module`, relative ones
    resolved to the package's modules (a submodule's import runs its packages' __init__ first: those count too);
    with `for_type_checkers`, the imports under `if TYPE_CHECKING:` too (they never run)."""
    tree = ast.parse(open(MODULES[module]).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING" and not for_type_checkers:
            node.body = []
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    base = module if is_package(module) else module.rpartition(".")[0]
    found = []
    for node in nodes:
        if isinstance(node, ast.Import):
            found += [(alias.name, "package" if alias.name.startswith("modeling_vptm") else "third party")
                      for alias in node.names]  # fmt: skip
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parent = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                target = f"{parent}.{node.module}" if node.module else parent
                # `from . import x` names a submodule when there is one
                names = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
                found += [(name, "package") for name in names or [target]]
            elif node.module.startswith("modeling_vptm"):
                found.append((node.module, "package"))
            else:
                found.append((node.module, "third party"))
    resolved = []
    for name, kind in found:
        if kind == "package":
            parts = name.split(".")
            targets = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
            # the packages holding the importer are being imported already: no arrow to them
            resolved += [(t, kind) for t in targets if t in MODULES and not (t == base or base.startswith(t + "."))]
        else:
            resolved.append((name, kind))
    return resolved


def folder_of(module: str) -> str:
    """The concern a module belongs to: "" for the root, else its top folder."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and is_package(module)) else ""


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_relative_import_names_a_module_of_the_package(module):
    """Imports inside functions run only when called: one left pointing at a module's old place fails here, not in a
    user's hands."""
    tree = ast.parse(open(MODULES[module]).read())
    base = module if is_package(module) else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            parent = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
            target = f"{parent}.{node.module}" if node.module else parent
            assert target in MODULES, f"{module}: from {'.' * node.level}{node.module or ''} import ... names {target}"


def test_every_module_lives_in_a_known_folder():
    assert {folder_of(m) for m in MODULES} == set(ALLOWED)


def test_no_import_cycle():
    """Not even through imports for type checkers only: a loop of names is a loop of concepts."""
    graph = {m: {t for t, kind in imports(m, for_type_checkers=True) if kind == "package" and t != m} for m in MODULES}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target) :] + [target]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(MODULES):
        if module not in state:
            visit(module, [module])


# the root module of the limits on outside input, standard library only: standalone/ runs without the package and
# carries a copy of it
SHARED_WITH_STANDALONE = "modeling_vptm.limits"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_one_way(module):
    allowed = ALLOWED[folder_of(module)]
    for target, kind in imports(module):
        # a subpackage may use the root package's lazy_exports helper (the root __init__ imports no subpackage)
        if kind == "package" and target != "modeling_vptm":
            shared = folder_of(module) == "standalone" and target == SHARED_WITH_STANDALONE
            assert folder_of(target) in allowed or shared, f"{module} imports {target}"


def test_the_limits_need_only_the_standard_library():
    for target, kind in imports(SHARED_WITH_STANDALONE):
        assert kind == "third party" and target.split(".")[0] in (*sys.stdlib_module_names, "__future__"), target


@pytest.mark.parametrize("module", sorted(m for m in MODULES if folder_of(m) in ("", "standalone")))
def test_the_bottom_folders_import_little_at_module_level(module):
    """Root modules: the standard library, torch, transformers and each other (a prompt checkpoint carries them, and
    remote code may import nothing else); standalone/: the standard library, numpy, Pillow, onnxruntime."""
    third_party = ROOT_THIRD_PARTY if folder_of(module) == "" else STANDALONE_THIRD_PARTY
    for target, kind in imports(module, module_level_only=True):
        if kind == "third party":
            top = target.split(".")[0]
            assert top in sys.stdlib_module_names or top == "__future__" or top in third_party, (module, target)


# Import paths that 0.1's README, docs, model cards and card template showed, with a name each: they keep working.
PUBLISHED = [
    ("modeling_vptm", "VPTMForImageClassification"),
    ("modeling_vptm", "VPTMConfig"),
    ("modeling_vptm", "SHIPPED_BACKBONE"),
    ("modeling_vptm", "shipped_backbone_path"),
    ("modeling_vptm.checkpoint_io", "CheckpointNotFoundError"),
    ("modeling_vptm.convert", "convert_beit_checkpoint"),
    ("modeling_vptm.data", "load_data"),
    ("modeling_vptm.data", "shipped_dataset"),
    ("modeling_vptm.endpoint", "load_endpoint"),
    ("modeling_vptm.inspection", "patch_attention_map"),
    ("modeling_vptm.methods", "build_model"),
    ("modeling_vptm.peft_methods", "load_peft_classifier"),
    ("modeling_vptm.serving", "MultiTaskVPTM"),
    ("modeling_vptm.teacher", "ContrastiveTeacher"),
    ("modeling_vptm.tokenizer", "PatchKMeansTokenizer"),
    ("modeling_vptm.tokenizer", "TeacherFeatureTokenizer"),
    ("modeling_vptm.tokenizer", "VQKDTokenizer"),
    ("modeling_vptm.training", "PixelValuesCollator"),
    ("modeling_vptm.training", "VPTMTrainer"),
    ("modeling_vptm.training", "label_names"),
    ("modeling_vptm.training", "prepare_images"),
    ("modeling_vptm.training_args", "DataTrainingArguments"),
    ("modeling_vptm.training_args", "ModelArguments"),
    ("modeling_vptm.training_args", "VPTMTrainingArguments"),
]


@pytest.mark.parametrize(("path", "name"), PUBLISHED)
def test_published_import_paths_still_import(path, name):
    assert getattr(importlib.import_module(path), name) is not None


def test_moved_modules_are_the_modules_at_their_new_place():
    import modeling_vptm

    for old, new in modeling_vptm.MOVED_MODULES.items():
        moved = importlib.import_module(f"modeling_vptm.{old}")
        assert moved is importlib.import_module(f"modeling_vptm.{new}"), old
        assert moved.__spec__.name == f"modeling_vptm.{new}"  # the module keeps its own identity


def test_dir_lists_the_lazy_exports():
    import modeling_vptm
    import modeling_vptm.deploy
    import modeling_vptm.training

    assert {"VPTMTrainer", "MultiTaskVPTM", "load_classifier"} <= set(dir(modeling_vptm))
    assert set(modeling_vptm.__all__) <= set(dir(modeling_vptm))
    assert {"VPTMTrainer", "ModelArguments", "search_hyperparameters"} <= set(dir(modeling_vptm.training))
    assert {"push_checkpoint", "export_task_graph", "load_endpoint"} <= set(dir(modeling_vptm.deploy))
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        modeling_vptm.training.nothing_here  # noqa: B018


def public_names(module_name: str) -> set[str]:
    return set(importlib.import_module(module_name).__all__)


@pytest.mark.parametrize("folder", ["experiments", "space"])
def test_scripts_use_the_public_api(folder):
    """The scripts import from the package only names a module exports (its `__all__`), never a module's helpers,
    whose names may change."""
    for name in sorted(os.listdir(os.path.join(REPO_ROOT, folder))):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(REPO_ROOT, folder, name)).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("modeling_vptm"):
                exported = public_names(node.module)
                for alias in node.names:
                    assert alias.name in exported, f"{folder}/{name}: {alias.name} is not exported by {node.module}"
