"""``lightning-imex-compare``: a tiny comparison writes a table whose numbers parse, one CSV
row per run and real PNGs, ``--from`` reproduces it; the budget is counted in gradient
evaluations (closure calls) and split into steps; every run of a seed starts from the
same weights and data; every recipe runs (a killed compare: test_compare_parallel.py);
Adam against IMEX Euler (the same method) is a tie, runs of unequal budgets are compared at
the common one and said so; a grid whose best is its end is flagged and ``--extend``
brackets the optimum; a diverging learning rate is a result, ranked last."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib import image

import lightning_imex.compare as compare_cli
from lightning_imex.compare import compare, compare_from, parse_settings
from lightning_imex.compare.recipe import Recipe, RecipeError, load_recipe, parse_recipe, recipe_names
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


def table(markdown: str, index: int = 0) -> list[list[str]]:
    """The rows of the markdown's ``index``-th table (0: the results; then the paired differences, the grid)."""
    blocks = re.findall(r"(?:^\|.*\n)+", markdown, flags=re.M)
    rows = [line.strip("|").split("|") for line in blocks[index].splitlines() if line.startswith("| ")]
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
    assert len(pngs) == 4
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        pixels = image.imread(png)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500 and pixels.std() > 0.05  # not blank
    assert "Fairness (checked)" in (out / "results.md").read_text()


def test_every_plot_is_titled_with_axes_in_words_and_lines_told_apart(tiny):
    from matplotlib import pyplot as plt

    from lightning_imex.compare.report import figures

    out, comparison, _ = tiny
    made = dict(figures(comparison, load_recipe(str(out.parent / "tiny.yaml"))))
    loss = "training loss (minibatch mean)"
    assert {name: (fig.axes[0].get_xlabel(), fig.axes[0].get_ylabel()) for name, fig in made.items()} == {
        "train_loss_vs_gradient_evaluations": ("gradient evaluations", loss),
        "train_loss_vs_optimizer_steps": ("optimizer steps", loss),
        "train_loss_vs_wall_clock": ("wall-clock time of the training steps (s)", loss),
        "val_acc_vs_gradient_evaluations": ("gradient evaluations", "validation accuracy")}
    for name, fig in made.items():
        title = fig.axes[0].get_title()
        assert title.startswith(f"{fig.axes[0].get_ylabel()} vs ") and "tiny: a claim" in title
        assert title.endswith("mean over 2 seeds (0, 1), band from the lowest to the highest seed")
        lines = fig.axes[0].get_lines()
        assert len(lines) == 2 and len({(line.get_linestyle(), line.get_marker()) for line in lines}) == 2
        plt.close(fig)


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


def test_from_on_adam_and_imex_euler_is_a_tie_and_unequal_budgets_are_said(tmp_path):
    """Adam and IMEX Euler are the same method: no winner. Joined with trapezoidal runs of
    twice the budget (as an epoch-bounded sweep makes them), all are compared at the
    common budget, and results.md says so."""
    euler = {"adam": {"overrides": ["optimizer=adam"], "lr": 0.01},
             "euler": {"overrides": ["optimizer=imex_euler"], "lr": 0.01}}
    compare(load_recipe(str(tiny_recipe(tmp_path, euler))), tmp_path / "euler", ["test=false"])
    comparison, _ = compare_from([tmp_path / "euler"], tmp_path / "tie")
    assert comparison.winner is None and comparison.tied == ["adam", "euler"]
    assert comparison.wins == {"adam": 0, "euler": 0}
    markdown = (tmp_path / "tie" / "results.md").read_text()
    assert "No winner at 12 gradient evaluations: adam, euler tie" in markdown and "**adam**" not in markdown
    assert "Unequal budgets" not in markdown
    (tmp_path / "trapezoidal").mkdir()
    trapezoidal = {"trapezoidal": {"overrides": ["optimizer=imex_trapezoidal"], "lr": 0.01}}
    compare(load_recipe(str(tiny_recipe(tmp_path / "trapezoidal", trapezoidal, budget=24, seeds=1))), tmp_path / "trap",
            ["test=false"])  # one seed: the one compared (seeds all optimizers ran)
    comparison, _ = compare_from([tmp_path / "euler", tmp_path / "trap"], tmp_path / "joined")
    markdown = (tmp_path / "joined" / "results.md").read_text()
    assert comparison.common_budget == 12 and comparison.metric_at == 8  # trapezoidal validates at 8, 16, 24
    assert comparison.seeds_compared == 1 and "Fairness" not in markdown  # no one folder's check covers them all
    assert ("**Unequal budgets**: the runs made different numbers of gradient evaluations (adam 12, euler 12, "
            "trapezoidal 24); every optimizer is compared at 12") in markdown
    rows = {row[0].strip("*"): row for row in table(markdown)[1:]}
    assert [number(rows[label][2]) for label in ("adam", "euler", "trapezoidal")] == [12, 12, 12]  # steps run
    assert re.search(r"Winner at 12 gradient evaluations \(`val/acc` at 8\)|No winner at 12 gradient evaluations "
                     r"\(`val/acc` at 8\)", markdown)


def test_a_grid_edge_is_flagged_and_extend_brackets_the_optimum(tmp_path, monkeypatch, capsys):
    """Adam on a logistic regression for 20 steps: the best learning rate of 3.2e-4, 3.2e-3,
    3.2e-2, 0.32 (by the validation loss) is 3.2e-2. A grid of the first two is flagged;
    --extend adds 3.2e-2 and 0.32 (one per round), after which the best is inside."""
    grid = {"adam": {"overrides": ["optimizer=adam"], "lr": {"center": 1e-3, "factor": 10, "points": 2}}}
    path = tiny_recipe(tmp_path, grid, budget=20, seeds=1, validations=1, metric="val/loss",
                       overrides=["dataset=digits", "model=logreg", "~callbacks.ema", "scheduler=none"])
    out = tmp_path / "out"
    compare_cli.main([str(path), "test=false", "--out", str(out), "--jobs", "1"])
    err = capsys.readouterr().err
    assert ("lightning-imex-compare: warning: Grid edge: adam's chosen learning rate 0.00316228 is the highest of "
            "its grid (0.000316228, 0.00316228); the optimum may lie above it; `--extend` runs") in err
    recipe, overrides = parse_settings(load_recipe(str(path)), ["test=false"])
    monkeypatch.setattr(compare_cli, "EXTENSIONS", 1)
    comparison, _ = compare(recipe, out, overrides, extend=True)
    assert comparison.edges == {"adam": "highest"} and comparison.chosen["adam"][0].lr == 0.0316228
    assert "is the highest of its grid (0.000316228, 0.00316228, 0.0316228); the optimum may lie above it even " \
           "after 1 extension (the limit)" in (out / "results.md").read_text()
    monkeypatch.setattr(compare_cli, "EXTENSIONS", 3)
    comparison, _ = compare(recipe, out, overrides, extend=True)
    assert comparison.edges == {} and comparison.chosen["adam"][0].lr == 0.0316228
    assert sorted(comparison.grid["adam"]) == [0.000316228, 0.00316228, 0.0316228, 0.316228]
    markdown = (out / "results.md").read_text()
    assert "Grid edge" not in markdown and "`--extend` added adam 0.0316228, 0.316228" in markdown
    assert len(list(out.glob("runs/adam/*/seed_0/run.json"))) == 4  # each learning rate ran once


def first_lr(recipe: Recipe) -> Recipe:
    """The recipe with each grid cut to its first learning rate: the others plan and run alike."""
    return recipe.replace(optimizers=tuple(dataclasses.replace(e, lrs=e.lrs[:1]) for e in recipe.optimizers))


def one_entry_per_code_path(recipe: Recipe) -> Recipe:
    """The recipe's first entry of each optimizer config group, and every entry that also
    overrides something else (callbacks, model, ...): entries that differ only in an
    optimizer's settings (state_dtype, reuse_gradient) train through the same code, and
    every entry builds in the planner check of ``test_every_recipe_plans_with_the_apps_checks``."""
    kept, groups = [], set()
    for entry in recipe.optimizers:
        group = next((o for o in entry.overrides if o.startswith("optimizer=")), None)
        others = [o for o in entry.overrides if not o.lstrip("+~").startswith("optimizer")]
        if others or group not in groups:
            kept.append(entry)
            groups.add(group)
    return recipe.replace(optimizers=tuple(kept))


def test_a_diverging_learning_rate_is_a_result_ranked_last(tmp_path):
    grid = {"sgd": {"overrides": ["optimizer=sgd"], "lr": [0.01, 1e4]}}  # 1e4 overflows a regression in a few steps
    path = tiny_recipe(tmp_path, grid, budget=10, seeds=1, validations=1,
                       overrides=["dataset=gaussians", "model.hidden=[16]", "~callbacks.ema", "scheduler=none"])
    comparison, _ = compare(load_recipe(str(path)), tmp_path / "out", ["test=false"])
    diverged = json.loads(next((tmp_path / "out").glob("runs/sgd/lr_10000/seed_0/run.json")).read_text())
    assert diverged["diverged"].startswith("non-finite gradient in parameter") and diverged["steps"] < 10
    assert comparison.chosen["sgd"][0].lr == 0.01 and comparison.edges == {"sgd": "lowest"}
    assert "| sgd | 10000 (diverged) | n/a |" in (tmp_path / "out" / "results.md").read_text()


@pytest.mark.parametrize("name", recipe_names())
def test_every_recipe_plans_with_the_apps_checks(tmp_path, name):
    recipe = load_recipe(name)
    if name == "imex_cifar10_vgg" or name.endswith("_mnist"):
        pytest.skip("needs its dataset's files (run in the slow tier with synthetic files)")
    if name.startswith("low_precision_"):  # one storage against another at the family's one, given, lr
        assert all(len(e.lrs) == 1 for e in recipe.optimizers)
        assert len({(e.name.rsplit("_", 1)[0], e.lrs) for e in recipe.optimizers}) == \
            len({e.name.rsplit("_", 1)[0] for e in recipe.optimizers})
    else:
        # the CPU recipes tune, equally, on grids of at least 4 points (issue 24)
        assert len({len(e.lrs) for e in recipe.optimizers}) == 1 and len(recipe.optimizers[0].lrs) >= 4
        assert all(e.factor for e in recipe.optimizers)
    runs = plan_runs(first_lr(recipe).replace(seeds=1), tmp_path)
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
    recipe = one_entry_per_code_path(first_lr(recipe))
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
    (["imex_spirals", "threads=2"], "threads is set by the compare command for every run (use --threads N instead)"),
    (["imex_spirals", "--jobs", "0"], "--jobs must be an integer >= 1, got 0"),
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
def test_from_reads_a_multirun_of_the_app(tmp_path):
    """An app multirun (one run folder per job) read back by ``--from``."""
    from test_app import run_app

    app = run_app(tmp_path, "-m", "optimizer=adam,imex_euler,imex_trapezoidal", "seed=0,1", "dataset=spirals",
                  *SMALL, "trainer.max_steps=8", "trainer.max_epochs=-1", "trainer.val_check_interval=4",
                  "trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=3", "test=false",
                  "~callbacks.rich_progress_bar", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert app.returncode == 0, app.stderr[-3000:]
    jobs = sorted(int(p.parent.parent.name) for p in (tmp_path / "sweep").glob("*/.hydra/overrides.yaml"))
    assert jobs == list(range(6)) and app.stdout.count("finished at step 8") == 6
    comparison, paths = compare_from([tmp_path / "sweep"], tmp_path / "report")
    assert set(comparison.chosen) == {"adam", "imex_euler", "imex_trapezoidal"}
    evaluations = {label: [r.gradient_evaluations for r in runs] for label, runs in comparison.chosen.items()}
    assert evaluations == {"adam": [8, 8], "imex_euler": [8, 8], "imex_trapezoidal": [16, 16]}  # as the user ran them
    assert {r.steps for r in comparison.runs} == {8}  # not 6: the last logged training step (every 3)
    assert comparison.common_budget == 8 and comparison.metric_at == 8  # trapezoidal validated at 8 and 16
    # Adam and IMEX Euler are the same method: neither is ahead of the other, on any seed
    assert comparison.winner not in ("adam", "imex_euler")
    assert comparison.wins["adam"] == comparison.wins["imex_euler"] == 0
    markdown = (tmp_path / "report" / "results.md").read_text()
    assert len(table(markdown)) == 4 and "**Unequal budgets**" in markdown


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


def test_a_resumed_runs_rows_replace_those_logged_after_its_checkpoint(tmp_path):
    """A run killed after step 5, resumed from its checkpoint at step 3: the resumed file's
    rows (from step 3 on) replace the first file's rows from step 3 on, in order."""
    import os

    from lightning_imex.compare.runs import _metric_rows

    first, resumed = tmp_path / "csv" / "metrics.csv", tmp_path / "csv" / "resumed_1" / "metrics.csv"
    resumed.parent.mkdir(parents=True)
    first.write_text("step,train/loss_step\n" + "".join(f"{s},{s}.0\n" for s in range(6)))
    resumed.write_text("step,train/loss_step\n" + "".join(f"{s},{s}.5\n" for s in range(3, 8)))
    os.utime(first, (1, 1))  # written before the resumed file
    rows = _metric_rows(tmp_path)
    assert [(r["step"], r["train/loss_step"]) for r in rows] == (
        [(str(s), f"{s}.0") for s in range(3)] + [(str(s), f"{s}.5") for s in range(3, 8)])
