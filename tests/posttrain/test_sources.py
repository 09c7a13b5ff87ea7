"""posttrain.sources: TRL's dataset formats read from every file kind, columns mapped, weights applied, and a bad
row named by key, file, row and column."""

import json

import pytest

from posttrain.sources import SourceError, mix, parse_sources, read, weighted

Q = "What colour is the sky?"
USER = {"role": "user", "content": Q}


def jsonl(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def one(path, kind, **spec):
    return read(parse_sources([{"path": str(path), **spec}], f"{kind}.data")[0], kind)[0]


def test_preference_formats_all_become_posttrain_pairs(tmp_path):
    ultrafeedback = {  # implicit prompt, conversational: whole conversations in chosen/rejected (+ a prompt string)
        "prompt": Q, "prompt_id": "uf-1", "score_chosen": 8.0,
        "chosen": [USER, {"role": "assistant", "content": "Blue."}],
        "rejected": [USER, {"role": "assistant", "content": "Green."}],
    }
    explicit_text = {"prompt": Q, "chosen": "Blue.", "rejected": "Green."}
    explicit_chat = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Blue."}],
                     "rejected": [{"role": "assistant", "content": "Green."}]}
    implicit_text = {"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}
    rows = one(jsonl(tmp_path / "p.jsonl", ultrafeedback, explicit_text, explicit_chat, implicit_text), "pairs")
    assert rows[0] == {"prompt_id": "uf-1", "messages": [USER], "chosen": "Blue.", "rejected": "Green."}
    assert rows[1]["messages"] == rows[2]["messages"] == [USER]
    assert [(r["chosen"], r["rejected"]) for r in rows[1:3]] == [("Blue.", "Green.")] * 2
    assert rows[1]["prompt_id"] == rows[2]["prompt_id"]  # the same prompt, whichever way it was written
    # TRL's extract_prompt: the shared beginning, the space before the answers kept with them
    assert rows[3]["messages"] == [{"role": "user", "content": "Q: sky? A:"}]
    assert (rows[3]["chosen"], rows[3]["rejected"]) == (" blue", " green")


def test_sft_formats_and_a_column_mapping(tmp_path):
    import datasets

    path = tmp_path / "alpaca.parquet"
    datasets.Dataset.from_list([
        {"instruction": Q, "output": "Blue.", "source": "x"},
        {"instruction": "Name a fruit.", "output": "Apple.", "source": "y"},
    ]).to_parquet(str(path))
    rows = one(path, "sft", columns={"prompt": "instruction", "completion": "output"})
    assert rows[0]["messages"] == [USER] and rows[0]["text"] == "Blue." and len(rows) == 2
    chat = jsonl(tmp_path / "chat.jsonl",
                 {"messages": [{"role": "system", "content": "Be brief."}, USER,
                               {"role": "assistant", "content": "Blue."}]},
                 {"prompt": [USER], "completion": [{"role": "assistant", "content": "Blue!"}]})
    rows = one(chat, "sft")
    assert rows[0]["messages"][-1] == USER and rows[0]["text"] == "Blue." and rows[1]["text"] == "Blue!"


def test_json_arrays_and_datasets_folders_read_like_jsonl(tmp_path):
    import datasets

    row = {"prompt": Q, "completion": "Blue."}
    (tmp_path / "a.json").write_text(json.dumps([row, row]))
    datasets.DatasetDict({"train_sft": datasets.Dataset.from_list([row])}).save_to_disk(str(tmp_path / "dd"))
    assert len(one(tmp_path / "a.json", "sft")) == 2
    assert len(one(tmp_path / "dd", "sft", split="train_sft")) == 1
    with pytest.raises(SourceError, match="no split 'train'"):
        one(tmp_path / "dd", "sft")


@pytest.mark.parametrize("row, where", [
    ({"chosen": [USER, {"role": "assistant", "content": "a"}], "rejected": "b"}, "column 'rejected'"),
    ({"prompt": Q, "chosen": "a"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "a 'prompt' column is needed"),
    ({"prompt": Q, "chosen": "", "rejected": "b"}, "column 'chosen': empty answer"),
    ({"chosen": [USER, {"role": "robot", "content": "a"}], "rejected": [USER]}, "column 'chosen': message 1"),
])
def test_a_bad_preference_row_is_named_by_key_file_row_and_column(tmp_path, row, where):
    good = {"prompt": Q, "chosen": "Blue.", "rejected": "Green."}
    path = jsonl(tmp_path / "prefs.jsonl", good, good, row)
    with pytest.raises(SourceError) as err:
        one(path, "pairs")
    assert f"pairs.data[0]: {path}:3" in str(err.value) and where in str(err.value)


def test_sft_refuses_plain_text_and_a_prompt_without_answer(tmp_path):
    with pytest.raises(SourceError, match="plain 'text' row"):
        one(jsonl(tmp_path / "t.jsonl", {"text": "Once upon a time"}), "sft")
    with pytest.raises(SourceError, match="must be the assistant's"):
        one(jsonl(tmp_path / "m.jsonl", {"messages": [USER]}), "sft")


def test_a_mapped_column_that_is_not_there_is_named(tmp_path):
    with pytest.raises(SourceError, match="no column 'question'"):
        one(jsonl(tmp_path / "x.jsonl", {"prompt": Q, "completion": "a"}), "sft", columns={"prompt": "question"})


@pytest.mark.parametrize("spec, expected", [
    ({"path": "a.jsonl", "wieght": 2}, "unknown key(s) ['wieght']"),
    ({"path": "a.jsonl", "weight": 0}, "weight: must be a number > 0"),
    ({"path": "a.jsonl", "columns": {"question": "prompt"}}, "['question'] are not fields posttrain reads"),
    ({"weight": 1}, "path: a file, folder or hub dataset id is required"),
])
def test_bad_source_specs_name_the_key(spec, expected):
    with pytest.raises(SourceError) as err:
        parse_sources([spec], "sft.data")
    assert str(err.value).startswith("sft.data[0]") and expected in str(err.value)


def test_missing_files_and_unreachable_hub_ids_are_errors_not_fallbacks(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        one(tmp_path / "nope.jsonl", "sft")
    with pytest.raises(SourceError, match="hub dataset could not be loaded"):  # HF_HUB_OFFLINE=1 in tests
        read(parse_sources("no-such-org/no-such-set", "sft.data")[0], "sft")


def test_weights_scale_rows_reproducibly(tmp_path):
    rows = [{"i": i} for i in range(10)]
    assert weighted(rows, 1.0, 0) == rows
    assert weighted(rows, 2.0, 0) == rows + rows
    half = weighted(rows, 0.5, 0)
    assert len(half) == 5 and half == weighted(rows, 0.5, 0) and half != weighted(rows, 0.5, 1)
    assert len(weighted(rows, 1.3, 0)) == 13
    path = jsonl(tmp_path / "s.jsonl", *({"prompt": f"q{i}", "completion": "a"} for i in range(4)))
    got, report = mix(parse_sources([path, {"path": path, "weight": 0.5}], "sft.data"), "sft", seed=0)
    assert len(got) == 6 and report["sft.data[1]"] == {"path": path, "weight": 0.5, "rows": 4, "identical": 0,
                                                       "used": 2}


def test_identical_pairs_are_set_aside_and_counted(tmp_path):
    path = jsonl(tmp_path / "p.jsonl", {"prompt": Q, "chosen": "Blue.", "rejected": "Green."},
                 {"prompt": Q, "chosen": "Same", "rejected": "Same"})
    got, report = mix(parse_sources([path], "dpo.data"), "pairs", seed=0)
    assert len(got) == 1 and report["dpo.data[0]"]["identical"] == 1


def test_ranked_rows_expand_for_the_reward_model(tmp_path):
    path = jsonl(tmp_path / "r.jsonl", {"prompt": Q, "responses": ["Blue.", "Bluish.", "Green."]})
    pairs = one(path, "ranked")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("Blue.", "Bluish."), ("Blue.", "Green."),
                                                              ("Bluish.", "Green.")]
    with pytest.raises(SourceError, match="needs 'chosen' and 'rejected'"):
        one(path, "pairs")  # DPO takes pairs only


def test_a_mapped_format_wins_over_a_native_column_of_another_format(tmp_path):
    row = {"messages": [USER, {"role": "assistant", "content": "Not this."}], "question": "Name a fruit.",
           "answer": "Apple."}
    got = one(jsonl(tmp_path / "both.jsonl", row), "sft", columns={"prompt": "question", "completion": "answer"})
    assert got[0]["messages"] == [{"role": "user", "content": "Name a fruit."}] and got[0]["text"] == "Apple."
