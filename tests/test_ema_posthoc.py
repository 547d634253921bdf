"""Post-hoc EMA (EDM2): sigma_rel <-> gamma, the closed-form profile inner product against
quadrature, PowerEMA against the power-function average by hand, reconstruction on a real
fit (a tracked width exactly, an intermediate one against a directly tracked EMA), exact
resume, the CLI on an app run, bad inputs."""

from __future__ import annotations

import csv
import math

import lightning as L
import pytest
import torch
from test_app import run_app
from test_ema import Net, loader, trainer
from test_package import FRAMEWORKS, imported

from lightning_imex import posthoc_cli
from lightning_imex.callbacks import PostHocEMA
from lightning_imex.ema_posthoc import (PowerEMA, SnapshotError, find_snapshots, gamma_to_sigma_rel, profile_inner,
                                        reconstruct, sigma_rel_to_gamma, solve_coefficients)


def test_the_post_hoc_and_offload_cores_are_plain_torch():
    assert imported("lightning_imex.ema_posthoc, lightning_imex.ema_offload", FRAMEWORKS) == []


def test_sigma_rel_to_gamma_solves_the_cubic():
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01)  # EDM2's values
    assert sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)
    for s in (0.001, 0.03, 0.2, 0.288):
        assert gamma_to_sigma_rel(sigma_rel_to_gamma(s)) == pytest.approx(s, rel=1e-12)


def test_profile_inner_product_matches_quadrature():
    for (t_a, g_a), (t_b, g_b) in [((100, 6.9), (70, 17.0)), ((50, 0.5), (120, 3.0))]:
        n = 200_000
        tau = (torch.arange(n, dtype=torch.float64) + 0.5) * (min(t_a, t_b) / n)  # midpoints
        p = lambda t, g: (g + 1) * tau ** g / t ** (g + 1)  # noqa: E731
        assert profile_inner(t_a, g_a, t_b, g_b) == pytest.approx(float((p(t_a, g_a) * p(t_b, g_b)).sum())
                                                                  * min(t_a, t_b) / n, rel=1e-6)


def test_power_ema_is_the_power_function_average():
    thetas = [torch.randn(5, generator=torch.Generator().manual_seed(k)) for k in range(1, 31)]
    ema = PowerEMA([0.05, 0.2])
    for step in (1, 2, 3, 5, 10, 11, 20, 30):  # updates at some steps: the skipped ones count on the next weights
        ema.update([thetas[step - 1]], step)
    for gamma, average in zip(ema.gammas, ema.averages):
        # step s's weights held over (s - 1, s]; a skipped step's interval is its next update's
        by_hand, previous = torch.zeros(5, dtype=torch.float64), 0
        for step in (1, 2, 3, 5, 10, 11, 20, 30):
            by_hand += (step ** (gamma + 1) - previous ** (gamma + 1)) / 30 ** (gamma + 1) * thetas[step - 1].double()
            previous = step
        torch.testing.assert_close(average[0].double(), by_hand, rtol=1e-5, atol=1e-6)


def relative(a: dict, b: dict) -> float:
    keys = [k for k in b if b[k].is_floating_point()]
    difference = math.sqrt(sum(float((a[k].double() - b[k].double()).square().sum()) for k in keys))
    return difference / math.sqrt(sum(float(b[k].double().square().sum()) for k in keys))


def test_reconstruction_on_a_fit(tmp_path):
    """Tracked 0.05 and 0.10 with a snapshot every 10 steps of a 200-step fit: rebuilding 0.05
    gives its tracked EMA; 0.07 is within 1e-2 (relative L2) of a directly tracked 0.07 EMA."""
    tracked = PostHocEMA((0.05, 0.10), snapshot_every=10, dirpath=tmp_path / "snapshots")
    direct = PostHocEMA((0.07,), snapshot_every=200, dirpath=tmp_path / "direct")
    module = Net(batch_norm=True)
    trainer(max_steps=200, callbacks=[tracked, direct]).fit(module, loader(n=256))
    names = [name for name, _ in module.named_parameters()] + ["net.1.running_mean", "net.1.running_var"]
    as_state = lambda averages: dict(zip(names, averages))  # noqa: E731
    paths = [p for _, p in find_snapshots(tmp_path / "snapshots")]
    assert len(paths) == 20
    (at_005, at_007), residuals = reconstruct(paths, [0.05, 0.07])
    assert relative(at_005, as_state(tracked.ema.averages[0])) < 1e-3
    raw = dict(module.state_dict())
    errors = {}
    for every in (1, 2, 5):  # snapshots every 10, 20, 50 steps
        (rebuilt,), (residual,) = reconstruct(paths[every - 1::every], [0.07])
        errors[10 * every] = relative(rebuilt, as_state(direct.ema.averages[0])), residual
    print("\nsnapshot interval: (relative L2 error of the 0.07 rebuild, profile fit residual)", errors)
    print("  for scale, the 0.07 EMA against the raw weights:", relative(as_state(direct.ema.averages[0]), raw))
    assert errors[10][0] < 1e-2 and errors[10][0] == relative(at_007, as_state(direct.ema.averages[0]))
    assert at_005["net.1.num_batches_tracked"] == raw["net.1.num_batches_tracked"] == 200  # copied as it is
    assert residuals[0] < 1e-6


def fit_resume(tmp_path, ckpt_path=None, max_steps=8):
    posthoc = PostHocEMA((0.05, 0.10), snapshot_every=2, dirpath=tmp_path / "snapshots")
    run = trainer(tmp_path, max_steps=max_steps, enable_checkpointing=True,
                  callbacks=[posthoc, L.pytorch.callbacks.ModelCheckpoint(save_top_k=-1)])
    run.fit(Net(), loader(batch_size=64), ckpt_path=ckpt_path, weights_only=True if ckpt_path else None)
    return posthoc


@pytest.mark.filterwarnings("ignore:Experiment logs directory .* exists and is not empty")  # resumed in its folder
@pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty")
def test_resume_continues_exactly_and_drops_later_snapshots(tmp_path):
    straight = fit_resume(tmp_path)
    snapshots = {s: torch.load(p, weights_only=True) for s, p in find_snapshots(tmp_path / "snapshots")}
    assert sorted(snapshots) == [2, 4, 6, 8]
    # resume in the same folder from step 4, to step 6: the interrupted run's 6 and 8 are gone,
    # 6 is written again, the same
    resumed = fit_resume(tmp_path, ckpt_path=tmp_path / "checkpoints" / "epoch=3-step=4.ckpt", max_steps=6)
    again = {s: torch.load(p, weights_only=True) for s, p in find_snapshots(tmp_path / "snapshots")}
    assert sorted(again) == [2, 4, 6] and resumed.ema.step == 6 and straight.ema.step == 8
    for ours, theirs in zip(snapshots[6]["profiles"], again[6]["profiles"], strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    with pytest.raises(ValueError, match="holds snapshots of another run"):
        fit_resume(tmp_path)  # from step 0 into a folder with snapshots


@pytest.mark.parametrize("kwargs,match", [
    ({"sigma_rels": (0.05, 0.3)}, r"sigma_rels\[\] must be a number in \(0, 0.2887\)"),
    ({"sigma_rels": 0.05}, r"sigma_rels must be a list of widths"),
    ({"sigma_rels": ()}, r"sigma_rels must name at least one width"),
    ({"snapshot_every": 0}, r"snapshot_every must be an integer >= 1, got 0"),
    ({"snapshot_every": 10, "update_every": 3}, r"snapshot_every must be a multiple of update_every \(3\)"),
    ({"snapshot_dtype": "float16"}, "snapshot_dtype must be one of 'float32', 'bfloat16', got 'float16'"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostHocEMA(**kwargs)


def test_solve_and_reconstruct_refuse_what_they_cannot_use(tmp_path):
    coefficients, residuals = solve_coefficients([(100.0, 6.9)], [(100.0, 6.9)])
    assert coefficients.tolist() == [[pytest.approx(1.0)]] and residuals[0] < 1e-6
    (tmp_path / "step=000000001.pt").write_bytes(b"not a snapshot")
    with pytest.raises(SnapshotError, match="not a readable snapshot"):
        reconstruct([tmp_path / "step=000000001.pt"], [0.05])


@pytest.mark.parametrize("args,message", [
    (["--sigma-rel", "0.5"], "error: argument --sigma-rel: --sigma-rel must be a number in (0, 0.2887)"),
    (["--sigma-rel", "abc"], "error: argument --sigma-rel: --sigma-rel must be a number in (0, 0.2887)"),
    (["--sigma-rel", "0.05"], "error: RUN_DIR={run}: no post-hoc EMA snapshots (step=*.pt) in {run}/posthoc_ema"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        posthoc_cli.main([str(tmp_path), *args])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message.format(run=tmp_path) in lines[0], lines


@pytest.mark.slow  # one app process and a test loop per width
def test_cli_on_an_app_run(tmp_path, capsys):
    result = run_app(tmp_path, "trainer.max_epochs=null", "trainer.max_steps=30", "callbacks=[posthoc_ema]",
                     "callbacks.posthoc_ema.snapshot_every=10", "logger=none", "test=false", "hydra.run.dir=run")
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "rebuilt"
    posthoc_cli.main([str(tmp_path / "run"), "--sigma-rel", "0.03", "0.05", "0.08", "--out", str(out), "--evaluate"])
    printed = capsys.readouterr().out
    assert "3 snapshots (steps 10..30, tracked sigma_rel 0.05, 0.1)" in printed, printed
    last = torch.load(tmp_path / "run" / "posthoc_ema" / "step=000000030.pt", weights_only=True)
    tracked = dict(zip(last["names"], last["profiles"][0]))  # sigma_rel 0.05
    for s in ("0.030", "0.050", "0.080"):
        state = torch.load(out / f"sigma_rel={s}.pt", weights_only=True)
        assert set(state) == set(last["names"]) | set(last["other"])  # the module's whole state_dict
    assert relative(torch.load(out / "sigma_rel=0.050.pt", weights_only=True), tracked) < 1e-6
    with open(out / "posthoc_ema.csv") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["sigma_rel"]) for r in rows] == [0.03, 0.05, 0.08] and all(0 < float(r["test/acc"]) <= 1
                                                                              for r in rows)
    assert (out / "posthoc_ema.png").stat().st_size > 10_000
