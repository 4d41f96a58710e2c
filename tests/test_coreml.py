"""Core ML router export: the saved package matches the torch router, and damage is caught."""

import json
import shutil
import struct

import numpy as np
import pytest

pytest.importorskip("coremltools")

from helpers import tiny_router  # noqa: E402

from pudding_mlx.errors import PuddingError  # noqa: E402

NAMES = ["first", "second", "third"]
SKIPS = [[1], [2, 3], [4]]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from router_coreml.export import candidate_table, export_coreml

    root = tmp_path_factory.mktemp("coreml")
    router, tok = tiny_router(root / "router", NAMES, max_length=24)
    export_coreml(router, root / "router.mlpackage", candidate_table(NAMES, SKIPS))
    return router, tok, root / "router.mlpackage"


def _copy(package, tmp_path):
    dst = tmp_path / "copy.mlpackage"
    shutil.copytree(package, dst)
    return dst


def _spec_ops(spec):
    return list(spec.mlProgram.functions["main"].block_specializations.values())[0].operations


def _save_spec(spec, package):
    (package / "Data" / "com.apple.CoreML" / "model.mlmodel").write_bytes(spec.SerializeToString())


def test_export_passes_validation_and_metadata(exported):
    import coremltools as ct

    from router_coreml.verify import verify_mlpackage

    router, tok, package = exported
    report = verify_mlpackage(package, router, tok)
    assert report.precision == "float16"
    assert report.max_abs_diff <= report.tolerance
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    meta = dict(spec.description.metadata.userDefined)
    assert json.loads(meta["pudding.candidates"]) == [
        {"name": n, "skip": s} for n, s in zip(NAMES, SKIPS, strict=True)
    ]
    assert meta["pudding.max_length"] == "24"
    assert meta["pudding.tokenizer"] == "tiny-bert"
    assert [i.name for i in spec.description.input] == ["input_ids", "attention_mask"]
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 24]


def test_numpy_evaluation_matches_torch_in_fp32(tmp_path):
    """The op-by-op evaluator itself: with an fp32 program it must reproduce torch closely."""
    from router_coreml.export import ExportSettings, candidate_table, export_coreml
    from router_coreml.verify import verify_mlpackage

    router, tok = tiny_router(None, NAMES, max_length=16, seed=3, pooling="cls")
    package = tmp_path / "r32.mlpackage"
    export_coreml(router, package, candidate_table(NAMES, SKIPS),
                  ExportSettings(precision="float32", lengths=(8,)))
    report = verify_mlpackage(package, router, tok)
    assert report.max_abs_diff < 1e-4


def test_perturbed_weights_fail(exported, tmp_path):
    import coremltools as ct

    from router_coreml.verify import verify_mlpackage

    router, tok, package = exported
    package = _copy(package, tmp_path)
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    head = next(o for o in _spec_ops(spec)
                if o.type == "const" and "head_weight" in o.outputs[0].name)
    offset = head.attributes["val"].blobFileValue.offset
    blob = package / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    data = bytearray(blob.read_bytes())
    sentinel, _, size, start = struct.unpack_from("<IIQQ", data, offset)
    assert sentinel == 0xDEADBEEF
    # flip the sign of every fp16 weight of the head
    w = np.frombuffer(bytes(data[start:start + size]), np.uint16) ^ np.uint16(0x8000)
    data[start:start + size] = w.tobytes()
    blob.write_bytes(bytes(data))
    with pytest.raises(PuddingError, match="disagrees"):
        verify_mlpackage(package, router, tok)


def test_changed_op_fails(exported, tmp_path):
    import coremltools as ct

    from router_coreml.verify import verify_mlpackage

    router, tok, package = exported
    package = _copy(package, tmp_path)
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    div = next(o for o in _spec_ops(spec) if o.type == "real_div")  # mean pooling
    div.type = "mul"
    _save_spec(spec, package)
    with pytest.raises(PuddingError, match="disagrees"):
        verify_mlpackage(package, router, tok)


def test_wrong_metadata_fails(exported, tmp_path):
    import coremltools as ct

    from router_coreml.verify import verify_mlpackage

    router, tok, package = exported
    package = _copy(package, tmp_path)
    spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
    table = [{"name": n, "skip": s} for n, s in zip(reversed(NAMES), SKIPS, strict=True)]
    spec.description.metadata.userDefined["pudding.candidates"] = json.dumps(table)
    _save_spec(spec, package)
    with pytest.raises(PuddingError, match="candidates differ"):
        verify_mlpackage(package, router, tok)


def test_not_a_package(tmp_path):
    from router_coreml.verify import load_program

    with pytest.raises(PuddingError, match="not an .mlpackage"):
        load_program(tmp_path)
