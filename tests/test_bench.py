"""bench/: the GPU script on its tiny CPU shape, and the pieces of the sspo.py-vs-TRL benchmark."""
import importlib.util
import json
import os

import pytest

import sspo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_runs_tiny_on_cpu(tmp_path):
    """Every part of bench/gpu.py on its tiny shapes: sampling three ways, the training step in both layouts,
    and sspo.py as whole processes (TRL too where it is installed)."""
    gpu = load_bench("gpu")
    out = tmp_path / "gpu.json"
    report = gpu.run(tiny=True, out=str(out))
    assert json.loads(out.read_text())["train"]["params"] == report["train"]["params"]
    g = report["generation"]
    assert g["slots_work"] and g["graphs_answers_equal_eager_slots"]  # the block path samples what the slots do
    for name in ("graphs", "slots_eager", "hf_generate"):
        assert 0 < g[name]["new_tokens"] <= g["prompts"] * g["k"] * g["max_new_tokens"] and g[name]["new_tokens_per_s"] > 0
    assert g["graphs"]["new_tokens"] == g["hf_generate"]["new_tokens"]  # the same answers, by the paths
    assert 0 < g["graphs_share_of_bandwidth_limit"] < 1
    configs = report["train"]["configs"]
    assert [c["share_prompt"] for c in configs] == [False, True]
    assert configs[1]["fed_tokens_per_step"] < configs[1]["tokens_per_step"] == configs[0]["fed_tokens_per_step"]
    for r in configs:
        assert r["tokens_per_s"] > 0 and r["ref_tokens_per_s"] > 0 and r["mfu"] > 0 and r["peak_allocated_gib"] > 0
        # step 0: pi_theta = pi_t, so a = 0 and the sspo loss is eta^2 ((3/4 - 1/2)^2 + (3/10 - 1/2)^2) + a repulsion
        # <= 0.1 (up to float32 rounding of numbers near 1e5)
        assert r["first_loss"] == pytest.approx(102500, abs=0.2)
        assert r["last_loss"] < r["first_loss"]  # the steps train
    w = report["whole_processes"]
    for which in ("sspo", "sspo_shared"):
        assert w[which]["optimizer_steps"] == 2 and w[which]["timing"]["train_steps"] == 2  # 4 pairs, batch 2
        assert w[which]["first_step_loss"] == pytest.approx(0.5 / 1e-3 ** 2)  # sppo_hard at step 0: 2 (eta/2)^2
    assert w["sspo_shared"]["share_prompt_used"] and w["cli_loop_over_steady_step"] > 0


def test_gpu_flop_count_matches_a_hand_count():
    gpu = load_bench("gpu")
    tokenizer = gpu.word_tokenizer(512)
    shape = dict(gpu.TINY["train"])
    model = gpu.make_model(shape, tokenizer, "cpu")
    d, f, L, v, kv = shape["hidden"], shape["intermediate"], shape["layers"], shape["vocab"], shape["kv_heads"]
    head_dim = d // shape["heads"]
    body = L * (2 * d * d + 2 * d * kv * head_dim + 3 * d * f)
    step, ref = gpu.useful_flops(model, tokens=100, response_tokens=60, seq_len=50)
    assert ref == 2 * body * 100 + 2 * v * d * 60 + 4 * L * d * 100 * 25 and step == 3 * ref


def test_vs_trl_work_is_valid_and_sized(tmp_path):
    vs = load_bench("vs_trl")
    tokenizer, words, weights = vs.make_tokenizer(str(tmp_path), vocab_size=2048)
    assert tokenizer.chat_template and len(tokenizer) == 2048
    path = str(tmp_path / "scored.jsonl")
    vs.make_scored(path, tokenizer, words, weights, prompts=6)
    pairs, stats = sspo.load_pairs(path, "sppo_hard", 0.55, 0.95)  # validates pref (constant-sum, P_ii = 1/2)
    sspo.load_pairs(path, "sspo", 0.55, 0.95)  # and sim (symmetric, in [-1, 1])
    assert stats["pairs"] == 6
    for row in map(json.loads, open(path)):
        assert len(row["responses"]) == 4
        for r in row["responses"]:
            assert 96 <= len(tokenizer(r, add_special_tokens=False)["input_ids"]) <= 160 + 4
        assert 56 <= len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]) <= 72 + 4


def test_vs_trl_markdown_section_is_replaced_not_appended(tmp_path):
    vs = load_bench("vs_trl")
    md = tmp_path / "RESULTS.md"
    md.write_text("# Benchmarks\n\n## other\nkeep me\n")
    vs.write_markdown(str(md), "## sspo.py vs TRL DPOTrainer\nfirst\n")
    vs.write_markdown(str(md), "## sspo.py vs TRL DPOTrainer\nsecond\n")
    text = md.read_text()
    assert "keep me" in text and "second" in text and "first" not in text and text.count(vs.MD_BEGIN) == 1


@pytest.mark.slow
def test_trl_tokenises_the_pairs_as_sspo_does(tmp_path):
    """The benchmark's premise: TRL's conversational tokenisation gives sspo.py's token ids, pair by pair."""
    pytest.importorskip("trl")
    vs = load_bench("vs_trl")
    built = vs.build_work(str(tmp_path / "work"), prompts=4, max_length=512)
    cfg = dict(model=built["model"], scored=built["scored"], beta=1e-3, lr=5e-7, batch_size=2, epochs=1, max_length=512,
               trl_precompute=False, trl_sampling="sequential")
    record = vs.child_trl(str(tmp_path / "work"), str(tmp_path / "trl"), cfg)
    assert record["same_token_ids"] == 4 and record["steps"] == 2
    assert record["first_step_loss"] == pytest.approx(0.5 / 1e-3 ** 2)  # sppo_hard at step 0: 2 (eta/2)^2


def test_vs_trl_table_shows_the_prompt_sharing_ablation():
    vs = load_bench("vs_trl")
    one = lambda v: dict(median=v, min=v, max=v)  # noqa: E731
    rec = lambda t: dict(tokens_per_s=one(t), train_s=one(1e4 / t), wall_s=one(1e4 / t + 5), peak_rss_mib=one(1000),  # noqa: E731
                         matmul_share=one(0.5), system_cpu_share=one(0.1), first_step_loss=500000.0)
    ratio = dict(tokens_per_s=one(2.0), train_s=one(0.5), wall_s=one(0.55), peak_rss_mib=one(1.0))
    s = dict(sspo=rec(800), trl=rec(400), sspo_apart=rec(700), ratio_sspo_over_trl=ratio,
             ratio_sspo_apart_over_trl=ratio, ratio_sspo_over_sspo_apart=ratio)
    fmt = lambda d, f: f.format(d["median"])  # noqa: E731
    lines = vs.table(s, fmt)
    assert lines[0].count("|") == 8 and "prompt apart" in lines[0]
    assert lines[2] == "| real tokens/s (train time) | 800 | 400 | 2.00 | 700 | 2.00 | 2.00 |"
    s.update(trl_malloc=rec(500), ratio_sspo_over_trl_malloc=dict(ratio, tokens_per_s=one(1.6)))
    lines = vs.table(s, fmt)  # TRL with sspo.py's malloc settings: two more columns
    assert lines[0].count("|") == 10 and "malloc" in lines[0]
    assert lines[2].endswith("| 700 | 2.00 | 2.00 | 500 | 1.60 |")
    del s["sspo_apart"], s["ratio_sspo_apart_over_trl"], s["ratio_sspo_over_sspo_apart"], s["trl_malloc"]
    assert vs.table(s, fmt)[0].count("|") == 5  # without the ablations: three columns


def test_gpu_script_profiles_sampling_tiny_on_cpu(tmp_path):
    """bench/gpu.py --parts profile: both sampling paths profiled, the top ops named, the groups' shares summing to 1."""
    gpu = load_bench("gpu")
    report = gpu.run(tiny=True, out=str(tmp_path / "gpu.json"), parts="profile", profile_steps=6)
    for name in ("graphs", "slots_eager"):
        p = report["profile"][name]
        assert p["total_ms"] > 0 and p["top"] and p["top"][0]["self_ms"] >= p["top"][-1]["self_ms"]
        assert sum(p["group_shares"].values()) == pytest.approx(1.0)
        assert p["group_shares"].get("matmul", 0) > 0  # the model's linear layers are found
    assert gpu.op_group("aten::sort") == "sort and top-p" and gpu.op_group("aten::mm") == "matmul"
    assert gpu.op_group("ampere_bf16_s16816gemm") == "matmul" and gpu.op_group("aten::add_") == "other"


def test_same_results_finds_a_revision_trains_as_itself():
    """bench/same_results.sh trains the tiny model twice at HEAD, each in its own worktree: the weights match byte
    for byte and the metrics match without their timing keys (the script exits 1 with "RESULTS DIFFER" otherwise)."""
    import subprocess
    import sys

    r = subprocess.run(["bash", os.path.join(ROOT, "bench", "same_results.sh")], capture_output=True, text=True,
                       env=dict(os.environ, BEFORE="HEAD", AFTER="HEAD", TINY="1", PY=sys.executable, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "weights model.safetensors: identical" in r.stdout and r.stdout.strip().endswith("SAME RESULTS")
    assert "metrics.jsonl (16 steps before, 16 after" in r.stdout
