"""`posettp reproduce` at toy scale: each experiment prints its table, writes JSON/markdown/PNG, and resumes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # trains 4 toy models and runs every experiment: about 80 s
TOY = ["train.max_steps=2", "train.batch_size=4", "ttp.steps=2", "ttp.batch_size=2", "ttp.min_pose_signal=0",
       "ttp.signal_frames=2"]


def posettp(*args: str, ok: bool = True) -> str:
    proc = subprocess.run([sys.executable, "-m", "posettp.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduce")
    data = root / "data"
    # 6 persons: 3 train, 1 val, 2 test; each test person gets 12 unlabeled extra frames (for fig4)
    posettp("synth", "--out", str(data), "--persons", "6", "--frames", "6", "--size", "64", "--extra-frames", "12")
    out = root / "out"

    def reproduce(experiment: str, *extra: str, ok: bool = True, jobs: int = 1, to: Path = out,
                  flags: tuple[str, ...] = ()) -> str:
        sets = [a for kv in TOY + [f"data.url={data}", *extra] for a in ("--set", kv)]
        return posettp("reproduce", experiment, "--config", "configs/synth_small.yaml", *sets, "--seeds", "1",
                       "--jobs", str(jobs), "--out", str(to), *flags, ok=ok)
    return reproduce, out


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_table1_trains_every_variant_and_resumes_from_its_cache(toy):
    reproduce, out = toy
    printed = reproduce("table1", jobs=2)
    assert "models and evaluations (2 jobs)" in printed
    assert "| method | w/o TTP | online TTP | offline TTP |" in printed
    result = json.loads((out / "table1.json").read_text())["results"]
    assert set(result) == {"baseline", "shared_rotation", "shared_keypoint", "transformer"}
    for variant, row in result.items():
        assert set(row) == ({"none"} if variant == "baseline" else {"none", "online", "offline"})
        assert 0 <= row["none"]["pck@0.2_mean"] <= 1
    offline = result["transformer"]["offline"]
    assert offline["vs_flip_tested"]["pairs"] == 2 and offline["vs_plain"]["persons"] == 2  # 2 test persons x 1 seed
    # without the flip test in the run, its TTP gain over the plain model is the paired gain over "w/o TTP"
    assert offline["vs_plain"]["gain_mean"] == pytest.approx(offline["pck@0.2_mean"] - row_none(result))
    assert "| transformer | offline |" in printed and "| method | scenario | vs flip-tested model |" in printed
    assert "- transformer offline: each person's gain over the flip-tested model (mean over seeds)" in printed
    assert json.loads((out / "config.json").read_text())["train"]["max_steps"] == 2
    cached = sorted((out / "models").glob("*/model.safetensors")) + sorted((out / "evals").glob("*.json"))
    assert len(cached) == 4 + 4 * 2 + 3 * 2  # models; w/o TTP with and without the flip test; 3 variants x 2 TTP
    stamps = [p.stat().st_mtime_ns for p in cached]
    table = printed.split("\ntable1:")[0]
    assert reproduce("table1").split("\ntable1:")[0] == table
    assert [p.stat().st_mtime_ns for p in cached] == stamps, "a resumed run retrained or re-evaluated"
    refused = reproduce("table1", "train.max_steps=3", ok=False)
    assert "made with other settings (train.max_steps); use another --out" in refused


def row_none(result: dict) -> float:
    return result["transformer"]["none"]["pck@0.2_mean"]


def test_inference_settings_reuse_the_models_and_evaluate_again(toy):
    """model.decode and model.flip_test change predictions, not training: the models stay, the evaluations are
    redone and kept apart."""
    reproduce, out = toy
    reproduce("table1")  # synth_small decodes with dark
    models = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/model.safetensors")}

    def evaluations():
        return {p.name for p in (out / "evals").glob("*.json")}

    dark = evaluations()
    assert dark and all("-dark" in name for name in dark)
    ttp = {name for name in dark if "-online" in name or "-offline" in name}
    assert ttp and not any("-fliptest" in name for name in ttp)  # the run's inference: no flip test
    # without TTP each model is scored both ways: the flip-tested model is what a TTP gain is measured against
    assert {n.replace("-fliptest", "") for n in dark - ttp if "-fliptest" in n} == dark - ttp - {
        n for n in dark - ttp if "-fliptest" in n}
    before = evaluations()
    reproduce("table1", "model.decode=quarter")  # every evaluation again, named apart
    new = evaluations() - before
    assert len(new) == len(dark) and not any("-dark" in name for name in new)
    before = evaluations()
    reproduce("table1", "model.flip_test=true")  # only the TTP evaluations are new: the rest are cached
    new = evaluations() - before
    assert len(new) == len(ttp) and all("-dark-fliptest" in name for name in new), new
    assert {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/model.safetensors")} == models
    assert json.loads((out / "config.json").read_text())["model"]["flip_test"] is True


def test_table1_of_chosen_variants_trains_only_those(toy, tmp_path):
    reproduce, _ = toy
    out = tmp_path / "two"
    printed = reproduce("table1", jobs=2, to=out, flags=("--variants", "transformer,baseline"))
    assert "| transformer |" in printed and "| shared_rotation |" not in printed
    assert set(json.loads((out / "table1.json").read_text())["results"]) == {"baseline", "transformer"}
    assert sorted(p.name for p in (out / "models").iterdir()) == ["baseline-s0", "transformer-s0"]
    alone = reproduce("table1", to=out, flags=("--variants", "transformer"))
    assert "| transformer |" in alone and "| baseline |" not in alone and "(+" not in alone.split("| transformer |")[1]


def test_other_persons_are_evaluated_apart_with_the_same_models(toy, tmp_path):
    """--eval-data: validation persons of their own seed are personalized on, the models trained once."""
    reproduce, _ = toy
    out = tmp_path / "val"
    val = tmp_path / "val-persons"
    posettp("synth", "--out", str(val), "--split", "val", "--persons", "2", "--frames", "6", "--size", "64",
            "--extra-frames", "12", "--seed", "5")
    on_test = reproduce("table1", to=out, flags=("--variants", "transformer"))
    models = {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/model.safetensors")}
    evals = {p.name for p in (out / "evals").glob("*.json")}
    on_val = reproduce("table1", "data.test_split=val", to=out, flags=("--variants", "transformer",
                                                                       "--eval-data", str(val)))
    assert f"({val}, split val)" in on_val and "split test" in on_test
    assert {p: p.stat().st_mtime_ns for p in (out / "models").glob("*/model.safetensors")} == models
    new = {p.name for p in (out / "evals").glob("*.json")} - evals
    assert len(new) == len(evals) and all("-p" in name for name in new)
    persons = {r["person_id"] for name in new for r in json.loads((out / "evals" / name).read_text())["persons"]}
    assert persons == {"s5-val-0000", "s5-val-0001"}


def test_parallel_jobs_compute_what_a_serial_run_computes(toy, tmp_path):
    """--jobs 2 (worker processes) and --jobs 1 (lazily, in order) train and evaluate the same things."""
    reproduce, out = toy
    reproduce("table2", jobs=2)
    serial = tmp_path / "serial"
    reproduce("table2", to=serial)
    assert (serial / "table2.md").read_text() == (out / "table2.md").read_text()
    evals = sorted((serial / "evals").glob("*.json"))
    assert len(evals) == 1 + 8  # w/o TTP, 4 iteration counts x with/without guard
    def outcome(path: Path) -> list:
        return [(r["person_id"], r["pck@0.2"], r["predictions"]) for r in json.loads(path.read_text())["persons"]]
    for path in evals:  # the same cache entries with the same per-person predictions and scores
        assert outcome(path) == outcome(out / "evals" / path.name)


def test_table2_has_four_iteration_counts_with_and_without_guard(toy):
    reproduce, out = toy
    printed = reproduce("table2")
    assert "| iterations | online, no guard | online, guard |" in printed
    result = json.loads((out / "table2.json").read_text())["results"]
    assert {f"it{i}-{g}" for i in (1, 2, 3, 4) for g in ("guard", "noguard")} <= set(result)
    # one update with the guard is synth_small's online TTP: Table 1's evaluation, not a second one
    assert not list((out / "evals").glob("*-it1-guard*")) and list((out / "evals").glob("*-it1-noguard*"))
    # Table 1's (table1.json may be quarter's, and the flip test's evaluations are named apart)
    [online] = [p for p in (out / "evals").glob("transformer-s0-online-dark-*.json") if "-fliptest" not in p.name]
    persons = json.loads(online.read_text())["persons"]
    assert result["it1-guard"]["pck@0.2"] == pytest.approx(sum(r["pck@0.2"] for r in persons) / len(persons))
    # each cell's gain over no TTP is paired by person, with its standard error over persons in the printed table
    for cell in ("it1-noguard", "it4-guard"):
        gain = result[cell]["vs_no_ttp"]
        assert gain["gain_mean"] == pytest.approx(result[cell]["pck@0.2"] - result["no_ttp"])
        assert gain["person_gain_min"] <= gain["gain_mean"] <= gain["person_gain_max"] and gain["persons"] == 2
        assert f"{gain['gain_mean'] * 100:+.1f} ± {gain['gain_se'] * 100:.1f}; worst person" in printed


def test_fig3_fig4_table5_write_their_pngs_and_tables(toy):
    reproduce, out = toy
    reproduce("fig3")
    fig3 = json.loads((out / "fig3.json").read_text())
    assert is_png(out / "fig3_online_gain.png")
    assert len(fig3["results"]["gain_per_frame"]) == 3 * 6  # 3 labeled videos of 6 frames per test person

    printed = reproduce("fig4")
    fig4 = json.loads((out / "fig4.json").read_text())["results"]
    assert fig4["counts"] == [10, 12]  # the counts the 12 extra frames allow
    assert all(v == v for v in fig4["gain_mean"])  # every count evaluated (no NaN)
    assert is_png(out / "fig4_gain_vs_frames.png") and "unlabeled frames" in printed

    printed = reproduce("table5")
    assert "| raw |" in printed and "| + Savitzky–Golay |" in printed
    assert set(json.loads((out / "table5.json").read_text())["results"]) == {
        "none", "online", "offline", "none_smoothed", "online_smoothed", "offline_smoothed"}
