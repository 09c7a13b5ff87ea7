"""posttrain.shards: Arrow shards published as a `datasets` folder without a copy, read back in batches and by
row range, and the GPUs each data-stage process gets."""

from __future__ import annotations

import datasets
import pytest

from posttrain.errors import PosttrainError
from posttrain.rundir import tree_hash
from posttrain.shards import Shards, arrow_files, count_rows, gpu_slice, iter_columns, publish, read_rows

FEATURES = datasets.Features({"i": datasets.Value("int64"), "text": datasets.Value("string"),
                              "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}]})


def _rows(lo: int, hi: int) -> dict:
    return {"i": list(range(lo, hi)), "text": [f"t{i}" for i in range(lo, hi)],
            "messages": [[{"role": "user", "content": f"q{i}"}] for i in range(lo, hi)]}


def test_shards_publish_as_a_dataset_and_read_back_in_batches_and_ranges(tmp_path):
    shards = Shards(tmp_path, 4, desc="test")
    for i, (lo, hi) in enumerate([(0, 5), (5, 5), (5, 12), (12, 13)]):  # shard 1 is empty
        shards.finish(i, _rows(lo, hi), FEATURES, tokens=hi - lo)
    assert shards.todo() == [] and Shards(tmp_path, 5).todo() == [4]
    throughput = shards.throughput(2.0)
    assert [throughput[k] for k in ("rows", "tokens", "shards", "rows_per_s")] == [13, 13, 4, 6.5]
    files = shards.files()
    assert publish(files, tmp_path / "out", FEATURES) == 13
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert ds["i"] == list(range(13)) and ds[6]["messages"] == [{"role": "user", "content": "q6"}]
    # linked (the shards stay until the stage deletes them, so a crash while publishing loses nothing); the empty
    # shard is left out, and publishing again (a rerun) gives the same folder
    assert len(arrow_files(tmp_path / "out")) == 3 and all(f.exists() for f in files)
    before = tree_hash(tmp_path / "out")
    publish(files, tmp_path / "out", FEATURES)
    assert tree_hash(tmp_path / "out") == before
    assert count_rows(tmp_path / "out") == 13
    batches = list(iter_columns(tmp_path / "out", ["text"], 4))
    assert max(len(b) for b in batches) <= 4 and [t for b in batches for t in b.column("text").to_pylist()] == \
        [f"t{i}" for i in range(13)] and batches[0].column_names == ["text"]
    assert read_rows(arrow_files(tmp_path / "out"), 3, 9).column("i").to_pylist() == list(range(3, 9))
    # a selected (index-mapped) dataset is read through datasets' own batches
    picked = ds.select([2, 7])
    assert [t for b in iter_columns(picked, ["i"]) for t in b.column("i").to_pylist()] == [2, 7]


def test_a_missing_shard_stops_the_merge_naming_it(tmp_path):
    shards = Shards(tmp_path, 2, desc="round 1 score")
    shards.finish(0, _rows(0, 2), FEATURES)
    with pytest.raises(PosttrainError, match=r"round 1 score: shards \[1\] of 2 were not written"):
        shards.files()


def test_no_rows_at_all_publish_an_empty_dataset_that_reloads(tmp_path):
    assert publish([], tmp_path / "out", FEATURES) == 0
    ds = datasets.load_from_disk(str(tmp_path / "out"))
    assert len(ds) == 0 and ds.features == FEATURES


def test_each_local_process_gets_an_equal_slice_of_the_nodes_gpus():
    gpus = [str(i) for i in range(8)]
    assert gpu_slice(1, 2, gpus) == ["4", "5", "6", "7"]  # one 4-GPU tensor-parallel engine per process
    assert [gpu_slice(r, 8, gpus) for r in range(8)] == [[g] for g in gpus]  # one reward model per GPU
    assert gpu_slice(0, 2, []) == [] and gpu_slice(0, 1, gpus) == gpus
    with pytest.raises(PosttrainError, match="16 processes per node, but the node has 8 GPUs"):
        gpu_slice(0, 16, gpus)


def test_a_contiguous_slice_of_a_dataset_is_read_as_the_slice(tmp_path):
    shards = Shards(tmp_path, 1)
    shards.finish(0, _rows(0, 10), FEATURES)
    publish(shards.files(), tmp_path / "out", FEATURES)
    part = datasets.load_from_disk(str(tmp_path / "out")).select(range(3, 7))  # no indices mapping: a slice
    assert [i for b in iter_columns(part, ["i"], 2) for i in b.column("i").to_pylist()] == [3, 4, 5, 6]


def test_a_data_stage_runs_on_several_processes_only_where_the_recipe_says_so():
    from posttrain.shards import processes

    assert processes({"nnodes": 8}, "generate") == 1  # a multi-node recipe alone does not spread the data stages
    launch = {"nnodes": 8, "data": {"nproc": {"score": 2}}}
    assert (processes(launch, "score"), processes(launch, "generate")) == (16, 1)
