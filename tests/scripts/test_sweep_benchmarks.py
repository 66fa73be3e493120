"""The sweep benchmarks (forgetting frontier, SDPO lambda): their summaries, the results file, and --smoke end to end."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import forgetting_frontier  # noqa: E402
import sdpo_lambda  # noqa: E402
from sweeps import as_flags, write_marked_block  # noqa: E402


def frontier_record(method, learning_rate, seed, heldout, known, arc, sciq):
    return {"method": method, "learning_rate": learning_rate, "seed": seed, "train_cpu_s": 10.0, "eval_cpu_s": 1.0,
            "accuracy": {"heldout": heldout, "known": known, "arc_easy": arc, "sciq": sciq}}


def test_frontier_means_over_seeds_and_their_range():
    records = [frontier_record("sft", 1e-4, 42, 0.5, 0.9, 0.6, 0.3), frontier_record("sft", 1e-4, 7, 0.7, 0.6, 0.6, 0.3),
               frontier_record("sdft", 1e-4, 42, 0.2, 1.0, 0.5, 0.5)]
    rows = {row["method"]: row for row in forgetting_frontier.summarize(records)}
    assert rows["sft"]["new_task"] == pytest.approx(0.6) and rows["sft"]["new_task_range"] == [0.5, 0.7]
    assert rows["sft"]["prior"] == pytest.approx(((0.9 + 0.6 + 0.3) / 3 + (0.6 + 0.6 + 0.3) / 3) / 2)
    assert rows["sft"]["seeds"] == [42, 7] and rows["sdft"]["prior"] == pytest.approx(2 / 3)
    base = {"accuracy": {"heldout": 0.0, "known": 1.0, "arc_easy": 0.6, "sciq": 0.5}}
    table = forgetting_frontier.markdown(forgetting_frontier.summarize(records), base)
    assert "| base | - | - | 0.000 | 0.700 |" in table
    assert "| sft | 0.0001 | 2 | 0.600 (0.500-0.700) | 0.550 (0.500-0.600) |" in table


def test_frontier_plot_draws_methods_and_variants(tmp_path):
    records = [frontier_record("sft", 1e-4, 42, 0.5, 0.9, 0.6, 0.3), frontier_record("sdft", 1e-4, 42, 0.2, 1.0, 0.5, 0.5),
               frontier_record("sdft", 3e-4, 42, 0.4, 0.8, 0.5, 0.5),
               frontier_record("sdft+temperature_0.7", 1e-4, 42, 0.3, 0.9, 0.5, 0.5)]
    base = {"accuracy": {"heldout": 0.0, "known": 1.0, "arc_easy": 0.6, "sciq": 0.5}}
    forgetting_frontier.plot(forgetting_frontier.summarize(records), records, base, tmp_path / "frontier.png")
    assert (tmp_path / "frontier.png").stat().st_size > 10_000


def test_sdft_variants_change_one_setting(tmp_path):
    command, model_dir = forgetting_frontier.train_command("sdft+authors_template", 1e-4, 7, tmp_path, None, False)
    assert "--teacher_template" not in command  # removed: the script's default, the authors' template
    assert command[command.index("--learning_rate") + 1] == "0.0001" and model_dir.name == "checkpoint-32"
    command, _ = forgetting_frontier.train_command("sdft+generations_4", 1e-4, 7, tmp_path, None, False)
    assert command[command.index("--num_generations") + 1] == "4"
    assert command[command.index("--prompts_per_step") + 1] == "1"


def test_lambda_summary_averages_steps_over_seeds():
    def record(seed, avg, success, teacher):
        return {"grpo_lambda": 0.9, "seed": seed, "heldout": {"avg": avg, "pass": avg}, "train_cpu_s": 5.0,
                "eval_cpu_s": 1.0, "steps": {"success": success, "teacher": teacher, "completion_length": [4, 6]}}

    (row,) = sdpo_lambda.summarize([record(42, 0.5, [0.1, 0.3], [0.2, 0.4]), record(7, 0.7, [0.3, 0.5], [0.0, 0.2])])
    assert row["heldout_avg"] == pytest.approx(0.6) and row["heldout_range"] == [0.5, 0.7]
    assert row["success_by_step"] == pytest.approx([0.2, 0.4]) and row["teacher_by_step"] == pytest.approx([0.1, 0.3])
    table = sdpo_lambda.markdown([row], {"heldout": {"avg": 0.25, "pass": 0.5}})
    assert "| 0.9 | hybrid | 2 | 0.600 (0.500-0.700) | 0.600 | 0.200 -> 0.400 | 0.200 | 6.0 | 5 |" in table


def test_lambda_plot_has_its_three_panels(tmp_path):
    def record(grpo_lambda, seed, avg):
        return {"grpo_lambda": grpo_lambda, "seed": seed, "heldout": {"avg": avg, "pass": avg}, "train_cpu_s": 5.0,
                "eval_cpu_s": 1.0, "steps": {"success": [0.1, 0.2], "teacher": [0.3, 0.4], "completion_length": [4, 5]}}

    records = [record(0.0, 42, 0.2), record(0.9, 42, 0.6), record(0.9, 7, 0.5), {**record(0.0, 42, 0.4), "variant": "lr_1e-5"}]
    rows = sdpo_lambda.summarize(records)
    assert [(row["variant"], row["grpo_lambda"]) for row in rows] == [(None, 0.0), (None, 0.9), ("lr_1e-5", 0.0)]
    sdpo_lambda.plot(sdpo_lambda.summarize(records), records, {"heldout": {"avg": 0.3, "pass": 0.5}},
                     tmp_path / "lambda.png")
    assert (tmp_path / "lambda.png").stat().st_size > 10_000


def test_results_block_is_replaced_between_its_markers_only(tmp_path):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Results\n\nolder text\n")
    write_marked_block(results, "forgetting_frontier", "The frontier", "table one\n")
    assert "## The frontier" in results.read_text() and "table one" in results.read_text()
    results.write_text(results.read_text() + "\nprose written by hand\n")
    write_marked_block(results, "forgetting_frontier", "The frontier", "table two\n")
    text = results.read_text()
    assert "table one" not in text and "table two" in text and text.count("## The frontier") == 1
    assert text.startswith("# Results\n\nolder text\n") and text.endswith("prose written by hand\n")


def test_flags_are_written_in_order():
    assert as_flags({"learning_rate": 1e-4, "gradient_checkpointing": False}) == [
        "--learning_rate", "0.0001", "--gradient_checkpointing", "False"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["forgetting_frontier.py", "sdpo_lambda.py"])
def test_smoke_runs_the_whole_pipeline(script):
    pytest.importorskip("trl", reason="the SFT baseline needs trl (pip install -r requirements-bench.txt)")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--smoke"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| base |" in done.stdout and "plot:" in done.stdout
