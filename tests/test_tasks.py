import random

import pytest

from tasks import TASKS, build_tokenizer, make_splits


def test_splits_are_disjoint_deterministic_and_balanced():
    splits = make_splits(600, 60, 90, seed=7)
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [600, 60, 90]
    prompts = {n: {r["prompt"] for r in rows} for n, rows in splits.items()}
    assert len(prompts["validation"]) == 60 and len(prompts["test"]) == 90  # held-out prompts are distinct
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert make_splits(600, 60, 90, seed=7) == splits
    assert make_splits(600, 60, 90, seed=8) != splits
    for rows in (splits["train"], splits["validation"] + splits["test"]):
        counts = [sum(r["task"] == t for r in rows) for t in TASKS]
        assert max(counts) - min(counts) <= 1


def test_too_many_held_out_rows_is_a_value_error():
    with pytest.raises(ValueError, match="distinct"):
        make_splits(10, 2000, 2000, seed=0)  # count has only 278 distinct prompts


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_answers_its_prompt_in_known_tokens(task, tokenizer):
    rng = random.Random(task)
    for _ in range(200):
        prompt, response = TASKS[task](rng)
        words = prompt.split()
        if task == "count":
            start, step = int(words[3]), int(words[5])
            assert response.split() == [str(i) for i in range(start, 0, -step)]
            assert int(response.split()[-1]) <= step
        elif task == "repeat":
            k, word = int(words[1].rstrip(":")), words[2]
            assert response.split() == [x for i in range(k, 0, -1) for x in (word, str(i))]
        elif task == "spell":
            assert response.replace("-", "").split() == words[1:]
        else:
            k, thing, name = int(words[1]), words[2], words[4]
            assert response == " ".join(f"{thing} {i} for {name}." for i in range(k, 0, -1))
        ids = tokenizer(prompt + "\n" + response, add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids
        assert 1 <= len(tokenizer(response, add_special_tokens=False)["input_ids"]) <= 279


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def test_response_lengths_span_short_to_long(tokenizer):
    lengths = [len(tokenizer(r["response"])["input_ids"]) for r in make_splits(3000, 0, 0, seed=0)["train"]]
    assert min(lengths) < 10 and max(lengths) > 240
    assert sum(n >= 192 for n in lengths) > len(lengths) / 10  # long references are common


@pytest.mark.parametrize("level", ["word", "char"])
def test_tokenizer_round_trips_in_hugging_face_format(tmp_path, level):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer(level)
    text = "count 3 to 12\n3 4 5 6. s-p-e-l-l: Ada"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == (len(text) if level == "char" else 29)  # words, numbers, letters, marks, spaces
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (0, 1)
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text, add_special_tokens=False)["input_ids"] == ids


def test_unknown_tokenizer_level_is_a_value_error():
    with pytest.raises(ValueError, match="level"):
        build_tokenizer("byte")
