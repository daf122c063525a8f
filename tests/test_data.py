import json

import pytest

from switchkd.training.data import (
    DistillCollator,
    DistillDataset,
    Example,
    as_example,
    pad_sequences,
    prompt_text,
    read_jsonl,
)

from models import char_tokenizer


def write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_prompt_response_and_dolly_rows(tmp_path):
    path = write(tmp_path, [{"prompt": "p1", "response": "r1"},
                            {"instruction": "say hi", "context": "", "response": "hi"},
                            {"instruction": "sum", "context": "1 2", "response": "3"}, ""])
    pairs = read_jsonl(path)
    assert pairs[0] == ("p1", "r1", "raw")
    assert "### Instruction:\nsay hi" in pairs[1][0] and "### Input" not in pairs[1][0]
    assert "### Input:\n1 2" in pairs[2][0] and pairs[2][1:] == ("3", "instruction")
    assert as_example("say hi", "instruction").prompt == pairs[1].prompt  # generate --prompt formats alike


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"}, {"role": "user", "content": "abc"},
        {"role": "assistant", "content": "cba"}]
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_messages_rows_use_the_chat_template_when_there_is_one(tmp_path):
    example = read_jsonl(write(tmp_path, [{"messages": CHAT}]))[0]
    assert example == Example(CHAT[:-1], "cba", "chat")
    tok = char_tokenizer()
    assert prompt_text(example.prompt, tok) == "system: be brief\nuser: hi\nassistant: yo\nuser: abc\nassistant: "
    tok.chat_template = TEMPLATE
    text = "<system>be brief<user>hi<assistant>yo<user>abc<assistant>"
    assert prompt_text(example.prompt, tok) == text
    data = DistillDataset([example], tok, max_prompt_tokens=64)
    assert data.prompts == [text] and data.prompt_format == "chat" and data.references == ["cba"]
    assert data[0]["prompt_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    assert prompt_text(as_example("abc", "chat").prompt, tok) == "<user>abc<assistant>"


@pytest.mark.parametrize("line, match", [
    ("{not json", r"data.jsonl:2: not valid JSON"),
    ('["a"]', r"data.jsonl:2: a row must be a JSON object"),
    ({"response": "x"}, r"data.jsonl:2: a row needs 'prompt', 'instruction' or 'messages'"),
    ({"prompt": "x"}, r"data.jsonl:2: 'response' must be a string"),
    ({"prompt": "", "response": "x"}, r"data.jsonl:2: the prompt must be a non-empty string"),
    ({"instruction": "x", "context": 3, "response": "y"}, r"data.jsonl:2: 'context' must be a string"),
    ({"messages": [{"role": "user"}]}, r"data.jsonl:2: 'messages' must be a list of"),
    ({"messages": CHAT[:-1]}, r"data.jsonl:2: 'messages' needs at least one turn before a last, assistant, turn"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, match):
    path = write(tmp_path, [{"prompt": "ok", "response": "ok"}, line])
    with pytest.raises(ValueError, match=match):
        read_jsonl(path)


def test_a_line_that_is_not_utf8_names_file_line_and_byte(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9", "response": "b"}\n')
    with pytest.raises(ValueError, match=r"data.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"):
        read_jsonl(path)


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such data file"):
        read_jsonl(tmp_path / "absent.jsonl")


def test_tokenisation_masks_prompts_and_reports_dropped_rows(tmp_path, caplog):
    tok = char_tokenizer()
    rows = [("abc", "de"), ("x" * 40, "y"), ("ab", "z" * 30)]
    data = DistillDataset(rows, tok, max_prompt_tokens=10, max_length=20)
    assert len(data) == 1 and data.dropped == 2 and "dropped 2 of 3 rows" in caplog.text
    item = data[0]
    assert tok.decode(item["prompt_ids"]) == "abc" and item["response_ids"][-1] == tok.eos_token_id
    batch = DistillCollator()([item, item])
    input_ids, mask, labels = pad_sequences([[5, 6, 7], [8]], [[9, 1], [10, 11, 1]], 0, "cpu")
    assert batch["index"].tolist() == [0, 0]
    assert input_ids.tolist() == [[5, 6, 7, 9, 1], [8, 10, 11, 1, 0]]
    assert labels.tolist() == [[-100, -100, -100, 9, 1], [-100, 10, 11, 1, -100]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    with pytest.raises(ValueError, match="no usable rows"):
        DistillDataset([("x" * 40, "y")], tok, max_prompt_tokens=10)


def test_dict_rows_as_from_a_datasets_table():
    tok = char_tokenizer()
    data = DistillDataset([{"messages": CHAT}, {"prompt": "ab", "response": "ba"}], tok, max_prompt_tokens=64)
    assert data.prompts == ["system: be brief\nuser: hi\nassistant: yo\nuser: abc\nassistant: ", "ab"]
    assert data.references == ["cba", "ba"] and data.prompt_format == "raw"  # mixed formats: raw
