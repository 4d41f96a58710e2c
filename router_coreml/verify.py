"""Check a saved `router.mlpackage` against the torch router, on Linux as well as on macOS.

`predict` only exists on macOS, so on every platform the saved program is read back
(spec + milproto loader + weight file) and evaluated op by op with numpy: coremltools' own
value inference for most ops, plus numpy versions of those that lack it. Each op computes
in float32 and stores its result in the op's declared dtype (fp16 in an fp16 program), so
overflow and rounding between ops show up as they would on device. This checks the saved
graph, weights and metadata, not Apple's kernels; on macOS `predict` is compared as well.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pudding_mlx.errors import PuddingError

from .export import INPUTS, META_PREFIX, OUTPUT

# |coreml - torch| <= ATOL + RTOL * max|torch| over all scores of all test inputs.
# fp16 keeps 11 significant bits (relative step 4.9e-4); a few layers of rounding stay
# well inside 1e-2 relative. fp32 only differs from torch by summation order.
TOLERANCE = {"float16": (1e-2, 1e-2), "float32": (1e-4, 1e-4)}

TEXTS = (
    "Question: Which gas do plants absorb from the air?",
    "hello, how are you today?",
    "She poured the water into the glass because the glass was empty. Why did she do that? "
    "Explain it step by step, with as many words as the router can take in one prompt.",
)


@dataclass
class VerifyReport:
    max_abs_diff: float
    tolerance: float
    precision: str
    num_inputs: int
    predict_max_abs_diff: float | None = None  # macOS only
    op_types: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "precision": self.precision,
            "num_inputs": self.num_inputs,
            "predict_max_abs_diff": self.predict_max_abs_diff,
        }


def _erf(x: np.ndarray) -> np.ndarray:
    return np.frompyfunc(math.erf, 1, 1)(x).astype(np.float32)


def _gelu(x, mode="EXACT"):
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x / (1 + np.exp(-1.702 * x))
    return 0.5 * x * (1 + _erf(x / math.sqrt(2)))


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _layer_norm(x, axes=None, gamma=None, beta=None, epsilon=1e-5):
    axes = tuple(range(x.ndim)) if axes is None else tuple(int(a) for a in np.ravel(axes))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    y = (x - mean) / np.sqrt(var + epsilon)
    if gamma is not None:
        y = y * gamma
    if beta is not None:
        y = y + beta
    return y


def _matmul(x, y, transpose_x=False, transpose_y=False):
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


def _linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if batch_dims:
        raise PuddingError("Core ML check: gather with batch_dims is not supported")
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return np.take(x, idx, axis=int(axis))


def _reduce(fn):
    def run(x, axes=None, keep_dims=False):
        axes = None if axes is None else tuple(int(a) for a in np.ravel(axes))
        return fn(x, axis=axes, keepdims=bool(keep_dims))

    return run


def _expand_dims(x, axes):
    return np.expand_dims(x, tuple(int(a) for a in np.ravel(axes)))


def _squeeze(x, axes=None):
    return np.squeeze(x, None if axes is None else tuple(int(a) for a in np.ravel(axes)))


def _reshape(x, shape):
    shape = [x.shape[i] if int(s) == 0 else int(s) for i, s in enumerate(np.ravel(shape))]
    return np.reshape(x, shape)


# numpy versions of the ops coremltools cannot value-infer, would run slowly in fp16, or
# infer from the declared (possibly symbolic, enumerated) shape instead of the value
NUMPY_OPS = {
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "reshape": _reshape,
    "shape": lambda x: np.array(x.shape, np.int32),
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "linear": _linear,
    "matmul": _matmul,
    "layer_norm": _layer_norm,
    "gelu": _gelu,
    "softmax": _softmax,
    "gather": _gather,
    "reduce_sum": _reduce(np.sum),
    "reduce_mean": _reduce(np.mean),
    "reduce_max": _reduce(np.max),
    "reduce_min": _reduce(np.min),
    "reduce_prod": _reduce(np.prod),
}


def _as_compute(v):
    if isinstance(v, np.ndarray) and v.dtype == np.float16:
        return v.astype(np.float32)
    return v


def _value_infer(op, values: dict[str, np.ndarray]):
    """Run coremltools' value inference for `op` with runtime values bound to its inputs."""
    bound = []
    for var in op.inputs.values():
        for v in var if isinstance(var, (list, tuple)) else (var,):
            if v.name in values and v.val is None:
                sym = v.sym_type()
                sym.val = values[v.name]
                v._sym_val = sym
                bound.append(v)
    try:
        return op.value_inference()
    except NotImplementedError:
        raise PuddingError(f"Core ML check: no numpy evaluation for op {op.op_type!r}") from None
    finally:
        for v in bound:
            v._sym_val = None


def run_program(function, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate a MIL function (from the milproto loader) on concrete inputs."""
    from coremltools.converters.mil.mil import types

    values: dict[str, np.ndarray] = {}
    for name, var in function.inputs.items():
        values[name] = np.asarray(inputs[name]).astype(types.nptype_from_builtin(var.dtype))

    def arg(v):
        if isinstance(v, (list, tuple)):
            return [arg(x) for x in v]
        return values.get(v.name, v.val)

    for op in function.operations:
        if op.op_type == "const":
            values[op.outputs[0].name] = op.outputs[0].val
            continue
        if op.blocks:
            raise PuddingError(f"Core ML check: control-flow op {op.op_type!r} is not supported")
        if op.op_type in NUMPY_OPS:
            kwargs = {k: _as_compute(arg(v)) for k, v in op.inputs.items()}
            results = NUMPY_OPS[op.op_type](**kwargs)
        else:
            results = _value_infer(op, values)
        results = results if isinstance(results, tuple) else (results,)
        for out, r in zip(op.outputs, results, strict=True):
            r = np.asarray(r)
            if types.is_tensor(out.sym_type) or types.is_scalar(out.sym_type):
                with np.errstate(over="ignore"):
                    r = r.astype(types.nptype_from_builtin(out.dtype))
            values[out.name] = r
    return {v.name: values[v.name] for v in function.outputs}


def load_program(package: str | Path):
    """(spec, MIL program) of a saved .mlpackage, without Core ML's runtime."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto

    package = Path(package)
    if not (package / "Manifest.json").is_file():
        raise PuddingError(f"{package}: not an .mlpackage (no Manifest.json)")
    try:
        spec = ct.models.MLModel(str(package), skip_model_load=True).get_spec()
        weights = package / "Data" / "com.apple.CoreML" / "weights"
        program = load_milproto(spec, spec.specificationVersion, str(weights))
    except Exception as e:  # coremltools raises many types for a damaged package
        raise PuddingError(f"{package}: cannot read the Core ML program ({e})") from None
    return spec, program


def check_interface(spec, package: Path, outputs: list[str], max_length: int) -> dict[str, str]:
    """Inputs, output and metadata are what a Swift app expects; returns the metadata."""
    from coremltools.proto import FeatureTypes_pb2 as ft

    desc = spec.description
    names = [i.name for i in desc.input]
    if names != list(INPUTS):
        raise PuddingError(f"{package}: inputs are {names}, expected {list(INPUTS)}")
    for i in desc.input:
        arr = i.type.multiArrayType
        if arr.dataType != ft.ArrayFeatureType.INT32:
            raise PuddingError(f"{package}: input {i.name} is not int32")
        if arr.WhichOneof("ShapeFlexibility") == "shapeRange":
            raise PuddingError(f"{package}: input {i.name} has a flexible range shape")
        if list(arr.shape) != [1, max_length]:
            raise PuddingError(
                f"{package}: input {i.name} shape {list(arr.shape)} != [1, {max_length}]"
            )
    if [o.name for o in desc.output] != [OUTPUT]:
        got = [o.name for o in desc.output]
        raise PuddingError(f"{package}: outputs are {got}, expected {[OUTPUT]}")
    meta = dict(desc.metadata.userDefined)
    for key in ("tokenizer", "max_length", "pooling", "candidates"):
        if META_PREFIX + key not in meta:
            raise PuddingError(f"{package}: metadata lacks {META_PREFIX + key}")
    table = json.loads(meta[META_PREFIX + "candidates"])
    if [c["name"] for c in table] != list(outputs):
        raise PuddingError(
            f"{package}: metadata candidates differ from the router outputs {outputs}"
        )
    if int(meta[META_PREFIX + "max_length"]) != max_length:
        raise PuddingError(f"{package}: metadata max_length differs from the router's {max_length}")
    return meta


def verify_mlpackage(
    package: str | Path,
    router,
    tokenizer,
    texts: tuple[str, ...] = TEXTS,
) -> VerifyReport:
    """Compare the saved package with the torch `router` on `texts`; PuddingError on failure."""
    import torch

    package = Path(package)
    cfg = router.config
    spec, program = load_program(package)
    meta = check_interface(spec, package, cfg.outputs, cfg.max_length)
    precision = meta.get(META_PREFIX + "precision", "float16")
    atol, rtol = TOLERANCE[precision]
    function = program.functions["main"]

    lengths = json.loads(meta.get(META_PREFIX + "lengths", f"[{cfg.max_length}]"))
    diff, tol = 0.0, 0.0
    for length in lengths:  # every enumerated shape the package accepts
        enc = tokenizer(list(texts), padding="max_length", truncation=True,
                        max_length=length, return_tensors="np")
        ids = enc["input_ids"].astype(np.int32)
        mask = enc["attention_mask"].astype(np.int32)
        with torch.no_grad():
            ref = router.eval()(torch.from_numpy(ids).long(), torch.from_numpy(mask).long())
        ref = ref.numpy()
        got = np.stack([
            run_program(function, {"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]})[
                function.outputs[0].name
            ].astype(np.float32)[0]
            for i in range(len(texts))
        ])
        tol = max(tol, atol + rtol * float(np.abs(ref).max()))
        diff = max(diff, float(np.abs(got - ref).max()) if np.isfinite(got).all() else math.inf)
    report = VerifyReport(diff, tol, precision, len(texts) * len(lengths))
    for op in function.operations:
        report.op_types[op.op_type] = report.op_types.get(op.op_type, 0) + 1
    if not diff <= tol:
        raise PuddingError(
            f"{package}: Core ML program disagrees with the torch router "
            f"(max |diff| {diff:.3g} > {tol:.3g}, {precision})"
        )
    if platform.system() == "Darwin":
        report.predict_max_abs_diff = _check_predict(package, ids, mask, ref, tol)
    return report


def _check_predict(package: Path, ids, mask, ref, tol: float) -> float:
    import coremltools as ct

    model = ct.models.MLModel(str(package))
    got = np.stack([
        model.predict({"input_ids": ids[i:i + 1], "attention_mask": mask[i:i + 1]})[OUTPUT][0]
        for i in range(len(ids))
    ])
    diff = float(np.abs(got - ref).max())
    if not diff <= tol:
        raise PuddingError(
            f"{package}: Core ML predict disagrees with the torch router "
            f"(max |diff| {diff:.3g} > {tol:.3g})"
        )
    return diff
