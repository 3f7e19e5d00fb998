import json
import sys
import types

import pytest

import mlx_grpo  # noqa: F401  (loads OpenBLAS before anything imports mlx)
from mlx_grpo.core.data import DataError, PromptRow, encode_prompt, load_prompts, load_rows
from mlx_grpo.tasks.toy import save_byte_tokenizer


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory):
    from mlx_lm.tokenizer_utils import load as load_tokenizer  # after mlx_grpo

    path = tmp_path_factory.mktemp("tok")
    save_byte_tokenizer(path)
    return load_tokenizer(path)


@pytest.fixture(scope="session")
def plain_tokenizer(tmp_path_factory):
    """The same byte tokenizer without a chat template."""
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    path = tmp_path_factory.mktemp("plain-tok")
    save_byte_tokenizer(path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(path)


def write_jsonl(path, rows):
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return str(path)


def decode(tokenizer, ids):
    return tokenizer.decode(ids)


# --------------------------------------------------------------------------- encode_prompt


def test_text_prompt_goes_through_the_chat_template(tokenizer):
    ids = encode_prompt("What is 2+2?", tokenizer)
    expected = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(tokenizer, ids) == expected
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")  # one special token


def test_chat_prompt_keeps_its_messages(tokenizer):
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "2+2?"},
    ]
    text = decode(tokenizer, encode_prompt(messages, tokenizer))
    assert text == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_system_prompt_is_inserted_first(tokenizer):
    text = decode(tokenizer, encode_prompt("2+2?", tokenizer, system_prompt="Be brief."))
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?")


def test_system_prompt_does_not_replace_the_rows_own_system_message(tokenizer):
    messages = [{"role": "system", "content": "Own."}, {"role": "user", "content": "2+2?"}]
    text = decode(tokenizer, encode_prompt(messages, tokenizer, system_prompt="Be brief."))
    assert "Own." in text and "Be brief." not in text


def test_enable_thinking_false_adds_the_empty_think_block(tokenizer):
    off = decode(tokenizer, encode_prompt("2+2?", tokenizer, enable_thinking=False))
    default = decode(tokenizer, encode_prompt("2+2?", tokenizer))
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert default.endswith("<|im_start|>assistant\n") and "<think>" not in default


def test_without_chat_template_the_text_is_encoded_after_the_system_prompt(plain_tokenizer):
    ids = encode_prompt("2+2?", plain_tokenizer, system_prompt="Be brief.")
    assert decode(plain_tokenizer, ids) == "Be brief.\n\n2+2?"
    assert decode(plain_tokenizer, encode_prompt("2+2?", plain_tokenizer)) == "2+2?"


def test_without_chat_template_a_chat_prompt_is_an_error(plain_tokenizer):
    with pytest.raises(DataError, match="no chat template"):
        encode_prompt([{"role": "user", "content": "hi"}], plain_tokenizer)


# ------------------------------------------------------------------ load_rows / load_prompts


def test_gsm8k_rows_keep_the_answer_column_and_line_numbers(tmp_path, tokenizer):
    path = write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [
            {"question": "Natalia sold 48 clips...", "answer": "48/2 = 24\n#### 72"},
            "",
            {"question": "Weng earns $12 an hour...", "answer": "#### 10"},
        ],
    )
    rows = load_prompts(path, tokenizer, prompt_column="question", enable_thinking=False)
    assert [type(r) for r in rows] == [PromptRow, PromptRow]
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:3"]  # blank line skipped
    assert rows[1].columns == {"answer": "#### 10"}
    assert rows[1].prompt == "Weng earns $12 an hour..."
    assert decode(tokenizer, rows[1].prompt_ids).endswith("<think>\n\n</think>\n\n")


def test_chat_rows_keep_their_messages_as_prompt(tmp_path, tokenizer):
    messages = [{"role": "user", "content": "2+2?"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": messages, "answer": 4}])
    (row,) = load_prompts(path, tokenizer)
    assert row.prompt == messages and row.columns == {"answer": 4}
    assert decode(tokenizer, row.prompt_ids).startswith("<|im_start|>user\n2+2?")


def test_json_list_files_are_read_with_line_numbers(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a"},\n\n  {"prompt": "b", "answer": "1"}\n]\n')
    rows, sources = load_rows(str(path))
    assert rows == [{"prompt": "a"}, {"prompt": "b", "answer": "1"}]
    assert sources == [f"{path}:2", f"{path}:4"]


def test_invalid_json_in_a_json_list_names_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": b}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        load_rows(str(path))


def test_a_missing_file_is_reported(tmp_path):
    with pytest.raises(DataError, match="does not exist") as info:
        load_rows(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in str(info.value)


def test_an_empty_file_is_reported(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n  \n")
    with pytest.raises(DataError, match=rf"{path} holds no rows"):
        load_rows(str(path))


def test_invalid_json_names_file_line_and_its_start(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok"}, '{"prompt": "oops",}'])
    with pytest.raises(DataError) as info:
        load_rows(path)
    message = str(info.value)
    assert f"{path}:2: invalid JSON" in message
    assert '{"prompt": "oops",}' in message and "column" in message


def test_a_line_that_is_not_an_object_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "list.jsonl", [{"prompt": "ok"}, ["a", "b"]])
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object.*got a list"):
        load_rows(path)


def test_a_missing_prompt_column_lists_columns_and_suggests_one(tmp_path):
    path = write_jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "#### 1"}])
    with pytest.raises(DataError) as info:
        load_rows(path)
    message = str(info.value)
    assert f"{path}:1: no 'prompt' column" in message
    assert "['answer', 'question']" in message
    assert "--prompt-column question" in message


def test_a_prompt_column_typo_gets_a_close_match(tmp_path):
    path = write_jsonl(tmp_path / "typo.jsonl", [{"prompts": "q"}])
    with pytest.raises(DataError, match="Did you mean --prompt-column prompts"):
        load_rows(path)


def test_an_empty_prompt_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "blank.jsonl", [{"prompt": "ok"}, {"prompt": "   "}])
    with pytest.raises(DataError, match=rf"{path}:2: the 'prompt' column is empty"):
        load_rows(path)


def test_a_prompt_of_the_wrong_type_is_reported(tmp_path):
    path = write_jsonl(tmp_path / "num.jsonl", [{"prompt": 12}])
    with pytest.raises(
        DataError, match=rf"{path}:1: the 'prompt' column is an int; it must be text"
    ):
        load_rows(path)


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], "empty list of messages"),
        (["hi"], "message 0 .* must be an object"),
        ([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}], "message 1 .*"),
        ([{"role": "user", "content": 3}], "content of type int; it must be text"),
        ([{"role": "user", "content": " "}], "every message .* is empty"),
    ],
)
def test_invalid_chat_messages_are_reported_with_their_line(tmp_path, messages, expected):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "ok"}, {"prompt": messages}])
    with pytest.raises(DataError, match=rf"{path}:2: .*{expected}"):
        load_rows(path)


def test_a_chat_prompt_without_chat_template_names_the_row(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": [{"role": "user", "content": "a"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: .*no chat template"):
        load_prompts(path, plain_tokenizer)


def test_a_prompt_longer_than_the_limit_names_the_row_and_counts(tmp_path, plain_tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "short"}, {"prompt": "x" * 40}])
    assert len(load_prompts(path, plain_tokenizer, max_prompt_tokens=40)) == 2
    with pytest.raises(DataError) as info:
        load_prompts(path, plain_tokenizer, max_prompt_tokens=39)
    message = str(info.value)
    assert f"{path}:2" in message and "40 tokens" in message
    assert "the limit of 39" in message and "raise --max-prompt-length" in message


def test_a_hub_id_without_datasets_installed_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails
    with pytest.raises(DataError) as info:
        load_rows("openai/gsm8k")
    message = str(info.value)
    assert "'openai/gsm8k'" in message and "pip install datasets" in message
    assert "network" in message


def test_a_hub_id_loads_through_datasets_with_config_and_split(tmp_path, monkeypatch):
    calls = []

    def load_dataset(name, config, split):
        calls.append((name, config, split))
        return [{"question": "q0", "answer": "#### 1"}, {"question": "q1", "answer": "#### 2"}]

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows, sources = load_rows("openai/gsm8k:main", prompt_column="question", split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert rows[1] == {"question": "q1", "answer": "#### 2"}
    assert sources == ["hf:openai/gsm8k:main[test]:0", "hf:openai/gsm8k:main[test]:1"]


def test_hub_rows_are_validated_too(tmp_path, monkeypatch):
    fake = types.SimpleNamespace(load_dataset=lambda name, config, split: [{"text": "q"}])
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "datasets", fake)
    with pytest.raises(DataError, match=r"hf:org/set\[train\]:0: no 'prompt' column"):
        load_rows("org/set")
