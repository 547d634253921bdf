"""``lightning-imex-compare`` on every core: runs in a pool of worker processes give the
numbers a sequential compare gives; a SIGKILLed parallel compare leaves no worker behind
and finishes only the missing runs; ``--help`` and ``--list`` answer without importing
Lightning, and ``--list`` says what each recipe costs and needs; the project's SLURM launcher
composes for a recipe."""

from __future__ import annotations

import csv
import importlib.util
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_compare import TWO, run_cli, table, tiny_recipe

import lightning_imex.compare as compare_cli
from lightning_imex.compare import compare, parse_settings
from lightning_imex.compare.recipe import (FIT_OVER_TRAIN, SECONDS_PER_EVALUATION, RecipeError, estimated_seconds,
                                           load_recipe)
from lightning_imex.compare.runner import launcher_config, split_launcher, submitit_executor

TIMED = ("train_seconds", "cost/train_seconds")  # wall-clock: the only numbers that may differ


def test_help_list_and_a_workers_set_up_do_not_import_lightning():
    """Nor does a pool worker's set-up (lightning_imex.compare.workers): it chooses the
    worker's GPU before the app is imported."""
    code = ("import sys\nimport lightning_imex.compare.workers\nfrom lightning_imex.compare import main\n"
            "main(['--list'])\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', sorted(m for m in sys.modules if m.split('.')[0] in ('lightning', 'pytorch_lightning')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip().endswith("LOADED []")
    lines = result.stdout.splitlines()
    spirals = lines.index(next(line for line in lines if line.startswith("imex_spirals ")))
    assert lines[spirals + 1].strip().startswith("36 runs (3 optimizers x 4 learning rates x 3 seeds) of 3000 "
                                                 "gradient evaluations; ~")
    mnist = lines.index(next(line for line in lines if line.startswith("imex_mnist ")))
    assert lines[mnist + 1].endswith("time not measured")
    assert lines[mnist + 2].strip().startswith("needs dataset files: MNIST from its four IDX files")
    assert "--jobs N" in result.stdout and "--threads N" in result.stdout  # the help


def test_the_time_estimate_is_runs_over_jobs_times_the_measured_cost():
    recipe = load_recipe("imex_spirals")
    assert estimated_seconds(recipe, 4) == pytest.approx(
        math.ceil(36 / 4) * 3000 * SECONDS_PER_EVALUATION["imex_spirals"] * FIT_OVER_TRAIN)
    assert estimated_seconds(load_recipe("imex_mnist"), 4) is None


def rows(path: Path, drop: tuple[str, ...] = TIMED) -> list[dict[str, str]]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


@pytest.mark.slow
def test_a_parallel_compare_and_one_through_submitit_give_the_numbers_of_a_sequential_one(tmp_path):
    """2 optimizers x 2 seeds in one process and in 2 workers (each trains two runs), and
    seed 0 as jobs of hydra-submitit-launcher's local launcher: every number of results.csv
    and of each run's metrics.csv but the wall-clock is the same."""
    recipe = load_recipe(str(tiny_recipe(tmp_path, TWO, budget=16)))
    compare(recipe, tmp_path / "sequential", jobs=1, threads=1)
    compare(recipe, tmp_path / "parallel", jobs=2, threads=1)
    folders = sorted(p.relative_to(tmp_path / "sequential") for p in (tmp_path / "sequential").glob("runs/*/*/*"))
    assert len(folders) == 4
    assert rows(tmp_path / "parallel" / "results.csv") == rows(tmp_path / "sequential" / "results.csv")
    sequential = table((tmp_path / "sequential" / "results.md").read_text())
    wall = sequential[0].index("wall-clock (s)")
    assert [row[:wall] + row[wall + 1:] for row in table((tmp_path / "parallel" / "results.md").read_text())] == [
        row[:wall] + row[wall + 1:] for row in sequential]
    assert "2 runs at a time, 1 torch thread each" in (tmp_path / "parallel" / "results.md").read_text()
    sides = ["parallel"]
    if importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher"):  # the slurm extra
        one_seed, overrides = parse_settings(recipe, ["seeds=1", "hydra/launcher=submitit_local",
                                                      "hydra.launcher.timeout_min=5"])
        compare(one_seed, tmp_path / "submitit", overrides, threads=1)
        assert len([job for job in (tmp_path / "submitit" / ".submitit").iterdir() if job.name.isdigit()]) == 2
        assert rows(tmp_path / "submitit" / "results.csv") == [
            row for row in rows(tmp_path / "sequential" / "results.csv") if row["seed"] == "0"]
        assert "LocalLauncher jobs (hydra-submitit-launcher), 1 torch thread each" in (
            tmp_path / "submitit" / "results.md").read_text()
        sides.append("submitit")
    for side in sides:
        for folder in folders:
            if (tmp_path / side / folder).is_dir():
                metrics = [next((tmp_path / name / folder).glob("**/metrics.csv")) for name in ("sequential", side)]
                assert rows(metrics[1]) == rows(metrics[0]) and len(rows(metrics[0])) > 5


def test_the_projects_slurm_launcher_composes_for_a_recipe(tmp_path, monkeypatch):
    """``hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml) gives a SLURM executor of
    one task per run (built here as if ``srun`` were there: no cluster needed)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    recipe = load_recipe(str(tiny_recipe(tmp_path, TWO)))
    _, to_launcher = split_launcher(["dataset.batch_size=16", "hydra/launcher=slurm", "hydra.launcher.partition=gpu"])
    launcher = launcher_config(recipe, to_launcher, tmp_path)
    assert launcher["_target_"].endswith(".SlurmLauncher") and launcher["submitit_folder"] == f"{tmp_path}/.submitit/%j"
    assert (launcher["partition"], launcher["nodes"], launcher["tasks_per_node"]) == ("gpu", 1, 1)
    executor = submitit_executor(launcher)
    assert executor.cluster == "slurm" and executor._executor.parameters["partition"] == "gpu"
    with pytest.raises(RecipeError, match="hydra.launcher: "):
        submitit_executor({**launcher, "colour": "red"})


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (Linux's /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] if Path(f"/proc/{pid}").exists() \
        else "X"
    return state not in ("Z", "X")


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads worker processes from /proc")
def test_a_killed_parallel_compare_leaves_no_worker_and_finishes_only_the_missing_runs(tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, TWO, budget=80)
    out = tmp_path / "out"
    process = run_cli(str(recipe), "--out", str(out), "--jobs", "2", cwd=tmp_path, background=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("runs/*/*/*/run.json")) and time.monotonic() < deadline:
        time.sleep(0.1)
    workers = children(process.pid)
    process.send_signal(signal.SIGKILL)
    process.wait()
    process.stdout.close()  # unread: the output of a killed compare
    process.stderr.close()
    assert len(workers) >= 2  # the pool's workers (and multiprocessing's resource tracker)
    deadline = time.monotonic() + 30
    while any(alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(pid) for pid in workers)  # none goes on training into the folder
    finished = {p: p.read_text() for p in out.glob("runs/*/*/*/run.json")}
    assert 1 <= len(finished) < 4
    compare_cli.main([str(recipe), "--out", str(out), "--jobs", "1"])  # here: one process start saved
    after = {p: p.read_text() for p in out.glob("runs/*/*/*/run.json")}
    assert len(after) == 4 and all(after[p] == text for p, text in finished.items())  # not rerun
    progress = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert len(progress) == 4 - len(finished) and progress[-1].startswith("[4/4] ")  # a line per run: not a terminal
    assert (out / "results.md").is_file()
