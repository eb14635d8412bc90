"""benchmarks/style_oracle.py: the style-pooled bound is scored on the same sites and by the same measure as a run's
personalization, so the paired differences it prints against a grid mean what they say."""

from __future__ import annotations

import pytest

from benchmarks.demo_seeds import run_seed
from benchmarks.methods_grid import config_folder
from benchmarks.style_oracle import main, style_oracle
from tests.test_predict import write_coloured_folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_coloured_folder(tmp_path_factory.mktemp("data"), per_class=12)


def test_the_bounds_zero_shot_is_the_runs_and_pairs_with_a_grid(tiny_clip, data, tmp_path, capsys):
    overrides = (
        f"dataset=folder dataset.root={data} dataset.held_out=sketch model.name_or_path={tiny_clip} "
        f"training.rounds=2 training.batch_size=8 cache_dir={tmp_path / 'cache'}"
    )
    grid = tmp_path / "grid"
    for seed in (0, 1):
        run = run_seed(seed, f"{overrides} method=promptfl dataset.clients_per_domain=2", config_folder(grid, "2", "P"))
        zero_shot, pooled = style_oracle(seed, "2", overrides)
        # the same sites' test splits, the same pooling by domain: zero-shot to the last digit
        assert zero_shot == pytest.approx(run["selections"]["last"]["zero_shot_train_domains_mean"], abs=1e-6)
        assert 0 <= pooled <= 1

    assert (
        main(["--seeds", "0", "1", "--settings", "2", "--overrides", overrides, "--grid", str(grid), "--labels", "P"])
        == 0
    )
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 2 |")]
    assert len(rows) == 2 and rows[1].startswith("| 2 | P | ")

    with pytest.raises(SystemExit, match=r"no finished run of seed\(s\) \[2\]"):
        main(["--seeds", "1", "2", "--settings", "2", "--overrides", overrides, "--grid", str(grid), "--labels", "P"])

    with pytest.raises(SystemExit):
        main(["--seeds", "0", "1", "--others", "1.5"])
    assert "--others is a share" in capsys.readouterr().err
