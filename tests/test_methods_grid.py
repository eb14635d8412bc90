"""benchmarks/methods_grid.py and benchmarks/style_oracle.py on real in-process runs: the grid's CSV holds the gains
of its runs, and the style-pooled bound is scored on the same sites and by the same measure as a run's
personalization, so the paired differences it prints against a grid mean what they say."""

from __future__ import annotations

import csv

import pytest

from benchmarks import methods_grid
from benchmarks.demo_seeds import confidence_interval, run_seed
from benchmarks.methods_grid import config_folder, gains
from benchmarks.style_oracle import main
from tests.test_predict import write_coloured_folder


@pytest.fixture(scope="module")
def grid(tiny_clip, tmp_path_factory):
    """A grid folder with two finished PromptFL runs (seeds 0 and 1, 2 clients a domain), and their overrides."""
    tmp = tmp_path_factory.mktemp("grid")
    data = write_coloured_folder(tmp / "data", per_class=12)
    overrides = (
        f"dataset=folder dataset.root={data} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds=2 training.batch_size=8 cache_dir={tmp / 'cache'}"
    )
    runs = [
        run_seed(seed, f"{overrides} method=promptfl dataset.clients_per_domain=2", config_folder(tmp, "2", "P"))
        for seed in (0, 1)
    ]
    return tmp, overrides, runs


def test_the_grids_csv_holds_its_runs_gains(grid, capsys):
    folder, overrides, runs = grid
    # the runs are finished, so the grid reads them and runs nothing
    assert (
        methods_grid.main(
            [
                "--seeds",
                "0",
                "1",
                "--settings",
                "2",
                "--configs",
                "P=method=promptfl",
                "--out",
                str(folder),
                "--selection",
                "last",
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(open(folder / "grid.csv")))
    assert [(r["setting"], r["configuration"], r["seeds"]) for r in rows] == [("2", "P", "0 1")]
    held, pers = gains(runs, "last")
    for name, values in (("held_out_gain", held), ("personalization_gain", pers)):
        mean, low, high = confidence_interval(values)
        assert [float(rows[0][name + end]) for end in ("", "_low", "_high")] == pytest.approx(
            [mean, low, high], abs=1e-4
        )
    assert int(rows[0]["parameters_sent"]) == runs[0]["trained_parameters"]
    assert "| 2 | P |" in capsys.readouterr().out


def test_the_bounds_zero_shot_is_the_runs_and_pairs_with_a_grid(grid, capsys):
    folder, overrides, runs = grid
    table = folder / "oracle.csv"
    argv = ["--seeds", "0", "1", "--settings", "2", "--overrides", overrides, "--grid", str(folder), "--labels", "P"]
    assert main([*argv, "--csv", str(table)]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2 and rows[1].startswith("| 2 | P | ")
    written = list(csv.DictReader(open(table)))
    assert [(r["setting"], r["seed"]) for r in written] == [("2", "0"), ("2", "1")]
    for row, run in zip(written, runs):  # the same sites' test splits, the same pooling by domain: to the last digit
        assert 0 <= float(row["style_pooled"]) <= 1
        assert float(row["zero_shot"]) == pytest.approx(
            run["selections"]["last"]["zero_shot_train_domains_mean"], abs=1e-6
        )

    with pytest.raises(SystemExit, match=r"no finished run of seed\(s\) \[2\]"):
        main(["--seeds", "1", "2", "--settings", "2", "--overrides", overrides, "--grid", str(folder), "--labels", "P"])

    for bad, says in ((["--others", "1.5"], "--others is a share"), (["--labels", "P"], "give its folder with --grid")):
        with pytest.raises(SystemExit):
            main(["--seeds", "0", "1", *bad])
        assert says in capsys.readouterr().err
