"""Tests for data_gen.prompts: reading and validating prompt sources, and sampling them per round."""

import json

import pytest

from data_gen.prompts import PromptError, load_prompts, sample_round


def jsonl(tmp_path, *rows, name="file.jsonl"):
    """Write rows (dicts, or raw strings written as they are) one a line; returns the path as a string."""
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def error(path, **kw) -> str:
    with pytest.raises(PromptError) as err:
        load_prompts(path, **kw)
    return str(err.value)


def pool(n):
    return [{"prompt_id": f"p{i}", "messages": [{"role": "user", "content": str(i)}]} for i in range(n)]


def ids(prompts):
    return [p["prompt_id"] for p in prompts]


# ---- load_prompts: JSONL ------------------------------------------------------------------------------------------


def test_prompt_and_messages_rows(tmp_path):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    path = jsonl(tmp_path, {"id": "a", "prompt": "Say hi."}, "", {"messages": msgs, "extra": 1})
    ps = load_prompts(path)
    assert ps.quarantined == []
    assert ps.prompts[0] == {"prompt_id": "a", "messages": [{"role": "user", "content": "Say hi."}], "meta": {}}
    assert ps.prompts[1]["messages"] == msgs
    assert ps.prompts[1]["meta"] == {"extra": 1}  # other fields travel with the prompt, for rewards
    second = load_prompts(path).prompts[1]["prompt_id"]  # no id: a hash of the messages, stable across reads
    assert ps.prompts[1]["prompt_id"] == second and len(second) == 12


def test_numeric_ids_become_strings(tmp_path):
    assert ids(load_prompts(jsonl(tmp_path, {"id": 7, "prompt": "x"})).prompts) == ["7"]


def test_invalid_json_names_file_and_line(tmp_path):
    path = jsonl(tmp_path, {"prompt": "a"}, {"prompt": "b"}, '{"prompt": ')
    assert "file.jsonl:3: invalid JSON" in error(path)


def test_row_without_prompt_or_messages(tmp_path):
    msg = error(jsonl(tmp_path, {"prompt": "a"}, {"text": "b"}))
    assert "file.jsonl:2" in msg and "needs a 'messages' or a 'prompt' field" in msg and "text" in msg


def test_non_object_line(tmp_path):
    assert "file.jsonl:1: expected a JSON object, got list" in error(jsonl(tmp_path, "[1, 2]"))


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"messages": [{"role": "robot", "content": "x"}]}, "column 'messages': message 0 must have 'role'"),
        ({"messages": [{"role": "user", "content": 3}]}, "column 'messages': message 0 must have 'role'"),
        ({"messages": []}, "column 'messages': must be a non-empty list"),
        ({"messages": "hi"}, "column 'messages': must be a non-empty list"),
        ({"prompt": ["hi"]}, "column 'prompt': message 0 must have 'role'"),
        ({"messages": [{"role": "assistant", "content": "a"}]}, "only assistant turns, no prompt"),
    ],
)
def test_bad_rows(tmp_path, row, expected):
    msg = error(jsonl(tmp_path, {"prompt": "ok"}, row))
    assert "file.jsonl:2" in msg and expected in msg


def test_duplicate_ids(tmp_path):
    msg = error(jsonl(tmp_path, {"id": "x", "prompt": "a"}, {"id": "y", "prompt": "b"}, {"id": "x", "prompt": "c"}))
    assert "file.jsonl:3: prompt id 'x' already used at" in msg and "file.jsonl:1" in msg


def test_duplicate_prompts_without_ids(tmp_path):
    assert "already used" in error(jsonl(tmp_path, {"prompt": "same"}, {"prompt": "same"}))


def test_empty_prompt_error_or_quarantine(tmp_path):
    only_system = {"messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": " "}]}
    path = jsonl(tmp_path, {"prompt": "a"}, {"prompt": ""}, only_system, {"prompt": "b"})
    msg = error(path)
    assert "file.jsonl:2: empty prompt" in msg and "on_empty=quarantine" in msg

    ps = load_prompts(path, on_empty="quarantine")
    assert [p["messages"][0]["content"] for p in ps.prompts] == ["a", "b"]
    assert [q["where"].rsplit("/", 1)[-1] for q in ps.quarantined] == ["file.jsonl:2", "file.jsonl:3"]
    assert ps.quarantined[0]["reason"] == "empty prompt" and ps.quarantined[0]["row"] == {"prompt": ""}


def test_bad_on_empty_value(tmp_path):
    assert "data.on_empty" in error(jsonl(tmp_path, {"prompt": "a"}), on_empty="skip")


def test_no_usable_prompts(tmp_path):
    assert "no usable prompts" in error(jsonl(tmp_path, {"prompt": ""}), on_empty="quarantine")
    assert "no usable prompts" in error(jsonl(tmp_path, name="empty.jsonl"))


def test_missing_file(tmp_path):
    msg = error(str(tmp_path / "nope.jsonl"))
    assert "nope.jsonl" in msg and "does not exist" in msg


def test_missing_package_is_a_prompt_error():
    assert "no_such_pkg" in error("pkg://no_such_pkg/prompts.jsonl")


def test_packaged_tiny_prompts():
    ps = load_prompts("pkg://data_gen/prompts/tiny.jsonl")
    assert len(ps.prompts) == 96 and len(set(ids(ps.prompts))) == 96 and ps.quarantined == []
    assert all(p["messages"][-1]["role"] == "user" and p["messages"][-1]["content"] for p in ps.prompts)


# ---- load_prompts: datasets on disk -------------------------------------------------------------------------------


def test_dataset_on_disk(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"id": ["a", "b"], "prompt": ["x", "y"]}).save_to_disk(str(tmp_path / "ds"))
    assert ids(load_prompts(str(tmp_path / "ds")).prompts) == ["a", "b"]

    datasets.Dataset.from_dict({"prompt": ["x", ""]}).save_to_disk(str(tmp_path / "bad"))
    assert "bad row 1: empty prompt" in error(str(tmp_path / "bad"))


def test_dataset_dict_split(tmp_path):
    import datasets

    msgs = [[{"role": "user", "content": "t"}],
            [{"role": "user", "content": "v"}, {"role": "assistant", "content": "a"}]]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"messages": msgs[:1]}),
         "test": datasets.Dataset.from_dict({"messages": msgs})}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [p["messages"] for p in load_prompts(str(tmp_path / "dd")).prompts] == msgs[:1]
    # An SFT set serves as prompts: the answer a row ends with is not part of its prompt.
    assert [p["messages"] for p in load_prompts(str(tmp_path / "dd"), split="test").prompts] == [msgs[0], msgs[1][:1]]
    assert "no split 'dev'" in error(str(tmp_path / "dd"), split="dev")


def test_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "junk").mkdir()
    assert "not a dataset saved with save_to_disk" in error(str(tmp_path / "junk"))


# ---- sample_round -------------------------------------------------------------------------------------------------


def round_of(prompts, n, r, seed=0):
    """Round r's prompts when every round draws n: round r starts at (r-1)*n in the stream."""
    return ids(sample_round(prompts, n, (r - 1) * n, seed))


def test_sample_round_deterministic():
    prompts = pool(50)
    assert sample_round(prompts, 10, 0, seed=0) == sample_round(prompts, 10, 0, seed=0)
    assert round_of(prompts, 10, 1, seed=0) != round_of(prompts, 10, 1, seed=1)
    assert round_of(prompts, 10, 1) != ids(prompts[:10])  # shuffled, not the file's head


def test_rounds_disjoint_while_the_pool_lasts():
    prompts = pool(96)
    rounds = [round_of(prompts, 32, r) for r in (1, 2, 3)]
    assert all(len(r) == 32 for r in rounds)
    assert len(set().union(*rounds)) == 96
    fourth = round_of(prompts, 32, 4)  # a fresh permutation begins
    assert len(set(fourth)) == 32 and fourth != rounds[0]


def test_rounds_of_different_sizes_stay_disjoint():
    prompts = pool(30)
    first = ids(sample_round(prompts, 8, 0, seed=3))
    second = ids(sample_round(prompts, 20, 8, seed=3))
    assert len(second) == 20 and not set(first) & set(second)


def test_n_larger_than_the_pool_is_an_error_not_a_silent_cap():
    prompts = pool(5)
    assert sorted(round_of(prompts, 5, 2)) == sorted(ids(prompts))
    with pytest.raises(PromptError, match="asks for 6 prompts from a pool of 5"):
        round_of(prompts, 6, 1)


def test_a_round_never_repeats_a_prompt():
    prompts = pool(10)
    for seed in range(20):
        for r in range(1, 6):
            got = round_of(prompts, 4, r, seed)
            assert len(got) == 4 and len(set(got)) == len(got), (seed, r, got)


def test_degenerate_samples_are_counted():
    from data_gen.generate import degenerate_samples

    rows = [{"prompt_id": "a", "text": "same"}, {"prompt_id": "a", "text": " same "},  # all K identical
            {"prompt_id": "b", "text": "one"}, {"prompt_id": "b", "text": "two"},
            {"prompt_id": "c", "text": ""}, {"prompt_id": "c", "text": "   "},  # identical and empty
            {"prompt_id": "d", "text": "alone"}]  # one sample: cannot be all-identical
    assert degenerate_samples(rows) == {"identical_k_rate": 2 / 3, "empty_rate": 2 / 7}
    assert degenerate_samples([]) == {"identical_k_rate": 0.0, "empty_rate": 0.0}


def test_bom_and_crlf_are_accepted_and_invalid_utf8_names_the_line(tmp_path):
    from data_gen.prompts import PromptError, load_prompts

    good = tmp_path / "windows.jsonl"
    good.write_bytes(b'\xef\xbb\xbf{"id": "a", "prompt": "caf\xc3\xa9?"}\r\n{"id": "b", "prompt": "two"}\r\n')
    assert [p["messages"][0]["content"] for p in load_prompts(str(good)).prompts] == ["café?", "two"]
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"id": "a", "prompt": "fine"}\n{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(PromptError, match=rf"{bad}:2: not UTF-8 text \(byte 0xe9 at column 27\)"):
        load_prompts(str(bad))
