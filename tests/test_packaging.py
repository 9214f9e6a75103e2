"""What ships: Dockerfile lint, requirements cover every import, Hub files, the test job."""

import ast
import json
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from chatterbox_worker.config import ENVIRONMENT
from chatterbox_worker.schemas import parse_request
from tests.conftest import ROOT

RUNTIME_SOURCES = [ROOT / "handler.py", *sorted((ROOT / "chatterbox_worker").rglob("*.py"))]


def pinned_requirements() -> dict:
    pins = {}
    for path in (ROOT / "requirements.txt", ROOT / "requirements" / "torch-cpu.txt"):
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line and not line.startswith("-"):
                name, version = line.split("==", 1)
                pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def imported_modules(path: Path) -> set:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_dockerfile_passes_hadolint_at_warning_level():
    hadolint = Path(sys.executable).parent / "hadolint"
    done = subprocess.run([str(hadolint), "--config", str(ROOT / ".hadolint.yaml"), "Dockerfile"],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_runtime_import_is_pinned_in_requirements():
    pins = pinned_requirements()
    provided = packages_distributions()
    stdlib = set(sys.stdlib_module_names)
    missing = []
    for path in RUNTIME_SOURCES:
        for module in imported_modules(path) - stdlib - {"chatterbox_worker"}:
            dists = [d.lower().replace("_", "-") for d in provided.get(module, [])]
            if not any(d in pins for d in dists):
                missing.append(f"{path.name}: {module} ({dists or 'not installed'})")
    assert not missing, missing


def test_lock_pins_exact_versions_and_the_dockerfile_installs_it():
    text = (ROOT / "requirements.txt").read_text()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            assert "==" in line, f"unpinned: {line}"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "requirements.txt" in dockerfile and "--no-deps" in dockerfile


def test_hub_files_parse_and_name_only_real_settings():
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    assert hub["type"] == "serverless" and hub["category"] == "audio"
    assert hub["title"] and hub["description"]
    known = set(ENVIRONMENT.values())
    keys = [entry["key"] for entry in hub["config"]["env"]]
    assert set(keys) <= known, set(keys) - known
    for preset in hub["config"]["presets"]:
        assert set(preset["defaults"]) <= known
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())
    assert {e["key"] for e in tests["config"].get("env", [])} <= known
    names = " ".join(t["name"] for t in tests["tests"])
    for needed in ("health", "generate", "voice upload"):
        assert needed in names


@pytest.mark.parametrize("source", ["test_input.json", ".runpod/tests.json"])
def test_shipped_requests_validate_against_the_contract(source):
    data = json.loads((ROOT / source).read_text())
    inputs = [t["input"] for t in data["tests"]] if "tests" in data else [data["input"]]
    for job_input in inputs:
        parse_request(job_input, max_text_chars=5000)


def test_readme_documents_every_environment_variable():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Environment variables"):]
    missing = [v for v in ENVIRONMENT.values() if f"`{v}`" not in table]
    assert not missing, missing


def test_the_contract_documents_every_setting_and_error_code():
    """docs/API.md is the reference clients read: it names every variable and every code."""
    from chatterbox_worker import errors

    contract = (ROOT / "docs" / "API.md").read_text()
    missing = [v for v in ENVIRONMENT.values() if f"`{v}`" not in contract]
    codes = {cls.code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.WorkerError)}
    missing += [code for code in sorted(codes) if f"`{code}`" not in contract]
    assert not missing, missing


import os  # noqa: E402  (these checks were appended; kept apart from the ones above)
import shutil  # noqa: E402

# The CUDA version of PyPI's Linux torch build, by torch release (read from the
# wheel's metadata: torch 2.13.0 requires cuda-toolkit 13.0.3). Bumping torch
# without revisiting the Hub's allowed CUDA versions fails here.
PYPI_TORCH_CUDA = {"2.13": "13.0"}


def requirement_pins(path: Path) -> dict:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def test_the_image_ships_the_torch_the_tests_run_from_the_default_index():
    cuda_file = ROOT / "requirements" / "torch-cuda.txt"
    options = [line for line in cuda_file.read_text().splitlines() if line.strip().startswith("-")]
    assert not options, f"the image installs from the default package index only: {options}"
    image, tested = requirement_pins(cuda_file), requirement_pins(ROOT / "requirements" / "torch-cpu.txt")
    assert image == tested, (image, tested)
    import torch

    assert torch.__version__.split("+")[0] == tested["torch"], "the suite runs on another torch than it pins"


def test_hub_cuda_versions_are_those_the_shipped_torch_runs_on():
    torch_version = requirement_pins(ROOT / "requirements" / "torch-cuda.txt")["torch"]
    needed = PYPI_TORCH_CUDA[".".join(torch_version.split(".")[:2])]
    as_tuple = lambda v: tuple(int(p) for p in v.split("."))  # noqa: E731
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())["config"]["allowedCudaVersions"]
    tests = json.loads((ROOT / ".runpod" / "tests.json").read_text())["config"]["allowedCudaVersions"]
    for allowed in (hub, tests):
        assert allowed and all(as_tuple(v) >= as_tuple(needed) for v in allowed), (allowed, needed)
    assert f"CUDA {needed}" in (ROOT / "README.md").read_text()


def test_the_image_starts_as_root_only_to_prepare_the_volume():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert not [line for line in dockerfile.splitlines() if line.startswith("USER")]
    assert 'ENTRYPOINT ["/bin/sh", "/usr/local/bin/chatterbox-entrypoint"]' in dockerfile
    assert "COPY builder/entrypoint.sh /usr/local/bin/chatterbox-entrypoint" in dockerfile
    assert "/app/output" in dockerfile


needs_root = pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None,
    reason="the entry point drops root with setpriv: needs root and setpriv")


@needs_root
def test_entrypoint_gives_the_voices_dir_to_the_worker_and_drops_root():
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody")
    volume = Path(tempfile.mkdtemp(prefix="cbw-volume-", dir="/tmp"))  # root-owned, like RunPod's
    try:
        volume.chmod(0o755)
        voices = volume / "voices"
        (volume / "old").mkdir()
        env = {"PATH": os.environ["PATH"], "WORKER_USER": "nobody", "VOICES_DIR": str(voices)}
        done = subprocess.run(
            ["/bin/sh", str(ROOT / "builder" / "entrypoint.sh"), "/bin/sh", "-c",
             'id -u; grep NoNewPrivs /proc/self/status; echo x > "$VOICES_DIR/a.pth"; echo "$HOME"'],
            env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        uid, no_new_privs, home = done.stdout.split("\n")[:3]
        assert int(uid) == nobody.pw_uid and no_new_privs.split()[-1] == "1"
        assert home == nobody.pw_dir
        assert voices.stat().st_uid == nobody.pw_uid and (voices / "a.pth").stat().st_uid == nobody.pw_uid
        assert volume.stat().st_uid == 0  # only the voices directory changes hands

        env["WORKER_USER"] = "root"
        done = subprocess.run(["/bin/sh", str(ROOT / "builder" / "entrypoint.sh"), "id", "-u"],
                              env=env, capture_output=True, text=True, timeout=30)
        assert done.stdout.strip() == "0"
        env["WORKER_USER"] = "no-such-account"
        done = subprocess.run(["/bin/sh", str(ROOT / "builder" / "entrypoint.sh"), "id", "-u"],
                              env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 1 and "no-such-account" in done.stderr and not done.stdout
    finally:
        shutil.rmtree(volume)


def test_hub_inputs_have_the_workers_types_and_bounds():
    """A value the Hub form accepts is one the worker accepts: booleans for switches, bounds for numbers."""
    from annotated_types import Ge, Le

    from chatterbox_worker.config import Settings

    field_of = {variable: name for name, variable in ENVIRONMENT.items()}
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    for entry in hub["config"]["env"]:
        field = Settings.model_fields[field_of[entry["key"]]]
        spec = entry["input"]
        if field.annotation is bool:
            assert spec["type"] == "boolean", entry["key"]
        if spec["type"] == "number":
            bounds = {type(m): m for m in field.metadata}
            assert spec.get("min") == (bounds[Ge].ge if Ge in bounds else None), entry["key"]
            assert spec.get("max") == (bounds[Le].le if Le in bounds else None), entry["key"]


@needs_root
@pytest.mark.skipif(os.path.exists("/runpod-volume"), reason="a real /runpod-volume is mounted here")
def test_entrypoint_prepares_the_volume_cache_only_when_the_served_model_was_not_baked(tmp_path):
    """A worker serving the baked model never downloads; one asked for another model (the Hub's
    model choice) downloads into the volume's cache, which must be the worker's to write."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    baked = tmp_path / "weights"
    baked.mkdir()
    (baked / "REVISION").write_text("ResembleAI/chatterbox@abc\n")
    (baked / "VARIANT").write_text("original\n")
    cache = Path("/runpod-volume/huggingface-cache/hub")
    env = {"PATH": os.environ["PATH"], "WORKER_USER": "nobody", "CHATTERBOX_BAKED_DIR": str(baked),
           "VOICES_DIR": str(tmp_path / "voices")}
    os.makedirs("/runpod-volume")
    try:
        for variant, prepared in (("original", False), ("turbo", True)):
            done = subprocess.run(["/bin/sh", str(ROOT / "builder" / "entrypoint.sh"), "true"],
                                  env={**env, "CHATTERBOX_VARIANT": variant}, capture_output=True,
                                  text=True, timeout=30)
            assert done.returncode == 0, done.stderr
            assert cache.is_dir() == prepared, variant
        assert cache.stat().st_uid == nobody.pw_uid
    finally:
        shutil.rmtree("/runpod-volume")
