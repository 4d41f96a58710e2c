"""`pudding build --until router` (the torch steps: search, labels, router training) on a CUDA
device against the same steps on the CPU, float32 both, on a tiny LLaMA; and the bfloat16 CUDA
labels against a plain HF forward. Only for a machine with a GPU: `make test-cuda` (these tests
fail, not skip, without one). Needs no MLX: the bundle's conversion is the one step that does,
and it runs on the CPU wherever the build finishes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import tiny_backbone, tiny_llama, write_task_data

from convert.build import build as build_command
from convert.label_store import read_labels

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    assert torch.cuda.is_available(), "these tests need a CUDA device"
    root = tmp_path_factory.mktemp("cuda")
    model, tok = tiny_llama(root / "hf", num_layers=6)
    return root, write_task_data(root / "data"), tiny_backbone(root / "backbone"), model, tok


def build(setup, name: str, device: str, torch_dtype: str) -> Path:
    root, data, backbone, _, _ = setup
    at = root / name
    args = ["--model", root / "hf", "--out", at / "bundle", "--work", at / "work",
            "--profile", "quick", "--tasks", "arc_easy,piqa", "--losses", "likelihood,margin",
            "--k", "2", "--samples", "4", "--max-examples-per-task", "10", "--epochs", "2",
            "--batch-size", "4", "--warmup-steps", "0", "--backbone", backbone,
            "--router-max-length", "32", "--dtype", "float32", "--torch-dtype", torch_dtype,
            "--device", device, "--data-dir", data, "--until", "router"]
    result = CliRunner().invoke(build_command, [str(a) for a in args])
    assert result.exit_code == 0, (result.output, result.exception)
    return at


@pytest.fixture(scope="module")
def cpu(setup):
    return build(setup, "cpu", "cpu", "float32")


@pytest.fixture(scope="module")
def cuda(setup):
    return build(setup, "cuda", "cuda", "float32")


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_search_on_cuda_picks_the_cpu_sets(cpu, cuda):
    a = read(cpu / "work" / "search" / "candidates.json")
    b = read(cuda / "work" / "search" / "candidates.json")
    assert b["settings"]["device"] == "cuda" and b["settings"]["dtype"] == "float32"
    assert [c["skip"] for c in b["candidates"]] == [c["skip"] for c in a["candidates"]]
    for ca, cb in zip(a["candidates"], b["candidates"], strict=True):
        np.testing.assert_allclose([p["loss"] for p in cb["trajectory"]],
                                   [p["loss"] for p in ca["trajectory"]], rtol=1e-4)


def test_labels_on_cuda_match_the_cpu(cpu, cuda):
    a, b = read_labels(cpu / "work" / "labels"), read_labels(cuda / "work" / "labels")
    assert b.text == a.text and len(a) == 10 * 4 + 10 * 2
    np.testing.assert_allclose(b.loglik, a.loglik, rtol=0, atol=1e-4)


def test_router_trained_on_cuda_matches_the_cpu(cpu, cuda):
    """Same losses epoch by epoch and the same held-out predictions' error (weights are not
    compared: AdamW turns float noise in near-zero gradients into steps of the learning rate)."""
    a = read(cpu / "work" / "router" / "metrics.json")
    b = read(cuda / "work" / "router" / "metrics.json")
    assert len(b["history"]) == 2 and b["selected_epoch"] == a["selected_epoch"]
    for ha, hb in zip(a["history"], b["history"], strict=True):
        assert hb["train_mse"] == pytest.approx(ha["train_mse"], rel=1e-4)
        assert hb["eval_mse"] == pytest.approx(ha["eval_mse"], rel=1e-4)
    assert b["eval_mse"] == pytest.approx(a["eval_mse"], rel=1e-4)
    assert b["history"][0]["train_mse"] != b["history"][1]["train_mse"]  # it trained


def test_bfloat16_labels_on_cuda_match_hf_within_bf16_error(setup, tmp_path):
    """The default dtype on CUDA is bfloat16: its labels stay within bf16 rounding of a plain
    float64 HF forward (test_labels.reference_loglik) and order the choices the same way."""
    from test_labels import reference_loglik

    from convert.labels import LabelConfig, label_examples, make_labels

    root, data, _, model, tok = setup
    cands = [{"name": "none", "skip": []}, {"name": "two", "skip": [1, 4]}]
    cfg = LabelConfig(model=str(root / "hf"), candidates=cands, tasks=["arc_easy"],
                      data_dir=str(data), max_examples_per_task=6)
    meta = make_labels(tmp_path / "bf16", cfg, device="cuda")
    assert meta["settings"]["dtype"] == "bfloat16"
    t = read_labels(tmp_path / "bf16")
    requests = [r for ex in label_examples(cfg) for r in ex.prompt]
    want = np.array([[reference_loglik(model, tok, c, x, s["skip"]) for s in cands]
                     for c, x in requests])
    np.testing.assert_allclose(t.loglik, want, rtol=0, atol=0.1)
    assert np.corrcoef(t.loglik.ravel(), want.ravel())[0, 1] > 0.99
