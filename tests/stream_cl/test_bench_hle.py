"""``stream-cl bench hle`` end to end on tiny CIFAR-shaped files: report files, levels, merging methods."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stream_cl.bench import hle
from stream_cl.bench.provenance import provenance
from stream_cl.cli import main


def _write_cifar_like(folder, n_fine: int = 10, per_class: int = 6, test_per_class: int = 2) -> None:
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(n_fine), per_class)
    yt = np.repeat(np.arange(n_fine), test_per_class)
    names = {"fine_label_names": [f"f{c}" for c in range(n_fine)], "coarse_label_names": [f"c{c}" for c in range(5)]}
    (folder / "cifar100_label_map.json").write_text(json.dumps(names))

    def images(n: int) -> np.ndarray:
        return rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)

    np.savez_compressed(folder / "cifar100.part1.npz", x_train=images(0), y_train=y[:0], y_train_coarse=y[:0])
    np.savez_compressed(
        folder / "cifar100.part2.npz",
        x_train=images(len(y)), y_train=y, y_train_coarse=y // 2,
        x_test=images(len(yt)), y_test=yt, y_test_coarse=yt // 2,
    )  # fmt: skip


def test_bench_hle_writes_per_level_reports_and_merges_methods(tmp_path) -> None:
    _write_cifar_like(tmp_path)
    out = tmp_path / "out"
    common = ["bench", "hle", "--setup", "single", "--runs", "2", "--data-dir", str(tmp_path), "--model", "mlp"]
    common += ["--buffer-size", "20", "--batch-size", "4", "--online-iter", "0.5", "--eval-period", "20"]
    common += ["--threads", "1", "--device", "cpu", "--out", str(out)]
    assert main([*common, "--method", "er"]) == 0
    report = out / "single"
    written = json.loads((report / "results.json").read_text())
    del written["protocol"]["protocol"]  # as reports written before presets: they ran the paper preset's knobs
    (report / "results.json").write_text(json.dumps(written))
    assert main([*common, "--method", "pl-fms"]) == 0
    doc = json.loads((report / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [("er", 0), ("er", 1), ("pl-fms", 0), ("pl-fms", 1)]
    for run in doc["runs"]:
        assert set(run["levels"]) == {"0", "1"} and run["stream_length"] == 60
        for level in run["levels"].values():
            assert 0.0 <= level["A_last"] <= 1.0 and level["curve"][-1][0] == 60
            assert level["A_last"] >= level["A_last_head_only"]  # the parent rule only adds hits
    assert set(doc["summary"]) == {"er", "pl-fms"} and doc["provenance"] == provenance()
    text = (report / "README.md").read_text()
    assert "| pl-fms | 1 |" in text and "43.7" in text
    assert (report / "accuracy.png").stat().st_size > 1000


def test_seeds_run_later_join_the_report_a_seed_run_again_replaces_its_run_another_protocol_is_refused(
    tmp_path, capsys
) -> None:
    _write_cifar_like(tmp_path)
    out = tmp_path / "out"
    common = ["bench", "hle", "--setup", "single", "--data-dir", str(tmp_path), "--model", "mlp", "--method", "er"]
    common += ["--buffer-size", "20", "--batch-size", "4", "--eval-period", "20", "--threads", "1", "--out", str(out)]
    assert main([*common, "--runs", "1"]) == 0
    first = json.loads((out / "single" / "results.json").read_text())["runs"]
    assert main([*common, "--seeds", "2", "1"]) == 0
    doc = json.loads((out / "single" / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in doc["runs"]] == [("er", 0), ("er", 1), ("er", 2)]
    assert doc["runs"][0] == first[0]
    assert "seeds 0, 1, 2" in (out / "single" / "README.md").read_text()
    assert main([*common, "--seeds", "1"]) == 0  # seed 1 again: its run is replaced, the others kept
    again = json.loads((out / "single" / "results.json").read_text())["runs"]
    assert [(r["method"], r["seed"]) for r in again] == [("er", 0), ("er", 2), ("er", 1)]
    assert again[2]["levels"] == doc["runs"][1]["levels"]  # the same seed learns the same
    before = (out / "single" / "results.json").read_text()
    assert main([*common, "--seeds", "3", "--eval-period", "10"]) == 2  # another protocol: refused before any run
    assert "eval_period 20 there, 10 here" in capsys.readouterr().err
    assert (out / "single" / "results.json").read_text() == before


def test_whole_tree_preset_fills_the_knobs_not_given_and_parallel_runs_equal_sequential_ones(tmp_path) -> None:
    _write_cifar_like(tmp_path)
    common = ["bench", "hle", "--protocol", "whole-tree", "--runs", "2", "--data-dir", str(tmp_path), "--model", "mlp"]
    common += ["--per-class", "4", "--buffer-size", "12", "--batch-size", "4", "--eval-period", "20", "--threads", "1"]
    common += ["--device", "cpu", "--method", "er", "er-hle"]
    assert main([*common, "--out", str(tmp_path / "seq")]) == 0
    assert main([*common, "--out", str(tmp_path / "par"), "--jobs", "2", "--name", "parallel"]) == 0
    seq = json.loads((tmp_path / "seq" / "single-whole-tree" / "results.json").read_text())
    par = json.loads((tmp_path / "par" / "parallel" / "results.json").read_text())
    protocol = seq["protocol"]
    assert protocol["protocol"] == "whole-tree" and protocol["per_class"] == 4 and protocol["buffer_size"] == 12
    assert protocol["online_iter"] == 1.0 and protocol["imp_update_period"] == 20  # from the preset
    assert protocol["test_per_class"] is None and protocol["width"] == 20
    for a, b in zip(seq["runs"], par["runs"], strict=True):  # same seeds, other processes: the same learning
        assert (a["method"], a["seed"], a["steps"]) == (b["method"], b["seed"], b["steps"])
        assert a["levels"] == b["levels"]
    steps = {r["method"]: r["steps"] for r in seq["runs"]}
    assert steps == {"er": 40 // 2, "er-hle": 40}  # ER: one step per 2-sample batch; ER-HLE: one per sample
    er, er_hle = seq["summary"]["er"], seq["summary"]["er-hle"]
    assert er["steps"] == [20.0, 0.0] and er_hle["learn_cpu_seconds"][0] > 0.0
    a_last = [r["levels"]["0"]["A_last"] for r in seq["runs"] if r["method"] == "er"]
    assert er["0"]["A_last"][1] == pytest.approx(float(np.std(a_last, ddof=1)))  # sample std, as bench accuracy
    text = (tmp_path / "seq" / "single-whole-tree" / "README.md").read_text()
    assert "| er-hle | 40 ± 0 | 2.0× |" in text and "seeds 0, 1 (preset `whole-tree`)" in text


def test_hparam_reaches_every_method_that_takes_it_and_the_report_says_so(tmp_path) -> None:
    _write_cifar_like(tmp_path)
    common = ["bench", "hle", "--protocol", "whole-tree", "--runs", "1", "--data-dir", str(tmp_path), "--model", "mlp"]
    common += ["--per-class", "4", "--buffer-size", "12", "--batch-size", "4", "--eval-period", "20", "--threads", "1"]
    common += ["--device", "cpu", "--method", "er", "er-hle", "--out", str(tmp_path / "out")]
    # iterations: ER's only (3 steps per batch); lr_decay: ER-HLE's only; cutmix_prob=0 later wins over 1
    given = ["--hparam", "iterations=3", "--hparam", "lr_decay=0.5", "--hparam", "cutmix_prob=1", "--hparam"]
    assert main([*common, *given, "cutmix_prob=0"]) == 0
    doc = json.loads((tmp_path / "out" / "single-whole-tree" / "results.json").read_text())
    assert doc["protocol"]["hparams"] == {"iterations": 3, "lr_decay": 0.5, "cutmix_prob": 0}
    runs = {r["method"]: r for r in doc["runs"]}
    assert runs["er"]["hparams"] == {"iterations": 3} and runs["er"]["steps"] == 3 * 40 // 2
    assert runs["er-hle"]["hparams"] == {"lr_decay": 0.5, "cutmix_prob": 0} and runs["er-hle"]["steps"] == 40
    text = (tmp_path / "out" / "single-whole-tree" / "README.md").read_text()
    assert "set by `--hparam`: `iterations=3` (er), `lr_decay=0.5` (er-hle), `cutmix_prob=0` (er-hle)." in text
    # a run with other hyper-parameters cannot join the report: refused before it starts, the report kept
    before = (tmp_path / "out" / "single-whole-tree" / "results.json").read_text()
    assert main([*common[:-5], "--method", "er-hle", "--out", str(tmp_path / "out")]) == 2
    assert (tmp_path / "out" / "single-whole-tree" / "results.json").read_text() == before
    assert main([*common[:-5], "--method", "er-hle", "--out", str(tmp_path / "out"), "--name", "defaults"]) == 0
    doc = json.loads((tmp_path / "out" / "defaults" / "results.json").read_text())
    assert [r["method"] for r in doc["runs"]] == ["er-hle"] and doc["protocol"]["hparams"] == {}
    assert "other hyper-parameters: each method's defaults" in (tmp_path / "out" / "defaults" / "README.md").read_text()


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("no_such_knob=1", "unknown hyper-parameter(s) no_such_knob for methods er, er-hle"),
        ("online_iter=2", "--hparam online_iter: the bench sets it from --online-iter"),
        ("seed=4", "--hparam seed: the bench sets it from --runs"),
        ("pseudo_label", "invalid parse_hparam value"),
    ],
)
def test_hparam_that_no_chosen_method_takes_is_a_usage_error(tmp_path, capsys, flag: str, message: str) -> None:
    _write_cifar_like(tmp_path)
    argv = ["bench", "hle", "--data-dir", str(tmp_path), "--method", "er", "er-hle", "--out", str(tmp_path / "out")]
    try:
        code = main([*argv, "--hparam", flag])
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything ran


def test_an_interrupted_run_continues_from_its_last_evaluation_and_learns_exactly_the_uninterrupted_run(
    tmp_path, monkeypatch, capsys
) -> None:
    _write_cifar_like(tmp_path)
    common = ["bench", "hle", "--setup", "single", "--runs", "1", "--data-dir", str(tmp_path), "--model", "mlp"]
    common += ["--buffer-size", "12", "--batch-size", "4", "--eval-period", "20", "--threads", "1", "--device", "cpu"]
    common += ["--method", "pl-fms", "er"]
    assert main([*common, "--out", str(tmp_path / "whole")]) == 0
    real_save = hle._save_progress
    out = tmp_path / "stopped"

    def stop_at(method: str, position: int) -> None:  # the machine stops right after that save
        def save(path, state) -> None:
            real_save(path, state)
            if path.name.startswith(f"{method}-") and state.get("position") == position:
                raise KeyboardInterrupt

        monkeypatch.setattr(hle, "_save_progress", save)
        with pytest.raises(KeyboardInterrupt):
            main([*common, "--out", str(out)])
        assert not (out / "single" / "results.json").exists()

    stop_at("pl-fms", 40)  # mid-run
    stop_at("er", 20)  # pl-fms finished this time: its run waits in .progress for the report
    monkeypatch.setattr(hle, "_save_progress", real_save)
    capsys.readouterr()
    assert main([*common, "--out", str(out)]) == 0
    assert "er seed 0 continues from sample 20" in capsys.readouterr().err
    whole = json.loads((tmp_path / "whole" / "single" / "results.json").read_text())["runs"]
    resumed = json.loads((out / "single" / "results.json").read_text())["runs"]
    for a, b in zip(whole, resumed, strict=True):
        assert (a["method"], a["seed"], a["steps"]) == (b["method"], b["seed"], b["steps"])
        assert a["levels"] == b["levels"]  # the same curves, accuracies and forgetting, to the last digit
    assert [r.get("resumed_at") for r in resumed] == [[40], [20]]
    assert resumed[0]["learn_cpu_seconds"] > 0.0 and not (out / "single" / ".progress").exists()


def test_progress_of_another_protocol_or_a_damaged_file_is_not_continued(tmp_path, capsys) -> None:
    _write_cifar_like(tmp_path)
    out = tmp_path / "out"
    common = ["bench", "hle", "--setup", "single", "--runs", "1", "--data-dir", str(tmp_path), "--model", "mlp"]
    common += ["--buffer-size", "12", "--batch-size", "4", "--eval-period", "20", "--threads", "1", "--device", "cpu"]
    common += ["--method", "er", "--out", str(out)]
    progress = out / "single" / ".progress" / "er-seed0.pt"
    progress.parent.mkdir(parents=True)
    progress.write_bytes(b"not a checkpoint")
    assert main(common) == 0
    assert "unreadable" in capsys.readouterr().err
    clean = json.loads((out / "single" / "results.json").read_text())["runs"][0]
    assert clean["steps"] == 30 and "resumed_at" not in clean and not progress.exists()
    hle._save_progress(progress, {"key": "a run of other code", "finished": clean | {"steps": 1}})
    assert main(common) == 0
    assert "another protocol's or code's run" in capsys.readouterr().err
    assert json.loads((out / "single" / "results.json").read_text())["runs"][0]["steps"] == 30
