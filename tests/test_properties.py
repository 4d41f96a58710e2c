"""Property tests: a random manifest either loads and routes as an independent oracle says
(the torch router's choice, the manifest's own skip set) or fails with BundleError; a random
skip set either runs with the logits of the torch model without those blocks or fails with
PuddingError. Nothing else may escape."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from helpers import torch_logits, torch_route
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import pudding_mlx
from pudding_mlx.bundle import MANIFEST
from pudding_mlx.errors import BundleError, PuddingError

NAMES = ["early", "middle", "late"]  # the tiny router's outputs, in order
BLOCKS = 6
PROMPTS = ["Which gas do plants absorb from the air?", "hello, how are you today?",
           "She poured the water into the glass because the glass was empty.", "   "]
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])


@pytest.fixture(scope="module")
def base(shared_tiny_bundle, tmp_path_factory):
    """A writable copy of the bundle (only pudding.json changes), its manifest dict, and the
    torch router's choice for each prompt."""
    path = Path(shutil.copytree(shared_tiny_bundle.path,
                                tmp_path_factory.mktemp("prop") / "b"))
    good = json.loads((path / MANIFEST).read_text())
    tb = shared_tiny_bundle
    choice = {p: torch_route(tb.router, tb.router_tokenizer, p).name for p in PROMPTS}
    return path, good, choice


# -- random manifests -----------------------------------------------------------------------------

valid_skips = st.lists(st.integers(1, BLOCKS - 1), max_size=4, unique=True)
bad_skips = st.one_of(st.lists(st.one_of(st.integers(-2, BLOCKS + 1),
                                         st.sampled_from(["1", None, 1.5, True])), max_size=4),
                      st.sampled_from(["1", None, 1.5, True, {}]))


def _mutations(draw, d: dict) -> None:
    """Zero to two things broken (or harmlessly odd) in an otherwise valid manifest."""
    r = d["router"]
    for kind in draw(st.lists(st.sampled_from(list(MUTATIONS)), max_size=2)):
        value = draw(st.sampled_from(MUTATIONS[kind]))
        if kind == "skip":
            d["candidates"][draw(st.integers(0, len(d["candidates"]) - 1))]["skip"] = \
                draw(bad_skips)
        elif kind == "static_skip":
            d["static"]["skip"] = draw(bad_skips)
        elif kind == "candidates":
            d["candidates"] = draw(st.lists(st.sampled_from(d["candidates"]), max_size=4))
        elif kind == "name":
            d["candidates"][0]["name"] = value
        elif kind in ("outputs", "max_length", "pooling"):
            r[kind] = value
        elif kind == "router_key":
            r["class"] = value
        elif kind == "files" and value == "drop":
            d["files"].pop(draw(st.sampled_from(sorted(d["files"]))))
        elif kind == "files":
            d["files"][value] = "0" * 64
        elif kind == "top_key":
            d[value] = {"module": "os"}  # unknown top-level keys are ignored
        else:
            d[kind] = value


MUTATIONS = {
    "skip": [None], "static_skip": [None], "candidates": [None],
    "name": ["x", "", 3, None, "late"],
    "protected": [[], [0, 3], [5], ["0"], [True], [1, 2, 3, 4, 5]],
    "num_blocks": [0, -1, 5, 7, True, "6", 6.0],
    "format_version": [0, 2, -1, "1", None, True],
    "outputs": [NAMES[::-1], NAMES[:2], NAMES + ["x"], ["early"] * 3],
    "max_length": [1, 64, "32", None], "pooling": ["cls", "max"],
    "router_key": ["os.system"], "files": ["drop", "../x", "/abs", "router/../../x"],
    "top_key": ["something_new"],
}


@st.composite
def manifests(draw, good: dict):
    d = copy.deepcopy(good)
    order = draw(st.permutations(NAMES))  # the manifest's order need not be the router's
    d["candidates"] = [{"name": n, "skip": draw(valid_skips), "task": "t",
                        "loss": "likelihood", "k": 0} for n in order]
    d["static"] = {"name": draw(st.sampled_from(["static", "early"])),
                   "skip": draw(valid_skips)}
    used = {b for c in [*d["candidates"], d["static"]] for b in c["skip"]}
    d["protected"] = [0, *draw(st.lists(st.sampled_from(
        [b for b in range(1, BLOCKS) if b not in used] or [0]), max_size=2, unique=True))]
    _mutations(draw, d)
    return d


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def expected_valid(d: dict, good: dict) -> bool:
    """The oracle, written from the contract in bundle.py's and masking.py's docstrings."""
    r = d["router"]
    sets = [*d["candidates"], d["static"]]
    protected = d["protected"]
    if not (is_int(d["format_version"]) and d["format_version"] == 1):
        return False
    if not (is_int(d["num_blocks"]) and d["num_blocks"] == BLOCKS):
        return False
    if d["files"] != good["files"] or "class" in r:
        return False
    if not all(is_int(p) for p in protected):
        return False
    names = [c["name"] for c in d["candidates"]]
    if sorted(map(str, names)) != sorted(NAMES) or r["outputs"] != NAMES:
        return False
    if r["max_length"] != 32 or r["pooling"] != "mean":
        return False
    for c in sets:
        s = c["skip"]
        if not isinstance(s, list) or not all(is_int(i) for i in s) or len(set(s)) != len(s):
            return False
        if any(not 0 <= i < BLOCKS for i in s) or set(s) & (set(protected) | {0}):
            return False
    return True


@given(data=st.data())
@SETTINGS
def test_random_manifest_loads_and_routes_or_is_a_bundle_error(base, data):
    path, good, choice = base
    d = data.draw(manifests(good))
    (path / MANIFEST).write_text(json.dumps(d))
    valid = expected_valid(d, good)
    event(f"valid={valid}")
    try:
        pm = pudding_mlx.load(path, verify=False)
    except BundleError as e:
        assert not valid, f"refused a valid manifest: {e}"
        assert "\n" not in str(e) and str(path) in str(e)
        return
    assert valid, "loaded an invalid manifest"
    by_name = {c["name"]: sorted(c["skip"]) for c in d["candidates"]}
    for prompt in PROMPTS:
        route = pm.route(prompt)
        if prompt.strip():
            assert route.name == choice[prompt]
            assert route.skip == by_name[route.name]
        else:
            assert route.skip == sorted(d["static"]["skip"])


def test_the_oracle_accepts_the_good_manifest(base):
    path, good, _ = base
    assert expected_valid(good, good)


# -- random skip sets -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded(shared_tiny_bundle):
    tb = shared_tiny_bundle
    pm = pudding_mlx.load(tb.path)
    ids = tb.tokenizer.encode("Question: Which gas do plants absorb from the air?\nAnswer:")
    return pm, tb.model, ids


@given(skip=st.one_of(
    st.lists(st.integers(1, BLOCKS - 1), max_size=BLOCKS - 1, unique=True),
    st.lists(st.one_of(st.integers(-1, BLOCKS), st.sampled_from([True, "2", 2.0])),
             max_size=BLOCKS)))
@SETTINGS
def test_random_skip_set_runs_like_torch_or_is_refused(loaded, skip):
    pm, model, ids = loaded
    valid = (all(is_int(i) and 0 < i < BLOCKS for i in skip) and len(set(skip)) == len(skip))
    try:
        route = pm.route("hello", skip=skip)
    except PuddingError as e:
        assert not valid, f"refused {skip}: {e}"
        return
    assert valid, f"accepted {skip}"
    assert route.skip == sorted(skip)
    event("ran")
    got = np.array(pm.view(route)(mx.array([ids]))[0].astype(mx.float32))
    np.testing.assert_allclose(got, torch_logits(model, ids, skip).numpy(), atol=2e-4,
                               rtol=1e-4)
