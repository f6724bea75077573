"""Hostile inputs that gave silent wrong results: evaluation resume, sample-changing settings, weights,
prompt data and ground truths. Each test names the case it covers."""

import json
import logging
import shutil

import numpy as np
import pytest

from sft_fixtures import make_model_dir
from sftrl_jax.config import load_config
from sftrl_jax.evaluation import Completion, EvalConfig, run_eval
from sftrl_jax.run_folder import RunFolderError


@pytest.fixture(scope="module")
def model_dir(hf_checkpoint, tmp_path_factory):
    return make_model_dir(hf_checkpoint("qwen2_tied"), tmp_path_factory.mktemp("hostile") / "model")


def boxed_truth(items, n):
    """A fake model that answers every prompt with its ground truth (the first one of alternatives)."""
    out = []
    for item in items:
        truth = item.ground_truth if isinstance(item.ground_truth, str) else item.ground_truth[0]
        out += [Completion(f"The answer is \\boxed{{{truth}}}.", 8, False)] * n
    return out


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _eval_config(model, data, out, *extra):
    return load_config(EvalConfig, overrides=[f"model.path={model}", f"data.files=[{data}]", f"output_dir={out}",
                                              "reward.num_workers=1", *extra])


def _plain_rows(count=4, offset=1):
    return [{"prompt": f"what is {i}+{offset}?", "answer": str(i + offset)} for i in range(count)]


# ------------------------------------------------------------------------------ stale generations


def test_eval_resume_refuses_data_whose_content_changed_at_the_same_path(model_dir, tmp_path):
    data = _jsonl(tmp_path / "plain.jsonl", _plain_rows())
    config = _eval_config(model_dir, data, tmp_path / "out")
    assert run_eval(config, generator=boxed_truth, progress=False)["benchmarks"]["plain"]["accuracy"] == 1.0
    _jsonl(data, _plain_rows(offset=2))  # same path, same size, other answers
    with pytest.raises(RunFolderError, match="data_files"):
        run_eval(config, generator=boxed_truth, progress=False)


def test_eval_resume_refuses_a_model_whose_chat_template_file_changed(model_dir, tmp_path):
    model = shutil.copytree(model_dir, tmp_path / "model")
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    data = _jsonl(tmp_path / "plain.jsonl", _plain_rows())
    config = _eval_config(model, data, tmp_path / "out")
    run_eval(config, generator=boxed_truth, progress=False)
    (model / "chat_template.jinja").write_text("{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(RunFolderError, match="chat_template.jinja"):
        run_eval(config, generator=boxed_truth, progress=False)


def test_model_fingerprint_covers_every_shaping_file_and_a_weight_changed_in_place(model_dir, tmp_path):
    import os

    from sftrl_jax.fingerprint import model_fingerprint

    model = shutil.copytree(model_dir, tmp_path / "model")
    (model / "README.md").write_text("notes")
    before = model_fingerprint(model)
    assert "README.md" not in before and {"config.json", "tokenizer.json", "model.safetensors"} <= set(before)
    (model / "README.md").write_text("other notes")
    assert model_fingerprint(model) == before  # documentation does not shape the output
    weights = model / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # the last float32 becomes NaN; same size, modification time restored
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_fingerprint(model)["model.safetensors"] != before["model.safetensors"]


def test_eval_refuses_generations_without_their_settings_file_unless_forced(model_dir, tmp_path):
    data = _jsonl(tmp_path / "plain.jsonl", _plain_rows())
    out = tmp_path / "out"
    config = _eval_config(model_dir, data, out)
    run_eval(config, generator=boxed_truth, progress=False)
    (out / "generation_settings.json").unlink()
    with pytest.raises(RunFolderError, match="generation_settings.json"):
        run_eval(config, generator=boxed_truth, progress=False)
    assert run_eval(config, generator=boxed_truth, progress=False, force=True)["benchmarks"]["plain"]["prompts"] == 4
    from sftrl_jax.cli import build_parser

    assert build_parser().parse_args(["eval", "--force", "sampling.n=2"]).force  # the command line's --force


# ------------------------------------------------------------------------- sample-changing settings


@pytest.mark.slow  # samples with the tiny model four times
def test_sampling_batch_size_keeps_the_samples_and_eval_chunk_size_changes_them(hf_checkpoint, tokenizer):
    """A sample's randomness is its (seed, sample id, token index), whatever the generation batch; evaluation
    seeds each chunk with its first prompt id, so another chunk size gives other samples (a resume checks it)."""
    from sftrl_jax.config import SamplingOptions
    from sftrl_jax.data.prompts import PromptItem
    from sftrl_jax.evaluation import model_generator
    from sftrl_jax.models import load_pretrained

    model, _ = load_pretrained(hf_checkpoint("qwen2_tied"))
    items = [PromptItem(i, "b", "", "1", ids) for i, ids in enumerate([[5, 6, 7], [8, 9, 10, 11]])]

    def generator(batch_size):
        options = SamplingOptions(max_new_tokens=8, temperature=1.0, batch_size=batch_size)
        return model_generator(model, tokenizer, options, progress=False)

    by_batch = {size: [c.text for c in generator(size)(items, 1)] for size in (1, 2)}  # compiles 1 and 2 rows
    assert by_batch[1] == by_batch[2]
    one_chunk = by_batch[2]
    two_chunks = [c.text for c in generator(2)(items[:1], 1) + generator(2)(items[1:], 1)]
    assert one_chunk != two_chunks


def test_batch_and_chunk_sizes_are_settings_a_resume_checks():
    from sftrl_jax.layout import layout_keys
    from sftrl_jax.rl.config import RLConfig

    assert not {"sampling.batch_size", "chunk_size"} & set(layout_keys(EvalConfig))
    assert "sampling.batch_size" not in layout_keys(RLConfig)


def test_eval_resume_refuses_a_changed_chunk_size(model_dir, tmp_path):
    data = _jsonl(tmp_path / "plain.jsonl", _plain_rows())
    run_eval(_eval_config(model_dir, data, tmp_path / "out", "chunk_size=2"), generator=boxed_truth, progress=False)
    with pytest.raises(RunFolderError, match="chunk_size"):
        run_eval(_eval_config(model_dir, data, tmp_path / "out", "chunk_size=3"), generator=boxed_truth,
                 progress=False)


# ------------------------------------------------------------------------------------ NaN weights


def test_a_nan_in_a_weight_file_stops_the_load_naming_tensor_and_file(hf_checkpoint, tmp_path):
    from safetensors.numpy import load_file, save_file

    from sftrl_jax.models import load_pretrained

    model = shutil.copytree(hf_checkpoint("qwen2_untied"), tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = np.nan
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"{name}.*model.safetensors|model.safetensors.*{name}") as err:
        load_pretrained(model)
    assert "\n" not in str(err.value) and "non-finite" in str(err.value)


def test_logits_that_overflow_stop_the_eval_before_anything_is_graded(model_dir, tmp_path):
    """Finite weights that overflow the activations (a final norm scaled to float32's largest value) give NaN
    logits: the evaluation stops naming the prompt, and writes no completion and no results."""
    from safetensors.numpy import load_file, save_file

    from sftrl_jax.sampling import NonFiniteLogitsError

    model = shutil.copytree(model_dir, tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors["model.norm.weight"][:] = np.finfo(np.float32).max
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    config = _eval_config(model, _jsonl(tmp_path / "plain.jsonl", _plain_rows()), out, "sampling.max_new_tokens=4")
    with pytest.raises(NonFiniteLogitsError, match="NaN or infinite at new token 0 of a sample of prompt 0 "):
        run_eval(config, progress=False)
    assert not (out / "results.json").exists()
    generations = out / "generations.jsonl"
    assert not generations.exists() or not generations.read_text().strip()


# -------------------------------------------------------------------------------- unusable prompts


def test_eval_over_zero_usable_prompts_is_refused_naming_file_and_skips(model_dir, tmp_path):
    data = _jsonl(tmp_path / "broken.jsonl", [{"prompt": "1+1?", "answer": None}, {"prompt": None, "answer": "2"}])
    with pytest.raises(ValueError, match=r"broken.jsonl.*no usable prompts.*2 bad rows"):
        run_eval(_eval_config(model_dir, data, tmp_path / "out"), generator=boxed_truth, progress=False)


def test_eval_where_no_prompt_fits_max_prompt_length_is_refused(model_dir, tmp_path):
    data = _jsonl(tmp_path / "long.jsonl", _plain_rows())
    with pytest.raises(ValueError, match=r"long.jsonl.*data.max_prompt_length"):
        run_eval(_eval_config(model_dir, data, tmp_path / "out", "data.max_prompt_length=2"), generator=boxed_truth,
                 progress=False)


def test_eval_refuses_generation_past_max_position_embeddings(model_dir, tmp_path):
    data = _jsonl(tmp_path / "plain.jsonl", _plain_rows(1))
    config = _eval_config(model_dir, data, tmp_path / "out", "sampling.max_new_tokens=600")  # 512 positions
    with pytest.raises(ValueError, match="max_position_embeddings"):
        run_eval(config, progress=False)  # the real generator: refused before the model is loaded


# ---------------------------------------------------------------------------------- ground truths


def test_list_and_number_ground_truths_are_alternatives_and_strings(tokenizer, tmp_path, caplog):
    from sftrl_jax.data.prompts import PromptDataOptions, load_prompt_items

    data = _jsonl(tmp_path / "truths.jsonl", [
        {"prompt": "a?", "answer": ["5", "6"]}, {"prompt": "b?", "answer": 7}, {"prompt": "c?", "answer": 2.5},
        {"prompt": "d?", "answer": ["x", 3]}, {"prompt": "e?", "answer": {"value": 1}},
        {"prompt": "f?", "answer": True}, {"prompt": "g?", "answer": [["1"]]}, {"prompt": "h?", "answer": []},
        {"prompt": "i?", "answer": [None]}])
    with caplog.at_level(logging.WARNING):
        items, skipped = load_prompt_items(PromptDataOptions(files=[str(data)]), tokenizer)
    assert [item.ground_truth for item in items] == [("5", "6"), "7", "2.5", ("x", "3")]
    assert skipped["bad_rows"] == 5
    for row in range(4, 9):
        assert f"{data} row {row}: " in caplog.text


def test_a_response_matching_any_alternative_ground_truth_scores_1():
    from sftrl_jax.rewards import RewardPool

    with RewardPool(num_workers=1, timeout_s=10) as pool:
        result = pool.score_batch(["so \\boxed{6}", "so \\boxed{5}", "so \\boxed{7}"], [("5", "6"), ("5", "6"),
                                                                                         ("5", "6")])
    assert result.scores == [1.0, 1.0, 0.0]


def test_eval_grades_list_ground_truths_as_alternatives(model_dir, tmp_path):
    data = _jsonl(tmp_path / "alt.jsonl", [{"prompt": "a?", "answer": ["5", "6"]}, {"prompt": "b?", "answer": 4}])

    def second_alternative(items, n):
        return [Completion(f"\\boxed{{{item.ground_truth[-1] if isinstance(item.ground_truth, tuple) else 4}}}",
                           4, False) for item in items for _ in range(n)]

    results = run_eval(_eval_config(model_dir, data, tmp_path / "out"), generator=second_alternative,
                       progress=False)
    assert results["benchmarks"]["alt"]["accuracy"] == 1.0


# --------------------------------------------------------------------------------- huge JSONL rows


def test_an_oversized_jsonl_row_is_skipped_before_it_is_parsed(tmp_path):
    from sftrl_jax.data.sources import MAX_ROW_BYTES, UnreadableRow, load_rows

    path = tmp_path / "huge.jsonl"
    with path.open("w") as f:
        f.write(json.dumps({"prompt": "1+1?", "answer": "2"}) + "\n")
        f.write(json.dumps({"prompt": "x" * (MAX_ROW_BYTES + 10), "answer": "3"}) + "\n")
        f.write(json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n")
    rows = list(load_rows([str(path)]))
    assert [index for _, index, _ in rows] == [0, 1, 2]
    assert rows[0][2]["answer"] == "2" and rows[2][2]["answer"] == "4"
    assert isinstance(rows[1][2], UnreadableRow)
    assert "line 2" in rows[1][2].problem and "bytes" in rows[1][2].problem
