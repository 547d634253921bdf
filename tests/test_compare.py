"""``lightning-imex-compare``: a tiny comparison writes a table whose numbers parse, one CSV
row per run and real PNGs, ``--from`` reproduces it; the budget is counted in gradient
evaluations (closure calls) and split into steps; every run of a seed starts from the
same weights and data; every recipe runs; a killed compare finishes only what is missing."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from matplotlib import image

import lightning_imex.compare as compare_cli
from lightning_imex.compare import compare, compare_from, parse_settings
from lightning_imex.compare.recipe import RecipeError, load_recipe, parse_recipe, recipe_names
from lightning_imex.compare.runner import plan_runs
from lightning_imex.task import SupervisedTask

SMALL = ["+dataset.n_samples=400", "model.hidden=[16]", "dataset.batch_size=32"]


def tiny_recipe(tmp_path: Path, optimizers: dict, budget: int = 12, seeds: int = 2, **fields) -> Path:
    recipe = {"claim": "a claim", "paper": "a paper", "scale": "tiny",
              "overrides": ["dataset=spirals", "~callbacks.ema", "scheduler=none", *SMALL],
              "budget": budget, "seeds": seeds, "validations": 3, "optimizers": optimizers}
    recipe.update(fields)
    path = tmp_path / "tiny.yaml"
    path.write_text(json.dumps(recipe))  # JSON is YAML
    return path


TWO = {"adam": {"overrides": ["optimizer=adam"], "lr": 0.01},
       "trapezoidal": {"overrides": ["optimizer=imex_trapezoidal"], "lr": 0.01}}


def table(markdown: str) -> list[list[str]]:
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row] for row in rows]


def number(cell: str) -> float:
    """'0.93 ± 0.01' or '12': the mean."""
    return float(re.fullmatch(r"\**([-0-9.e+]+)( ± [-0-9.e+]+)?\**", cell).group(1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("compare")
    recipe = load_recipe(str(tiny_recipe(tmp, TWO)))
    comparison, paths = compare(recipe, tmp / "out")
    return tmp / "out", comparison, paths


def test_a_tiny_compare_writes_a_table_a_csv_and_plots(tiny):
    out, comparison, paths = tiny
    rows = table((out / "results.md").read_text())
    header, body = rows[0], rows[1:]
    assert [row[0].strip("*") for row in body] == ["adam", "trapezoidal"]
    for row in body:  # every number parses: lr, steps, evaluations, seconds, loss, metric, test metrics
        values = [number(cell) for cell in row[1:-1]]
        assert all(v == v for v in values)
        assert re.fullmatch(r"\d/2", row[-1])
    assert header[3] == "gradient evaluations" and [number(r[3]) for r in body] == [12, 12]
    assert [number(r[2]) for r in body] == [12, 6]  # steps: a two-gradient method gets half
    with open(out / "results.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 4 and {(r["optimizer"], r["seed"]) for r in runs} == {
        (o, s) for o in ("adam", "trapezoidal") for s in ("0", "1")}
    pngs = [p for p in paths if p.suffix == ".png"]
    assert len(pngs) == 3
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        pixels = image.imread(png)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels.std() > 0.05  # not blank
    assert "Fairness (checked)" in (out / "results.md").read_text()


def test_from_reproduces_the_table(tiny, tmp_path):
    out, _, _ = tiny
    compare_from([out], tmp_path / "again")
    assert table((tmp_path / "again" / "results.md").read_text()) == table((out / "results.md").read_text())
    def rows(path: Path) -> list[dict]:  # the folder column is relative to where the table is written
        with open(path) as f:
            return [{k: v for k, v in row.items() if k != "folder"} for row in csv.DictReader(f)]

    assert rows(tmp_path / "again" / "results.csv") == rows(out / "results.csv")


def test_same_initial_weights_and_data_for_every_optimizer_of_a_seed(tiny):
    out, _, _ = tiny
    records = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/*/*/run.json"))]
    assert len(records) == 4
    for seed in (0, 1):
        same = [r for r in records if r["seed"] == seed]
        assert len({r["initial_weights"] for r in same}) == 1
        assert len({tuple(r["batch_digests"][:6]) for r in same}) == 1  # trapezoidal made 6 steps
    assert len({r["initial_weights"] for r in records}) == 2  # the digests do tell seeds apart
    assert len({r["batch_digests"][0] for r in records}) == 2


@pytest.mark.parametrize("optimizer,per_step", [("optimizer=adam", 1), ("optimizer=imex_trapezoidal", 2),
                                                ("optimizer=imex_ssp3_433", 3),
                                                ("optimizer=imex_trapezoidal_reuse", 1)])
def test_gradient_evaluations_are_counted_closure_calls(tmp_path, monkeypatch, optimizer, per_step):
    calls = []
    training_step = SupervisedTask.training_step
    monkeypatch.setattr(SupervisedTask, "training_step", lambda self, *a: calls.append(1) or training_step(self, *a))
    recipe = load_recipe(str(tiny_recipe(tmp_path, {"opt": {"overrides": [optimizer], "lr": 0.01}}, seeds=1)))
    compare(recipe, tmp_path / "out")
    record = json.loads(next((tmp_path / "out").glob("runs/*/*/*/run.json")).read_text())
    assert record["steps"] == 12 // per_step and record["evaluations_per_step"] == per_step
    assert record["gradient_evaluations"] == len(calls) == 12


def test_an_unfair_setup_is_refused():
    from lightning_imex.compare.runner import check_fairness

    records = [{"seed": 0, "label": "a", "initial_weights": "x", "batch_digests": ["1"]},
               {"seed": 0, "label": "b", "initial_weights": "y", "batch_digests": ["1"]}]
    with pytest.raises(RecipeError, match="seed 0 started from different weights"):
        check_fairness(records)
    records[1]["initial_weights"], records[1]["batch_digests"] = "x", ["2"]
    with pytest.raises(RecipeError, match="saw different training batches"):
        check_fairness(records)


def test_a_learning_rate_grid_is_chosen_on_the_validation_metric(tmp_path):
    grid = {"adam": {"overrides": ["optimizer=adam"], "lr": [1e-6, 0.05]}}
    path = tiny_recipe(tmp_path, grid, budget=30, seeds=1,
                       overrides=["dataset=digits", "model=logreg", "~callbacks.ema", "scheduler=none"])
    comparison, _ = compare(load_recipe(str(path)), tmp_path / "out")
    assert comparison.chosen["adam"][0].lr == 0.05  # 1e-6 barely moves a logistic regression in 30 steps
    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "## Learning-rate grid" in markdown and "0.05 (chosen)" in markdown


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_plans_with_the_apps_checks(tmp_path, name):
    recipe = load_recipe(name)
    if name == "imex_cifar10_vgg" or name.endswith("_mnist"):
        pytest.skip("needs its dataset's files (run in the slow tier with synthetic files)")
    runs = plan_runs(recipe.replace(seeds=1), tmp_path)
    assert {r.label for r in runs} == {e.name for e in recipe.optimizers}
    assert all(r.steps * r.evaluations_per_step <= recipe.budget for r in runs)


@pytest.mark.slow
@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_runs_a_few_steps_without_download(tmp_path, name, monkeypatch):
    from test_data import write_cifar, write_mnist

    write_mnist(tmp_path / "data" / "mnist", n=64)
    write_cifar(tmp_path / "data" / "cifar10" / "cifar-10-batches-py", n=16)
    monkeypatch.setenv("LIGHTNING_IMEX_ROOT", str(tmp_path))
    recipe, overrides = parse_settings(load_recipe(name), ["seeds=1", "budget=6", "validations=1",
                                                           "trainer.limit_val_batches=2", "test=false"])
    comparison, paths = compare(recipe, tmp_path / "out", overrides)
    assert set(comparison.chosen) == {e.name for e in recipe.optimizers}
    assert all(r.gradient_evaluations == 6 - 6 % (6 // r.steps) for g in comparison.chosen.values() for r in g)
    assert (tmp_path / "out" / "results.md").is_file()


@pytest.mark.parametrize("fields,message", [
    ({"budget": 0}, "budget must be an integer >= 1, got 0"),
    ({"seeds": "3"}, "seeds must be an integer >= 1, got '3'"),
    ({"colour": 1}, "unknown field 'colour'; allowed: claim, paper"),
    ({"optimizers": {"a": {"overrides": ["optimizer=adam"], "lr": -1}}}, "optimizers.a.lr must be a positive number"),
    ({"optimizers": {"a": {"overrides": "optimizer=adam", "lr": 1}}}, "optimizers.a.overrides must be a list"),
    ({"optimizers": {}}, "optimizers must be a mapping of at least one name"),
    ({"metric": "acc"}, "metric must be a logged validation metric"),
    ({"claim": ""}, "claim must be a non-empty text"),
])
def test_bad_recipes_are_one_line_errors(fields, message):
    base = {"claim": "c", "paper": "p", "scale": "s", "budget": 10, "optimizers": TWO}
    with pytest.raises(RecipeError, match=re.escape(message)) as error:
        parse_recipe("bad", {**base, **fields})
    assert "\n" not in str(error.value)


def run_cli(*args: str, cwd: Path, **kwargs) -> subprocess.CompletedProcess | subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    command = [sys.executable, "-m", "lightning_imex.compare", *args]
    if kwargs.pop("background", False):
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["nope"], "no recipe 'nope'; packaged recipes: adam_logreg"),
    (["imex_spirals", "seeds=two"], "seeds must be an integer, got 'two'"),
    (["imex_spirals", "budget=0"], "recipe imex_spirals: budget must be an integer >= 1, got 0"),
    (["imex_spirals", "optimizer.lr=0.1"], "optimizer.lr is set by the compare command for every run (use the "
                                           "recipe's lr instead)"),
    (["imex_spirals", "optimizer.eps=-1"], "optimizer adam: optimizer: Invalid epsilon value: -1"),
    (["imex_spirals", "strategy=ddp_cpu"], "strategy: the compare command trains every run in its own process"),
    (["imex_spirals", "nope=1"], "nope"),
    (["--from", "missing"], "--from missing: not a folder"),
])
def test_bad_command_lines_are_one_line_errors(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        compare_cli.main([*args, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("lightning-imex-compare: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "runs").exists()  # before any work


def test_a_folder_with_other_settings_is_refused(tiny):
    out, _, _ = tiny
    recipe = load_recipe(str(out.parent / "tiny.yaml"))
    with pytest.raises(RecipeError, match="holds a finished run made with other settings"):
        plan_runs(recipe.replace(budget=14), out)


@pytest.mark.slow
def test_a_killed_compare_finishes_only_the_missing_runs(tmp_path):
    recipe = tiny_recipe(tmp_path, TWO, budget=80)
    out = tmp_path / "out"
    process = run_cli(str(recipe), "--out", str(out), cwd=tmp_path, background=True)
    deadline = time.monotonic() + 240
    while not list(out.glob("runs/*/*/*/run.json")) and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p: p.read_text() for p in out.glob("runs/*/*/*/run.json")}
    assert 1 <= len(finished) < 4
    result = run_cli(str(recipe), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    after = {p: p.read_text() for p in out.glob("runs/*/*/*/run.json")}
    assert len(after) == 4 and all(after[p] == text for p, text in finished.items())  # not rerun
    assert (out / "results.md").is_file()


@pytest.mark.slow
def test_from_reads_a_multirun_of_the_app(tmp_path):
    app = subprocess.run([sys.executable, "-m", "lightning_imex.train", "-m", "optimizer=adam,imex_trapezoidal",
                          "seed=0,1", "dataset=spirals", *SMALL, "trainer.max_steps=8", "trainer.max_epochs=-1",
                          "trainer.val_check_interval=4", "trainer.check_val_every_n_epoch=null",
                          "trainer.log_every_n_steps=1", "test=false", "~callbacks.rich_progress_bar",
                          f"hydra.sweep.dir={tmp_path / 'sweep'}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300)
    assert app.returncode == 0, app.stderr[-3000:]
    comparison, paths = compare_from([tmp_path / "sweep"], tmp_path / "report")
    assert set(comparison.chosen) == {"adam", "imex_trapezoidal"}
    evaluations = {label: [r.gradient_evaluations for r in runs] for label, runs in comparison.chosen.items()}
    assert evaluations == {"adam": [8, 8], "imex_trapezoidal": [16, 16]}  # steps bounded, as the user ran them
    assert comparison.common_budget == 8
    assert len(table((tmp_path / "report" / "results.md").read_text())) == 3


def test_a_second_compare_into_a_busy_folder_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    recipe = load_recipe(str(tiny_recipe(tmp_path, TWO, seeds=1)))
    with open(out / ".lock", "w") as lock:  # what a running compare holds
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(RecipeError, match="another lightning-imex-compare is running into this folder"):
            compare(recipe, out)
    assert not list(out.glob("runs/*/*/*/run.json"))
