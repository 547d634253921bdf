"""Packaging promises: layering, configs, and the README's two commands in CI (the README's
blocks themselves: test_readme.py)."""

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_imex.optim import IMEXAdam

ROOT = Path(__file__).resolve().parents[1]


def imported(modules: str, watched: set[str]) -> list[str]:
    """The watched modules that importing ``modules`` pulls in, in a fresh interpreter."""
    code = f"import sys, {modules}; print(sorted(m for m in sys.modules if m in {watched!r}))"
    return eval(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


FRAMEWORKS = {"lightning", "pytorch_lightning", "hydra", "omegaconf"}
APP = {"hydra", "lightning_imex.train", "lightning_imex.app", "lightning_imex.config", "lightning_imex.data",
       "lightning_imex.models", "lightning_imex.task", "lightning_imex.compare"}


@pytest.mark.parametrize("modules,watched", [
    ("lightning_imex.optim", FRAMEWORKS),
    ("lightning_imex", FRAMEWORKS),  # its Lightning names load on first use
    ("lightning_imex.module, lightning_imex.callbacks", APP),
])
def test_layers_import_only_the_layers_before_them(modules, watched):
    assert imported(modules, watched) == []


def optim_imports(module: str) -> set[str]:
    """The modules of lightning_imex.optim that ``module`` (one of them) imports, anywhere in it."""
    tree = ast.parse((ROOT / "lightning_imex" / "optim" / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found |= {node.module} if node.module else {alias.name for alias in node.names}
    return found


# Below the dispatcher (kernel.py) and the optimizer runtime (base.py): what each may import.
OPTIM_LOWER = {
    "program": set(), "tableau": set(), "cache": set(), "toolkit": {"program"},
    "cpu_backend": {"cache", "program", "toolkit"}, "triton_backend": {"cache", "program", "toolkit"},
    "plan": {"program", "tableau"},
}


def test_optim_modules_import_no_circle_and_backends_sit_below_the_dispatcher():
    modules = [p.stem for p in (ROOT / "lightning_imex" / "optim").glob("*.py") if p.stem != "__init__"]
    graph = {m: optim_imports(m) & set(modules) for m in modules}
    for module, allowed in OPTIM_LOWER.items():
        assert graph[module] <= allowed, f"{module} imports {sorted(graph[module] - allowed)}"
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import circle: {' -> '.join(path + (module,))}"
        if module not in done:
            for imported_module in graph[module]:
                visit(imported_module, path + (module,))
            done.add(module)

    for module in modules:
        visit(module, ())


@pytest.mark.filterwarnings("ignore::lightning_imex.optim.PositivityWarning")
@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "conf" / "optimizer").glob("*.yaml")))
def test_optimizer_configs_instantiate(name):
    with initialize_config_dir(config_dir=str(ROOT / "conf" / "optimizer"), version_base="1.3"):
        cfg = compose(config_name=name)
    p = torch.nn.Parameter(torch.ones(3))
    opt = instantiate(cfg)([p])
    assert isinstance(opt, torch.optim.Optimizer)
    p.grad = torch.ones(3)
    opt.step(lambda: torch.tensor(0.0))  # every config steps (closure re-fills nothing: grad stays)
    assert not torch.equal(p.detach(), torch.ones(3))
    if isinstance(opt, IMEXAdam):
        assert opt.tableau.name == cfg.tableau


def readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.*?)\n```", text, re.S)[:2]


def test_ci_runs_the_readme_test_command():
    install_and_run, test = readme_commands()
    assert "pip install" in install_and_run and "torch==2.13.0" in install_and_run
    assert "pytest" in test
    assert test.strip() in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_configs_ship_with_a_plain_install(tmp_path):
    """After a non-editable ``pip install .``, the app finds its configs in the package."""
    site, source = tmp_path / "site", tmp_path / "source"
    # from a copy without build outputs: a stale build/ would hide a package missing from pyproject.toml
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                                "outputs", "multirun", "lightning_logs"))
    # built with this environment's setuptools (torch requires it): an isolated build would
    # install setuptools again, most of the install's time
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(source)], check=True, capture_output=True, timeout=300)
    code = ("import lightning_imex, lightning_imex.train\n"
            "from hydra import compose, initialize_config_module\n"
            "with initialize_config_module(config_module='lightning_imex.conf', version_base='1.3'):\n"
            "    cfg = compose('train', overrides=['experiment=imex_spirals'])\n"
            "print(lightning_imex.__file__, cfg.optimizer.tableau, cfg.dataset.name)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(site)},
                         check=True, capture_output=True, text=True, timeout=120).stdout.split()
    assert out == [str(site / "lightning_imex" / "__init__.py"), "trapezoidal", "spirals"]
    packages = {d.relative_to(ROOT) for d in (ROOT / "lightning_imex").rglob("__init__.py")}
    assert {p for p in packages if not (site / p).is_file()} == set()  # every subpackage is installed
