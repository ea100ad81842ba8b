"""--sweep: members equal separate runs, the summary ranks them, bad specs refused."""

import csv
import dataclasses
import json
import pathlib

import numpy as np
import pytest

from experiments import _sweep, two_moons
from jaxtrain.rundir import checkpoint
from tests.helpers import tree_allclose

BASE = two_moons.Config(samples=200, epochs=3, batch_size=32)


def sweep_config(workdir, *specs, trials=0, seed=0, **changes):
  return dataclasses.replace(BASE, workdir=workdir, **changes,
                             sweep=_sweep.SweepConfig(tuple(specs), trials, seed))


def rows(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def numbers(path):
  """metrics.csv without the timing column."""
  return np.asarray([[float(v) for k, v in r.items() if k != "seconds"] for r in rows(path)])


def test_three_learning_rates_equal_three_separate_runs(tmp_path, capsys):
  two_moons.main(sweep_config(tmp_path / "sweep", "learning_rate=0.02,0.1,0.5"))
  out = capsys.readouterr().out
  assert "train in one vmapped program" in out
  summary = rows(tmp_path / "sweep" / "summary.csv")
  assert [r["program"] for r in summary] == ["vmapped"] * 3
  best_by_member = {}
  for lr in ("0.02", "0.1", "0.5"):
    member = next((tmp_path / "sweep" / "members").glob(f"*-learning_rate={lr}"))
    alone = tmp_path / f"alone{lr}"
    two_moons.main(dataclasses.replace(BASE, workdir=alone, optim=dataclasses.replace(
        BASE.optim, learning_rate=float(lr))))
    np.testing.assert_allclose(numbers(member / "metrics.csv"), numbers(alone / "metrics.csv"),
                               rtol=1e-5, atol=1e-6)
    # The member's directory is a run directory: config.json and the best
    # epoch's checkpoint are what the separate run has.
    assert (json.loads((member / "config.json").read_text())["config"]
            == json.loads((alone / "config.json").read_text())["config"] | {
                "workdir": str(member)})
    assert checkpoint.best_epoch(member) == pytest.approx(checkpoint.best_epoch(alone))
    assert tree_allclose(checkpoint.load(member, "best").params,
                         checkpoint.load(alone, "best").params, rtol=1e-5, atol=1e-6)
    best_by_member[member.name] = min(float(r["val_loss"]) for r in rows(alone / "metrics.csv"))
  best = min(best_by_member, key=best_by_member.get)
  assert [r["member"] for r in summary] == sorted(best_by_member, key=best_by_member.get)
  assert summary[0]["rank"] == "1" and summary[0]["member"] == best
  assert float(summary[0]["best_val_loss"]) == pytest.approx(best_by_member[best], rel=1e-5)
  assert f"best: {best}," in out and "checkpoint.load(" in out
  assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 0


def test_members_of_other_shapes_train_alone_bit_for_bit_and_rerun_resumes(tmp_path, capsys):
  workdir = tmp_path / "sweep"
  config = sweep_config(workdir, "hidden=4,8")
  two_moons.main(config)
  assert "vmapped" not in capsys.readouterr().out
  member = workdir / "members" / "01-hidden=8"
  two_moons.main(dataclasses.replace(BASE, workdir=tmp_path / "alone", hidden=(8,)))
  cut = [line.rsplit(",", 1)[0] for line in (member / "metrics.csv").read_text().splitlines()]
  assert cut == [line.rsplit(",", 1)[0]
                 for line in (tmp_path / "alone" / "metrics.csv").read_text().splitlines()]
  before = {p: p.read_bytes() for p in workdir.rglob("metrics.csv")}
  summary = (workdir / "summary.csv").read_text()
  two_moons.main(config)  # finished: nothing trains again
  assert {p: p.read_bytes() for p in workdir.rglob("metrics.csv")} == before
  assert (workdir / "summary.csv").read_text() == summary  # how each member trained, too


def test_random_search_draws_from_its_seed_within_the_ranges():
  config = sweep_config(pathlib.Path("unused"), "learning_rate=log:0.001:1", "hidden=4,8", "epochs=2:5",
                        trials=6, seed=3)
  drawn = _sweep.members(config)
  assert [m.name for m in drawn] == [m.name for m in _sweep.members(config)]
  assert [m.name for m in drawn] != [m.name for m in _sweep.members(
      dataclasses.replace(config, sweep=_sweep.SweepConfig(config.sweep.sweep, 6, 4)))]
  for m in drawn:
    assert 0.001 <= m.config.optim.learning_rate <= 1 and m.config.hidden in ((4,), (8,))
    assert m.config.epochs in (2, 3, 4, 5) and m.config.workdir.parent.name == "members"
    assert m.config.sweep == _sweep.SweepConfig()
  rates = np.log10([m.config.optim.learning_rate for m in drawn])
  assert rates.min() < -1.5 < rates.max()  # log-uniform over three decades


@pytest.mark.parametrize("specs, trials, message", [
    (["learning_rate"], 0, "expected FIELD=VALUES"),
    (["nosuch=1,2"], 0, "no field 'nosuch'"),
    (["workdir=a,b"], 0, "no field 'workdir'"),
    (["learning_rate=0.1:1"], 0, "add --sweep-trials"),
    (["learning_rate=log:0:1"], 4, "LO > 0"),
    (["precision=fp8"], 0, "fp8"),
    (["learning_rate=0.1,0.1"], 0, "repeated"),
    (["learning_rate=0.1", "learning-rate=0.2"], 0, "swept twice"),
    (["optimizer=sgd:adam"], 3, "numeric field"),
    ([], 3, "need --sweep"),
    (["hidden=4,8"], 5, r"--sweep-trials 5 drew only 2 distinct members"),
])
def test_bad_sweeps_are_refused_naming_the_spec(tmp_path, specs, trials, message):
  with pytest.raises(ValueError, match=message):
    _sweep.members(sweep_config(tmp_path / "s", *specs, trials=trials))


def test_a_random_search_draws_again_until_its_members_are_distinct(tmp_path):
  # Five integers: five trials find them all (repeats drawn again), six cannot.
  drawn = _sweep.members(sweep_config(tmp_path / "s", "batch_size=16:20", trials=5))
  assert sorted(m.config.batch_size for m in drawn) == [16, 17, 18, 19, 20]
  with pytest.raises(ValueError, match=r"--sweep-trials 6 drew only 5 distinct members"):
    _sweep.members(sweep_config(tmp_path / "s", "batch_size=16:20", trials=6))


def test_a_bad_member_is_refused_before_anything_is_written(tmp_path):
  with pytest.raises(ValueError, match=r"sweep member 01-batch_size=0: batch_size"):
    two_moons.main(sweep_config(tmp_path / "s", "batch_size=16,0"))
  assert not (tmp_path / "s").exists()


def test_a_run_directory_or_another_sweep_is_not_clobbered(tmp_path):
  two_moons.main(sweep_config(tmp_path / "s", "seed=0,1", epochs=1))
  before = (tmp_path / "s" / "sweep.json").read_text()
  with pytest.raises(ValueError, match="holds a different sweep"):
    two_moons.main(sweep_config(tmp_path / "s", "seed=0,2", epochs=1))
  assert (tmp_path / "s" / "sweep.json").read_text() == before
  # Another checkpoint cadence or more epochs: the same sweep, continued.
  from jaxtrain.rundir.checkpoint import CheckpointConfig

  two_moons.main(sweep_config(tmp_path / "s", "seed=0,1", epochs=2,
                              checkpoint=CheckpointConfig(every_epochs=1)))
  assert len(rows(tmp_path / "s" / "members" / "00-seed=0" / "metrics.csv")) == 2
  with pytest.raises(ValueError, match=r"holds a sweep \(sweep\.json\)"):  # a plain run
    two_moons.main(dataclasses.replace(BASE, workdir=tmp_path / "s", epochs=1))
  assert not (tmp_path / "s" / "metrics.csv").exists()
  two_moons.main(dataclasses.replace(BASE, workdir=tmp_path / "run", epochs=1))
  with pytest.raises(ValueError, match="holds a run"):
    two_moons.main(sweep_config(tmp_path / "run", "seed=0,1", epochs=1))
