"""transformers' own model tests (`ModelTesterMixin`, `ConfigTester`) from the installed release's source distribution.

The test files are not in the transformers wheel, so they are taken from the sdist on PyPI, once per machine: it is
downloaded with pip, the two files are extracted into a cache folder (`$VPTM_TEST_SOURCES`, else
`~/.cache/vptm-test-sources`) as the package `transformers_tests` (not `tests`, which is this repository's folder),
and the folder is renamed into place only when complete, under a file lock, so that test processes started in
parallel (pytest-xdist) download it once and never see half of it.

The sdist holds only the top of transformers' `tests/` folder. The three modules the two files import from below it
are written here instead, each saying what it stands for:

* `exporters/test_export.py`: `ExportTesterMixin`, the export tests (`torch.export`, ONNX, ...) mixed into
  `ModelTesterMixin`; its source is not in the sdist and it needs export tooling this suite does not install, so it
  is an empty mixin here (VPTM's own export is tested in tests/test_onnx.py);
* `generation/test_utils.py`: `GenerationTesterMixin`, which `ModelTesterMixin` only uses to check that a model
  that cannot generate does not inherit it; an empty class is exactly that check's answer for VPTM;
* `utils/test_configuration_utils.py`: `config_common_kwargs`, a non-default value for each common config field,
  which `ConfigTester.check_config_arguments_init` passes to the config and reads back; built here from the
  installed `PreTrainedConfig`.

`parameterized`, which the test files import, is taken from PyPI the same way when it is not installed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path


SOURCES_ENV = "VPTM_TEST_SOURCES"  # where the sources are kept; default ~/.cache/vptm-test-sources
REQUIRE_ENV = "VPTM_REQUIRE_TEST_SOURCES"  # "1": a failed download fails the tests instead of skipping them (CI)
PACKAGE = "transformers_tests"
TEST_FILES = ("test_modeling_common.py", "test_configuration_common.py")
PARAMETERIZED = "parameterized==0.9.0"  # the release transformers' testing extra asks for (>=0.9)
PIP_TIMEOUT_S = 300

# What stands for the modules the two test files import from below transformers' tests/ folder (see the docstring)
EXPORT_STUB = '''"""Stands for transformers' tests/exporters/test_export.py, which its sdist does not hold: the export
tests are not run (vptm's tests/transformers_test_sources.py says why)."""


class ExportTesterMixin:
    pass
'''
GENERATION_STUB = '''"""Stands for transformers' tests/generation/test_utils.py, which its sdist does not hold: a
model that cannot generate must not inherit the generation tests, which is all ModelTesterMixin asks of this class."""


class GenerationTesterMixin:
    pass
'''
CONFIG_KWARGS_STUB = '''"""Stands for transformers' tests/utils/test_configuration_utils.py, which its sdist does not
hold: a value other than the default for each common field of PreTrainedConfig, as
ConfigTester.check_config_arguments_init expects."""

config_common_kwargs = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}
'''
STUBS = {
    "__init__.py": "",
    "exporters/__init__.py": "",
    "exporters/test_export.py": EXPORT_STUB,
    "generation/__init__.py": "",
    "generation/test_utils.py": GENERATION_STUB,
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": CONFIG_KWARGS_STUB,
}


class SourcesUnavailable(RuntimeError):
    """The test sources could not be fetched (no network, no such release on PyPI); the message says why."""


def cache_root() -> Path:
    return Path(os.environ.get(SOURCES_ENV) or Path.home() / ".cache" / "vptm-test-sources")


def required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def fetch_test_sources(version: str) -> Path:
    """The folder holding `transformers_tests/` for transformers `version` (and, when `parameterized` is not
    installed, its wheel), fetched on first use. Raises `SourcesUnavailable` when PyPI cannot give them."""
    root = cache_root()
    target = root / f"transformers-{version}"
    if complete(target):
        return target
    from filelock import FileLock  # a transformers dependency

    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"transformers-{version}.lock"), timeout=2 * PIP_TIMEOUT_S):
        if complete(target):  # made by another process while this one waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            fetch_into(staging / target.name, version, staging / "download")
            os.replace(staging / target.name, target)  # the folder appears whole
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def complete(target: Path) -> bool:
    return all((target / PACKAGE / name).is_file() for name in (*TEST_FILES, *STUBS))


def fetch_into(folder: Path, version: str, download: Path) -> None:
    package = folder / PACKAGE
    package.mkdir(parents=True)
    pip_download(["--no-binary", ":all:", f"transformers=={version}"], download)
    (sdist,) = download.glob(f"transformers-{version}.tar.gz")
    with tarfile.open(sdist) as archive:
        for name in TEST_FILES:
            member = archive.extractfile(f"transformers-{version}/tests/{name}")
            if member is None:
                raise SourcesUnavailable(f"the transformers {version} sdist has no tests/{name}")
            (package / name).write_bytes(member.read())
    for name, text in STUBS.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    pip_download(["--only-binary", ":all:", PARAMETERIZED], folder)  # a 20 kB wheel, used when not installed


def pip_download(arguments: list[str], folder: Path) -> None:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--timeout",
               "15", "--retries", "1", "-d", str(folder), *arguments]  # fmt: skip
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        raise SourcesUnavailable(f"`pip download {arguments[-1]}` took more than {PIP_TIMEOUT_S} s") from error
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SourcesUnavailable(f"`pip download {arguments[-1]}` failed (PyPI unreachable?): {last}")


def import_path(target: Path) -> None:
    """Puts the sources (and `parameterized`, when it is not installed) on `sys.path`."""
    sys.path.insert(0, str(target))
    try:
        import parameterized  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(next(target.glob("parameterized-*.whl"))))  # a pure-Python wheel imports as a zip
