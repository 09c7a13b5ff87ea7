"""Tests for posttrain.rundir: stage folders, the manifest and the resume rules (no models, milliseconds each)."""

import json
from pathlib import Path

import pytest

from posttrain import rundir as rundir_mod
from posttrain.errors import PosttrainError
from posttrain.rundir import RunDir, Stage, StageChanged, StageError, StageResult, stable_hash, tree_hash

# The driver's order (recipes/loop.py); the run directory knows only the table it is given.
NAMES = ["rm", "generate", "score", "filter", "select", "sft", "dpo", "eval"]


def table(fns=None, resumable=False) -> list[Stage]:
    """A stage table in the driver's order, with the given stage functions (the others never run)."""
    fns = fns or {}
    return [Stage(n, fns.get(n, FakeStage()), resumable=resumable) for n in NAMES]


class FakeStage:
    """A stage function that writes `out.txt` (its text depends on `text` and the call number) and counts calls.
    With `fail=True` it writes its file, then raises, like a crash in the middle of a stage."""

    def __init__(self, text="hello", fail=False, output="out.txt", write=True):
        self.text, self.fail, self.output, self.write = text, fail, output, write
        self.calls = 0
        self.seen = []  # files present in the work dir when each call started

    def __call__(self, cfg, inputs, work: Path) -> StageResult:
        self.calls += 1
        self.seen.append(sorted(p.name for p in work.iterdir()))
        if self.write:
            (work / "out.txt").write_text(f"{self.text} {self.calls}")
        if self.fail:
            raise RuntimeError("stage crashed")
        return StageResult(outputs={"out": self.output}, rows=3, metrics={"m": 1.5})


def run(root, stage="generate", config=None, inputs=None, fn=None, redo=(), round_idx=1, resumable=False):
    """Open the run dir, run one stage, close. Returns (entry, fn)."""
    fn = fn or FakeStage()
    rd = RunDir(root, table({stage: fn}, resumable), redo=redo)
    try:
        entry = rd.run_stage(round_idx, stage, config or {"k": 1}, inputs or {})
    finally:
        rd.close()
    return entry, fn


def manifest(root) -> dict:
    return json.loads((Path(root) / "manifest.json").read_text())


def test_hashes():
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert stable_hash({"p": Path("/x")}) == stable_hash({"p": "/x"})  # default=str: paths hash as strings


def test_tree_hash(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, order in ((a, ["x", "y"]), (b, ["y", "x"])):  # creation order does not matter
        (d / "sub").mkdir(parents=True)
        for name in order:
            (d / "sub" / name).write_text(name)
    assert tree_hash(a) == tree_hash(b)
    (b / "sub" / "y").write_text("changed")
    assert tree_hash(a) != tree_hash(b)
    (b / "sub" / "y").write_text("y")
    (b / "sub" / "y").rename(b / "sub" / "z")  # same bytes, different name
    assert tree_hash(a) != tree_hash(b)
    assert tree_hash(a / "sub" / "x") == tree_hash(b / "sub" / "x")  # a single file


def test_stage_runs_once_and_records_entry(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    root = tmp_path / "run"
    entry, fn = run(root, inputs={"prompts": str(prompts)})

    assert fn.calls == 1
    final = root / "round_1" / "01_generate"
    assert (final / "out.txt").read_text() == "hello 1"
    assert not (root / "round_1" / ".01_generate.partial").exists()
    assert json.loads((final / "stage_config.json").read_text()) == {"k": 1}

    assert entry["round"] == 1 and entry["stage"] == "generate"
    assert entry["dir"] == "round_1/01_generate"
    assert entry["config_hash"] == stable_hash({"k": 1})
    assert entry["inputs"] == {"prompts": str(prompts)}  # outside the run dir: kept as given
    assert entry["input_hashes"] == {"prompts": tree_hash(prompts)}
    assert entry["outputs"] == {"out": "round_1/01_generate/out.txt"}  # relative to the run dir
    assert entry["rows"] == 3 and entry["metrics"] == {"m": 1.5}
    assert isinstance(entry["seconds"], float) and entry["seconds"] >= 0
    assert entry["output_hash"] == stable_hash({"out": tree_hash(final / "out.txt")})  # declared outputs only
    assert entry["versions"]["python"] and "torch" in entry["versions"]
    assert manifest(root) == {"format": 2, "stages": [entry], "superseded": []}


def test_same_config_and_inputs_skip(tmp_path):
    first, _ = run(tmp_path)
    second, fn = run(tmp_path)
    assert fn.calls == 0
    assert second == first
    assert (tmp_path / "round_1" / "01_generate" / "out.txt").read_text() == "hello 1"


def test_changed_config_is_an_error_and_leaves_the_folder(tmp_path):
    run(tmp_path, config={"k": 1, "same": 0})
    before = tree_hash(tmp_path / "round_1" / "01_generate")
    fn = FakeStage()
    with pytest.raises(StageChanged) as err:
        run(tmp_path, config={"k": 2, "same": 0}, fn=fn)
    msg = str(err.value)
    assert "round_1/generate" in msg and "config keys k" in msg and "same" not in msg
    assert "redo=[round_1/generate]" in msg
    assert fn.calls == 0
    assert tree_hash(tmp_path / "round_1" / "01_generate") == before
    assert len(manifest(tmp_path)["stages"]) == 1 and not (tmp_path / "round_1" / "superseded").exists()


@pytest.mark.parametrize("redo", ["round_1/generate", "generate", "all", "round_1"])
def test_redo_supersedes_the_old_folder(tmp_path, redo):
    old, _ = run(tmp_path, fn=FakeStage("old"))
    new, fn = run(tmp_path, config={"k": 2}, fn=FakeStage("new"), redo=[redo])
    assert fn.calls == 1
    assert (tmp_path / "round_1" / "01_generate" / "out.txt").read_text() == "new 1"
    kept = list((tmp_path / "round_1" / "superseded").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("01_generate.")
    assert (kept[0] / "out.txt").read_text() == "old 1"
    m = manifest(tmp_path)
    assert m["stages"] == [new]
    assert m["superseded"] == [{**old, "dir": f"round_1/superseded/{kept[0].name}"}]


def test_redo_of_another_stage_does_not_touch_this_one(tmp_path):
    run(tmp_path)
    _, fn = run(tmp_path, redo=["score", "round_2/generate"])
    assert fn.calls == 0


def test_redo_twice_in_the_same_second_keeps_both_old_folders(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir_mod.time, "strftime", lambda fmt, *a: "20250101-000000")  # one wall-clock second
    run(tmp_path, fn=FakeStage("v1"))
    run(tmp_path, fn=FakeStage("v2"), redo=["all"])
    run(tmp_path, fn=FakeStage("v3"), redo=["all"])
    kept = sorted((p / "out.txt").read_text() for p in (tmp_path / "round_1" / "superseded").iterdir())
    assert kept == ["v1 1", "v2 1"]
    assert len(manifest(tmp_path)["superseded"]) == 2


def _pipeline(root, prompts, redo=(), gen_text="gen"):
    """generate (reads prompts) -> score (reads generate's output), in one invocation."""
    gen, score = FakeStage(gen_text), FakeStage("score")
    rd = RunDir(root, table({"generate": gen, "score": score}), redo=redo)
    try:
        g = rd.run_stage(1, "generate", {"k": 1}, {"prompts": str(prompts)})
        s = rd.run_stage(1, "score", {"rm": "x"}, {"generations": rd.output(g, "out")})
    finally:
        rd.close()
    return gen, score, g, s


def test_downstream_of_a_redone_stage_is_redone(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("a\n")
    root = tmp_path / "run"
    _, _, g1, s1 = _pipeline(root, prompts)
    assert s1["inputs"] == {"generations": "round_1/01_generate/out.txt"}
    assert s1["input_hashes"] == {"generations": g1["output_hash"]}

    gen, score, g2, s2 = _pipeline(root, prompts, redo=["round_1/generate"], gen_text="regen")
    assert gen.calls == 1 and score.calls == 1
    assert s2["input_hashes"] == {"generations": g2["output_hash"]} != s1["input_hashes"]
    assert sorted(e["stage"] for e in manifest(root)["superseded"]) == ["generate", "score"]
    assert len(list((root / "round_1" / "superseded").iterdir())) == 2

    gen, score, *_ = _pipeline(root, prompts, gen_text="regen")  # and then it is all finished again
    assert gen.calls == score.calls == 0


def test_input_changed_by_hand_is_an_error(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("a\n")
    root = tmp_path / "run"
    _pipeline(root, prompts)
    prompts.write_text("b\n")
    with pytest.raises(StageChanged, match=r"round_1/generate .*inputs prompts"):
        _pipeline(root, prompts)


def _crash(root, config=None):
    """Run a stage that writes its file and then crashes, leaving round_1/.01_generate.partial behind."""
    with pytest.raises(StageError, match=r"^stage round_1/generate failed: RuntimeError: stage crashed\n\(traceback: "):
        run(root, config=config, fn=FakeStage("partial", fail=True))
    assert "RuntimeError: stage crashed" in (Path(root) / "round_1" / ".01_generate.partial" / "error.log").read_text()
    assert (Path(root) / "round_1" / ".01_generate.partial" / "out.txt").exists()


def test_failed_stage_leaves_no_entry_and_no_final_folder(tmp_path):
    _crash(tmp_path)
    assert not (tmp_path / "round_1" / "01_generate").exists()
    assert not (tmp_path / "manifest.json").exists() or manifest(tmp_path)["stages"] == []
    _, fn = run(tmp_path)  # the next invocation runs it
    assert fn.calls == 1 and len(manifest(tmp_path)["stages"]) == 1


def test_partial_wiped_when_not_resumable(tmp_path):
    _crash(tmp_path)
    _, fn = run(tmp_path, resumable=False)
    assert "out.txt" not in fn.seen[0]


def test_partial_kept_when_resumable_and_marker_matches(tmp_path):
    _crash(tmp_path)
    _, fn = run(tmp_path, resumable=True)
    assert "out.txt" in fn.seen[0]
    assert fn.calls == 1 and (tmp_path / "round_1" / "01_generate" / "out.txt").exists()


def test_partial_wiped_when_resumable_but_config_differs(tmp_path):
    _crash(tmp_path, config={"k": 1})
    _, fn = run(tmp_path, config={"k": 2}, resumable=True)
    assert "out.txt" not in fn.seen[0]


def test_final_folder_without_entry_is_redone(tmp_path):
    stale = tmp_path / "round_1" / "01_generate"
    stale.mkdir(parents=True)
    (stale / "junk.txt").write_text("left by a driver that died before writing the manifest")
    entry, fn = run(tmp_path)
    assert fn.calls == 1
    assert sorted(p.name for p in stale.iterdir()) == [".stage.json", "out.txt", "stage_config.json"]
    assert manifest(tmp_path)["stages"] == [entry]


def test_missing_declared_output_is_an_error(tmp_path):
    with pytest.raises(PosttrainError, match=r"round_1/generate did not produce its output 'out' \(missing.bin\)"):
        run(tmp_path, fn=FakeStage(output="missing.bin"))
    assert not (tmp_path / "round_1" / "01_generate").exists()
    assert not (tmp_path / "manifest.json").exists() or manifest(tmp_path)["stages"] == []


def test_lock(tmp_path):
    first = RunDir(tmp_path, table())
    with pytest.raises(PosttrainError, match="in use by another posttrain process"):
        RunDir(tmp_path, table())
    first.close()
    RunDir(tmp_path, table()).close()


def test_write_config_keeps_history(tmp_path):
    rd = RunDir(tmp_path, table())
    rd.write_config("a: 1\n")
    rd.write_config("a: 1\n")  # unchanged: no history entry
    assert not (tmp_path / "config.history").exists()
    rd.write_config("a: 2\n")
    rd.write_config("a: 3\n")
    rd.close()
    assert (tmp_path / "config.yaml").read_text() == "a: 3\n"
    hist = tmp_path / "config.history"
    assert {p.name: p.read_text() for p in hist.iterdir()} == {"001.yaml": "a: 1\n", "002.yaml": "a: 2\n"}
    assert not (tmp_path / ".config.yaml.tmp").exists()


def test_manifest_is_valid_json_after_each_stage(tmp_path):
    rd = RunDir(tmp_path, table())
    for n, stage in enumerate(["generate", "score", "select"], 1):
        rd.run_stage(1, stage, {"k": 1}, {})
        assert [e["stage"] for e in manifest(tmp_path)["stages"]] == ["generate", "score", "select"][:n]
        assert not (tmp_path / ".manifest.json.tmp").exists()
    rd.close()
    assert sorted(p.name for p in (tmp_path / "round_1").iterdir()) == ["01_generate", "02_score", "04_select"]


def test_rounds_are_separate(tmp_path):
    run(tmp_path, round_idx=1)
    entry, fn = run(tmp_path, round_idx=2)
    assert fn.calls == 1 and entry["dir"] == "round_2/01_generate"
    assert [(e["round"], e["stage"]) for e in manifest(tmp_path)["stages"]] == [(1, "generate"), (2, "generate")]


def test_folders_are_numbered_by_the_table_given(tmp_path):
    rd = RunDir(tmp_path, [Stage("b", FakeStage()), Stage("a", FakeStage())])
    try:
        assert rd.run_stage(1, "a", {"k": 1}, {})["dir"] == "round_1/01_a"
        with pytest.raises(PosttrainError, match=r"unknown stage 'c'.*\['b', 'a'\]"):
            rd.run_stage(1, "c", {"k": 1}, {})
    finally:
        rd.close()


def test_typed_config_and_list_inputs(tmp_path):
    """A dataclass config is hashed and saved as plain data (Enums by value); a list input is fingerprinted
    element by element, so a changed element is named."""
    from posttrain.config import Pairing, SelectConfig, SelectJob

    data = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for p in data:
        p.write_text(p.name)
    job = SelectJob(select=SelectConfig(pairs=Pairing.best_vs_random_lower), seed=3)
    root = tmp_path / "run"
    entry, fn = run(root, stage="select", config=job, inputs={"data": [str(p) for p in data]})
    saved = json.loads((root / "round_1" / "04_select" / "stage_config.json").read_text())
    assert saved["select"]["pairs"] == "best_vs_random_lower" and saved["seed"] == 3
    assert entry["config_hash"] == stable_hash(saved)
    assert entry["input_hashes"] == {"data": [tree_hash(p) for p in data]}
    assert entry["inputs"] == {"data": [str(p) for p in data]}

    _, fn = run(root, stage="select", config=job, inputs={"data": [str(p) for p in data]})
    assert fn.calls == 0
    data[1].write_text("changed")
    with pytest.raises(StageChanged, match=r"round_1/select .*inputs data"):
        run(root, stage="select", config=job, inputs={"data": [str(p) for p in data]})


def test_secrets_reach_no_file_and_change_no_hash(tmp_path):
    """stage_config.json, overrides.yaml and config.yaml hold no key; a rotated key redoes no stage."""
    from posttrain.rundir import redact, redact_override

    secret = {"backend": {"api_key": "sk-live-123", "base_url": "https://bob:hunter2@host/v1", "k": 1}}
    first, _ = run(tmp_path, config=secret)
    saved = (tmp_path / "round_1" / "01_generate" / "stage_config.json").read_text()
    assert "sk-live-123" not in saved and "hunter2" not in saved and "<redacted>" in saved
    rotated = {"backend": {**secret["backend"], "api_key": "sk-live-456"}}
    _, fn = run(tmp_path, config=rotated)
    assert fn.calls == 0  # same stage: the key is not part of what it computes

    rd = RunDir(tmp_path, table())
    rd.write_config("a: 1\n", overrides=["+generate.backend.api_key=sk-live-123", "seed=3",
                                         "generate.backend.base_url=https://bob:hunter2@host/v1"])
    rd.close()
    written = (tmp_path / "overrides.yaml").read_text()
    assert "sk-live-123" not in written and "hunter2" not in written and "seed=3" in written
    assert redact_override("~evals.teacher") == "~evals.teacher"
    assert redact({"token": None, "x": ["http://a:b@c"]}) == {"token": None, "x": ["http://<redacted>@c"]}


def test_a_list_input_that_lost_an_element_is_not_taken_for_remade(tmp_path):
    """Redone stages may remake list elements; a list that shrank is a change the user must confirm."""
    rd = RunDir(tmp_path, table())
    rd._fresh_outputs = {"h2"}
    assert rd._remade(["h1"], ["h1", "h2"])  # grew by a fresh element
    assert rd._remade(["h1", "h0"], ["h1", "h2"])  # an element remade
    assert not rd._remade(["h1", "h3"], ["h1"])  # lost one
    assert not rd._remade(["h1", "h3"], ["h3", "h1"])  # reordered
    rd.close()


def test_a_truncated_or_older_manifest_is_named_and_nothing_is_touched(tmp_path):
    run(tmp_path)
    text = (tmp_path / "manifest.json").read_text()
    (tmp_path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(PosttrainError, match=r"manifest.json is not valid JSON .*truncated by hand"):
        RunDir(tmp_path, table())
    old = json.loads(text)
    del old["format"]  # what a run started before typed stage configs has
    (tmp_path / "manifest.json").write_text(json.dumps(old))
    with pytest.raises(PosttrainError, match="started by an older posttrain"):
        RunDir(tmp_path, table())
    assert (tmp_path / "round_1" / "01_generate" / "out.txt").read_text() == "hello 1"


def test_a_deleted_or_changed_output_is_named_on_resume(tmp_path):
    run(tmp_path)
    out = tmp_path / "round_1" / "01_generate" / "out.txt"
    out.write_text("edited by hand, longer")
    with pytest.raises(PosttrainError, match=r"stage round_1/generate finished, but its output\(s\) \['out'\] .*"
                                             r"redo=\[round_1/generate\]"):
        run(tmp_path)
    out.unlink()
    with pytest.raises(PosttrainError, match=r"output\(s\) \['out'\]"):
        run(tmp_path)
    _, fn = run(tmp_path, redo=["round_1/generate"])
    assert fn.calls == 1 and out.read_text() == "hello 1"


def test_a_missing_manifest_never_wipes_finished_stages(tmp_path):
    run(tmp_path, stage="generate")
    run(tmp_path, stage="score")
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(PosttrainError, match=r"manifest.json is missing, but .* holds finished stage folders"):
        RunDir(tmp_path, table())
    assert (tmp_path / "round_1" / "01_generate" / "out.txt").exists()
    assert (tmp_path / "round_1" / "02_score" / "out.txt").exists()


def test_a_stage_folder_without_its_entry_is_set_aside_not_deleted(tmp_path):
    run(tmp_path)
    (tmp_path / "manifest.json").unlink()  # as if the driver died between the rename and the manifest write
    _, fn = run(tmp_path)
    assert fn.calls == 1
    (kept,) = (tmp_path / "round_1" / "superseded").iterdir()
    assert kept.name.endswith(".orphan") and (kept / "out.txt").read_text() == "hello 1"


def test_settings_added_later_at_their_old_behaviour_leave_a_finished_stages_hash_alone():
    from posttrain.config import EvalConfig, EvalJob, SFTConfig, TrainJob
    from posttrain.rundir import ADDED_AT_DEFAULT, _hash_recorded, config_hash_of, plain

    for job, section in ((TrainJob(train=SFTConfig()), "train"), (EvalJob(evals=EvalConfig(), round=1), "evals")):
        recorded = plain(job)
        before = {**recorded, section: {k: v for k, v in recorded[section].items()
                                        if not (k in ADDED_AT_DEFAULT and v == ADDED_AT_DEFAULT[k])}}
        assert len(before[section]) < len(recorded[section])
        assert config_hash_of(job) == _hash_recorded(before)  # what a run directory made before them recorded
    assert config_hash_of(TrainJob(train=SFTConfig(packing=True))) != config_hash_of(TrainJob(train=SFTConfig()))
    assert config_hash_of(TrainJob(train=SFTConfig(data=["x.jsonl"]))) != config_hash_of(TrainJob(train=SFTConfig()))
