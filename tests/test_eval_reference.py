"""Evaluation scored as the reference (LUFFY's evaluation) scored it: the model's own chat template with the system
prompt dropped, stop ids from ``generation_config.json``, over-long prompts scored 0, MMLU-Pro rows graded as
multiple choice, and avg@k / pass@k over repeated rows and samples together."""

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from hf_checkpoints import make_tokenizer
from sft_fixtures import make_model_dir
from sftrl_jax.config import SamplingOptions, load_config
from sftrl_jax.data import PromptDataOptions, load_prompt_items
from sftrl_jax.data.prompts import multiple_choice_prompt
from sftrl_jax.evaluation import Completion, EvalConfig, pass_at_k, run_eval, summarize

ROOT = Path(__file__).resolve().parents[1]

# Qwen2.5-Instruct's chat template (its tokenizer_config.json; the tool-calling branches left out): with no
# system message it injects its own default one.
QWEN25_DEFAULT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN25_DEFAULT + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or "
    "(message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tmp_path_factory):
    return make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path_factory.mktemp("ref") / "model")


def _config(model_dir, out, files, *overrides):
    return load_config(EvalConfig, overrides=[f"model.path={model_dir}", f"data.files=[{','.join(map(str, files))}]",
                                              "reward.num_workers=1", f"output_dir={out}", *overrides])


def _answering(answer_of):
    """A fake model: each sample's text is ``answer_of(item, sample)``; records the items it was asked for."""
    calls = []

    def generate(items, n):
        calls.append(list(items))
        return [Completion(answer_of(item, s), 7, False) for item in items for s in range(n)]

    generate.calls = calls
    return generate


def _right(item, sample):
    return f"ANSWER: {item.ground_truth}" if len(item.ground_truth) == 1 and item.ground_truth.isalpha() \
        else f"\\boxed{{{item.ground_truth}}}"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------ 1. template, system prompt, stops
@pytest.mark.slow
def test_eval_uses_the_models_own_template_and_drops_both_system_prompts(hf_checkpoint, tmp_path):
    model = make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path / "model")
    make_tokenizer(model, chat_template=QWEN25_TEMPLATE)  # this model's own tokenizer_config.json
    data = tmp_path / "rows.parquet"
    pd.DataFrame([
        {"data_source": "math", "prompt": [{"role": "system", "content": "think first."},
                                           {"role": "user", "content": "1+1?"}],
         "reward_model": {"ground_truth": "2", "style": "rule"}},
        {"data_source": "math", "prompt": [{"role": "user", "content": "2+2?"}],
         "reward_model": {"ground_truth": "4", "style": "rule"}},
    ]).to_parquet(data)

    kept = _answering(_right)
    run_eval(_config(model, tmp_path / "kept", [data]), generator=kept, progress=False)
    assert [item.prompt_text.split("<|im_end|>")[0] for item in kept.calls[0]] == \
        ["<|im_start|>system\nthink first.", f"<|im_start|>system\n{QWEN25_DEFAULT}"]

    dropped = _answering(_right)
    results = run_eval(_config(model, tmp_path / "dropped", [data], "data.remove_system_prompt=true"),
                       generator=dropped, progress=False)
    # the row's system message and the template's injected default are both gone
    assert [item.prompt_text for item in dropped.calls[0]] == [
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n" for q in ("1+1?", "2+2?")]
    assert results["benchmarks"]["math"]["accuracy"] == 1.0

    # a script that drops the row's system message and then applies the model's template keeps its default
    template_default = _answering(_right)
    run_eval(_config(model, tmp_path / "template", [data], "data.remove_system_prompt=true",
                     "data.keep_template_system_prompt=true"), generator=template_default, progress=False)
    assert [item.prompt_text for item in template_default.calls[0]] == [
        f"<|im_start|>system\n{QWEN25_DEFAULT}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
        for q in ("1+1?", "2+2?")]


def _with_generation_config(hf_dir: Path, target: Path, **fields) -> Path:
    model = make_model_dir(hf_dir, target)
    generation = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**generation, **fields}))
    return model


def test_stop_ids_include_the_generation_config_eos_ids(hf_checkpoint, tokenizer, tmp_path):
    from sftrl_jax.models import read_config
    from sftrl_jax.sampling import stop_token_ids

    eos = tokenizer.eos_token_id
    plain = make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path / "plain")  # generation_config.json without eos
    assert stop_token_ids(tokenizer, read_config(plain)) == [eos]
    listed = _with_generation_config(hf_checkpoint("qwen2_tied"), tmp_path / "listed", eos_token_id=[eos, 7])
    assert stop_token_ids(tokenizer, read_config(listed)) == sorted({eos, 7})
    single = _with_generation_config(hf_checkpoint("qwen2_tied"), tmp_path / "single", eos_token_id=9)
    assert stop_token_ids(tokenizer, read_config(single)) == sorted({eos, 9})
    # an explicit model directory wins over the one the config was read from
    assert stop_token_ids(tokenizer, read_config(plain), model_dir=single) == sorted({eos, 9})
    (plain / "generation_config.json").unlink()
    assert stop_token_ids(tokenizer, read_config(plain)) == [eos]
    bad = _with_generation_config(hf_checkpoint("qwen2_tied"), tmp_path / "bad", eos_token_id="<|im_end|>")
    with pytest.raises(ValueError, match=r"generation_config\.json: eos_token_id must be"):
        stop_token_ids(tokenizer, read_config(bad))


@pytest.mark.slow
def test_the_sampler_stops_at_a_generation_config_eos_id(hf_checkpoint, tmp_path):
    """Greedy decoding of a random model: the first token it picks, once listed in generation_config.json,
    ends every response right there (rollouts, evaluation and the probe all sample through TextSampler)."""
    from sftrl_jax.models import load_pretrained, load_tokenizer
    from sftrl_jax.sampling import TextSampler

    options = SamplingOptions(temperature=0.0, max_new_tokens=4, batch_size=8)
    plain = make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path / "plain")
    tokenizer = load_tokenizer(plain)
    prompts = [tokenizer("what is 1+1?")["input_ids"]]
    samples, _ = TextSampler(load_pretrained(plain)[0], tokenizer, options).sample(prompts, seed=0)
    first = samples[0].tokens[0]
    assert samples[0].stop_reason == "length" and first != tokenizer.eos_token_id, "pick another prompt"

    model = _with_generation_config(hf_checkpoint("qwen2_tied"), tmp_path / "listed", eos_token_id=[first])
    sampler = TextSampler(load_pretrained(model)[0], tokenizer, options)
    assert first in sampler.stop_ids
    samples, texts = sampler.sample(prompts, seed=0)
    assert (samples[0].tokens, samples[0].stop_reason, texts) == ([first], "eos", [""])


# ------------------------------------------------------------------------------------------ 2. over-long prompts
def test_an_over_long_prompt_scores_zero_and_stays_in_the_denominator(model_dir, tmp_path):
    rows = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "what is " + "1+" * 80 + "1?", "answer": "81"},
            {"prompt": "2+2?", "answer": "4"}, {"prompt": "3+3?", "answer": "6"}]
    data = _jsonl(tmp_path / "p.jsonl", rows)
    config = _config(model_dir, tmp_path / "eval", [data], "data.max_prompt_length=64", "sampling.n=2")
    generator = _answering(_right)
    results = run_eval(config, generator=generator, progress=False)
    assert [item.prompt_id for call in generator.calls for item in call] == [0, 2, 3]  # never generated
    metrics = results["benchmarks"]["p"]
    assert metrics["accuracy"] == 0.75 and metrics["avg@2"] == 0.75 and metrics["pass@2"] == 0.75
    assert (metrics["prompts"], metrics["samples"], metrics["prompt_too_long"]) == (4, 8, 1)
    assert metrics["mean_response_tokens"] == 7 and metrics["truncated_share"] == 0.0  # of generated responses
    assert results["prompt_too_long"] == 1 and results["skipped"] == {"bad_rows": 0}
    records = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    long = [r for r in records if r["prompt_id"] == 1]
    assert [(r["sample"], r["score"], r["prompt_too_long"], r["num_tokens"]) for r in long] == [(0, 0.0, True, 0),
                                                                                                 (1, 0.0, True, 0)]
    assert not any(r["prompt_too_long"] for r in records if r["prompt_id"] != 1)

    # resumed: nothing left to generate, the same results
    again = _answering(_right)
    assert run_eval(config, generator=again, progress=False) == results and again.calls == []


def test_rl_and_the_probe_still_skip_over_long_prompts(tokenizer, tmp_path):
    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": "2"},
                                         {"prompt": "what is " + "1+" * 80 + "1?", "answer": "81"}])
    options = PromptDataOptions(files=[str(data)], max_prompt_length=64)
    items, skipped = load_prompt_items(options, tokenizer)  # the default, which rl/trainer.py uses
    assert [i.ground_truth for i in items] == ["2"] and skipped == {"bad_rows": 0, "prompt_too_long": 1}
    items, skipped = load_prompt_items(options, tokenizer, keep_too_long=True)
    assert [(i.ground_truth, i.prompt_too_long) for i in items] == [("2", False), ("81", True)]
    assert skipped["prompt_too_long"] == 0


def test_an_eval_folder_that_skipped_long_prompts_is_not_resumed(model_dir, tmp_path):
    """Generations whose settings lack the over-long-prompt rule (prompts skipped, so other prompt ids) are
    refused, not mixed in."""
    from sftrl_jax.run_folder import RunFolderError

    data = _jsonl(tmp_path / "p.jsonl", [{"prompt": "1+1?", "answer": "2"}])
    config = _config(model_dir, tmp_path / "eval", [data])
    run_eval(config, generator=_answering(_right), progress=False)
    key_file = tmp_path / "eval" / "generation_settings.json"
    settings = json.loads(key_file.read_text())
    del settings["prompts_too_long"]
    key_file.write_text(json.dumps(settings))
    with pytest.raises(RunFolderError, match="prompts_too_long"):
        run_eval(config, generator=_answering(_right), progress=False)


# ------------------------------------------------------------------------------------------------- 3. MMLU-Pro
def _mmlu_pro_rows():
    """Rows in MMLU-Pro's published format (TIGER-Lab/MMLU-Pro: question, options, answer, answer_index,
    category, src, plus question_id and cot_content)."""
    ten = [f"option {w}" for w in "zero one two three four five six seven eight nine".split()]
    return [
        {"question_id": 70, "question": "Which is last?", "options": ten, "answer": "J", "answer_index": 9,
         "cot_content": "", "category": "math", "src": "ori_mmlu-high_school_mathematics"},
        {"question_id": 71, "question": "Which is sixth?", "options": ten, "answer": "F", "answer_index": 5,
         "cot_content": "", "category": "physics", "src": "stemez-Physics"},
        {"question_id": 72, "question": "Pick the second.", "options": ["x", "y", "z", "w", "N/A", "N/A"],
         "answer": "B", "answer_index": 1, "cot_content": "", "category": "law", "src": "ori_mmlu-professional_law"},
    ]


def test_mmlu_pro_rows_become_lettered_prompts(tokenizer, tmp_path):
    data = tmp_path / "valid.mmlu_pro.parquet"
    pd.DataFrame(_mmlu_pro_rows()).to_parquet(data)  # options as parquet lists (numpy arrays when read)
    items, skipped = load_prompt_items(PromptDataOptions(files=[str(data)], max_prompt_length=100000), tokenizer)
    assert skipped["bad_rows"] == 0
    assert [(i.benchmark, i.ground_truth) for i in items] == [("mmlu_pro", "J"), ("mmlu_pro", "F"), ("mmlu_pro", "B")]
    user = items[0].prompt_text.split("<|im_start|>user\n")[1].split("<|im_end|>")[0]
    assert user == multiple_choice_prompt("Which is last?", _mmlu_pro_rows()[0]["options"])
    assert "where LETTER is one of ABCDEFGHIJ." in user and "'ANSWER: $LETTER'" in user
    assert user.endswith("\n\nWhich is last?\n\nA. option zero\nB. option one\nC. option two\nD. option three\n"
                         "E. option four\nF. option five\nG. option six\nH. option seven\nI. option eight\n"
                         "J. option nine")
    third = items[2].prompt_text
    assert "one of ABCD." in third and "D. w\n" not in third and third.count("N/A") == 0 and "D. w<|im_end|>" in third


@pytest.mark.parametrize("row,problem", [
    ({"answer": "K", "answer_index": None}, "no answer letter"),
    ({"answer": "B", "answer_index": 3}, "disagree"),
    ({"answer": None, "answer_index": 12}, "not one of the 10 options"),
])
def test_malformed_mmlu_pro_rows_are_bad_rows(tokenizer, tmp_path, caplog, row, problem):
    data = _jsonl(tmp_path / "m.jsonl", [{**_mmlu_pro_rows()[0], **row}])
    items, skipped = load_prompt_items(PromptDataOptions(files=[str(data)], max_prompt_length=100000), tokenizer)
    assert items == [] and skipped["bad_rows"] == 1 and problem in caplog.text


def test_mmlu_pro_is_graded_by_choice_extraction(model_dir, tmp_path):
    data = tmp_path / "valid.mmlu_pro.parquet"
    pd.DataFrame(_mmlu_pro_rows()).to_parquet(data)
    answers = {"J": "Step by step...\nANSWER: J", "F": r"so \boxed{F}", "B": "The answer is (B)."}
    config = _config(model_dir, tmp_path / "right", [data], "data.max_prompt_length=100000")
    right = run_eval(config, generator=_answering(lambda item, s: answers[item.ground_truth]), progress=False)
    assert right["benchmarks"]["mmlu_pro"]["accuracy"] == 1.0
    records = [json.loads(line) for line in (tmp_path / "right" / "generations.jsonl").read_text().splitlines()]
    assert [r["extracted_answer"] for r in records] == ["J", "F", "B"]
    config = _config(model_dir, tmp_path / "wrong", [data], "data.max_prompt_length=100000")
    wrong = run_eval(config, generator=_answering(lambda item, s: "ANSWER: I"), progress=False)
    assert wrong["benchmarks"]["mmlu_pro"]["accuracy"] == 0.0


def test_eval_ood_config_lists_mmlu_pro_beside_the_other_files():
    files = yaml.safe_load((ROOT / "configs" / "eval_ood.yaml").read_text())["data"]["files"]
    assert files[-1] == "../shared/data/luffy-eval/valid.mmlu_pro.parquet"
    assert {Path(f).parent for f in files} == {Path("../shared/data/luffy-eval")}


# ------------------------------------------------------------------------------- 4. avg@k and pass@k over repeats
def _record(prompt_id, problem_id, score, benchmark="aime", sample=0):
    return {"prompt_id": prompt_id, "problem_id": problem_id, "sample": sample, "benchmark": benchmark,
            "score": score, "num_tokens": 10, "truncated": False, "timed_out": False}


def test_avg_and_pass_at_k_over_repeated_rows_and_samples_by_hand():
    # aime: problem 0 is rows 0 and 1, problem 2 is rows 2 and 3; two samples each: four attempts a problem
    scores = {0: [1, 0], 1: [0, 0], 2: [1, 1], 3: [0, 0]}
    records = [_record(p, 0 if p < 2 else 2, float(s), sample=k) for p, ss in scores.items() for k, s in enumerate(ss)]
    aime = summarize(records, ["aime"])["benchmarks"]["aime"]
    assert (aime["prompts"], aime["problems"], aime["samples"], aime["attempts"]) == (4, 2, 8, 4)
    assert aime["accuracy"] == aime["avg@4"] == aime["pass@1"] == pytest.approx(3 / 8)
    # problem 0: 1 right of 4 -> 1 - C(3,2)/C(4,2) = 1/2; problem 2: 2 of 4 -> 1 - C(2,2)/C(4,2) = 5/6
    assert aime["pass@2"] == pytest.approx((1 / 2 + 5 / 6) / 2)
    assert aime["pass@4"] == 1.0 and "pass@8" not in aime
    # per row (records without problem_id) pass@2 would be (1 + 0 + 1 + 0) / 4 = 0.5
    by_row = summarize([{k: v for k, v in r.items() if k != "problem_id"} for r in records], ["aime"])
    assert by_row["benchmarks"]["aime"]["pass@2"] == 0.5 and by_row["benchmarks"]["aime"]["attempts"] == 2


def test_avg_at_k_weighs_problems_equally_when_attempts_differ():
    # problem 0: 2 attempts (both right); problem 1: 4 attempts (1 right). k = the fewest attempts = 2.
    records = [_record(0, 0, 1.0, "math", 0), _record(0, 0, 1.0, "math", 1)] + \
        [_record(p, 1, float(p == 1), "math", 0) for p in (1, 2, 3, 4)]
    math = summarize(records, ["math"])["benchmarks"]["math"]
    assert math["attempts"] == 2 and math["accuracy"] == pytest.approx(3 / 6)
    assert math["avg@2"] == pytest.approx((1.0 + 0.25) / 2)
    assert math["pass@2"] == pytest.approx((1.0 + pass_at_k(4, 1, 2)) / 2) == pytest.approx((1 + 0.5) / 2)


def test_repeated_rows_are_one_problem_end_to_end(model_dir, tmp_path):
    """LUFFY-style: a row repeated four times with n = 2 is one problem of eight attempts."""
    def row(question, truth):
        return {"data_source": "aime", "prompt": [{"role": "user", "content": question}],
                "reward_model": {"ground_truth": truth}}

    rows = [row("1+1?", "2")] * 4 + [row("2+2?", "4")]
    data = tmp_path / "aime.parquet"
    pd.DataFrame(rows).to_parquet(data)

    def answer(item, sample):  # the repeated problem: right only on the first row's first sample
        right = item.prompt_id == 0 and sample == 0 or item.ground_truth == "4"
        return f"\\boxed{{{item.ground_truth if right else 0}}}"

    results = run_eval(_config(model_dir, tmp_path / "eval", [data], "sampling.n=2"), generator=_answering(answer),
                       progress=False)
    aime = results["benchmarks"]["aime"]
    assert (aime["prompts"], aime["problems"], aime["attempts"]) == (5, 2, 2)  # the other problem: 1 row x 2
    assert aime["accuracy"] == pytest.approx(3 / 10)
    assert aime["avg@2"] == pytest.approx((1 / 8 + 1) / 2)
    assert aime["pass@2"] == pytest.approx((pass_at_k(8, 1, 2) + 1) / 2)
    records = [json.loads(line) for line in (tmp_path / "eval" / "generations.jsonl").read_text().splitlines()]
    assert {r["prompt_id"]: r["problem_id"] for r in records} == {0: 0, 1: 0, 2: 0, 3: 0, 4: 4}


def test_records_without_problem_ids_are_grouped_per_prompt(tmp_path):
    """A generations.jsonl without problem_id and prompt_too_long fields still summarizes."""
    records = [{"prompt_id": 0, "sample": s, "benchmark": "b", "score": float(s), "num_tokens": 3,
                "truncated": False, "timed_out": False} for s in range(2)]
    metrics = summarize(records, [])["benchmarks"]["b"]
    assert (metrics["problems"], metrics["attempts"], metrics["prompt_too_long"]) == (1, 2, 0)
    assert metrics["pass@2"] == 1.0 and metrics["avg@2"] == 0.5


def test_copying_a_model_keeps_its_generation_config(hf_checkpoint, tmp_path):
    """Checkpoints copy generation_config.json with the tokenizer files, so a trained model stops where its
    base did."""
    from sftrl_jax.models.hf_io import TOKENIZER_FILES, copy_tokenizer_files

    assert "generation_config.json" in TOKENIZER_FILES
    source = _with_generation_config(hf_checkpoint("qwen2_tied"), tmp_path / "src", eos_token_id=[2, 7])
    (tmp_path / "dst").mkdir()
    copy_tokenizer_files(source, tmp_path / "dst")
    assert json.loads((tmp_path / "dst" / "generation_config.json").read_text())["eos_token_id"] == [2, 7]
    shutil.rmtree(tmp_path / "dst")


def test_math_and_ood_averages_are_unweighted_means_of_their_benchmarks():
    records = ([_record(p, p, float(p < 3), "math") for p in range(4)]  # math 3/4
               + [_record(10 + p, 10 + p, float(p < 1), "amc") for p in range(2)]  # amc 1/2
               + [_record(20 + p, 20 + p, 1.0, "gpqa") for p in range(5)]  # gpqa 1
               + [_record(30 + p, 30 + p, float(p == 0), "arc_c") for p in range(4)])  # arc_c 1/4
    results = summarize(records, ["math", "amc", "aime"], ["arc_c", "gpqa", "mmlu_pro"])
    assert results["math_average"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert results["math_benchmarks"] == ["math", "amc"]
    assert results["ood_average"] == pytest.approx((1 / 4 + 1) / 2)
    assert results["ood_benchmarks"] == ["arc_c", "gpqa"]
    assert summarize(records[:4], ["math"], ["gpqa"])["ood_average"] is None
