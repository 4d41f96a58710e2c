"""The bundle manifest (`pudding.json`): the one contract between the PyTorch side and the device.

A bundle is a folder:
    pudding.json        this manifest
    model/              an mlx-lm model folder (config.json, *.safetensors, tokenizer files)
    router/             router weights (model.safetensors), router_config.json, encoder
                        config.json and tokenizer files
    router.mlpackage/   optional Core ML router

Candidate files (`pudding search`'s candidates.json, a bare list, one set) are read here too,
with the one skip-set rule (`check_skip_set`) that the manifest, the torch side and MLX share.
Only the standard library is imported here so both sides can use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import BundleError, PuddingError
from .files import read_json
from .routing import check_tolerance

FORMAT_VERSION = 1
MANIFEST = "pudding.json"
ROUTER_CONFIG = "router_config.json"  # in router/: RouterConfig
LOSSES = ("likelihood", "margin", "perplexity")
# What reads the prompt: a separate text encoder (MiniLM, the paper's), or a head on the LLM's
# own hidden state after its first `blocks` blocks, which every candidate keeps (in_model.py).
ROUTER_KINDS = ("encoder", "in-model")
# What a router predicts per candidate: a score, higher is better ("likelihood", "margin"), or
# mean KL(dense || set) in nats/token, lower is better ("fidelity"); see routing.py.
ROUTER_TARGETS = ("likelihood", "margin", "fidelity")


def check_skip_set(skip: Iterable[int], num_blocks: int, protected: Iterable[int] = (),
               what: str | None = None) -> tuple[int, ...]:
    """The skip-set rule: distinct blocks in 0..num_blocks-1, none protected, not all of them.
    Returns the set sorted."""
    skip = list(skip)
    what = what or f"skip set {skip}"
    bad = [i for i in skip if isinstance(i, bool) or not isinstance(i, int)
           or not 0 <= i < num_blocks]
    if bad:
        raise PuddingError(f"{what} skips block(s) {bad} out of range 0..{num_blocks - 1}")
    if len(set(skip)) != len(skip):
        raise PuddingError(f"{what} repeats a block: {skip}")
    if hit := sorted(set(skip) & set(protected)):
        raise PuddingError(f"{what} skips protected block(s) {hit} (the attention mask is "
                           "built from their cache)")
    if len(skip) == num_blocks:
        raise PuddingError(f"{what} skips every block")
    return tuple(sorted(skip))


@dataclass
class Candidate:
    """One omission set: the blocks skipped (0-based) and where it came from."""

    name: str
    skip: list[int]
    task: str = ""
    loss: str = ""
    k: int = 0

    @classmethod
    def from_dict(cls, d: Any, where: str, default_name: str = "",
                  strict: bool = True) -> Candidate:
        """A candidate from JSON: an object with 'name' and 'skip' (or a bare skip list, named
        `default_name`); `strict` refuses keys other than the fields (the manifest's rule)."""
        if isinstance(d, list):
            d = {"skip": d}
        if not isinstance(d, dict) or not isinstance(d.get("skip"), list):
            raise PuddingError(f"{where}: a candidate must be an object with a 'skip' list")
        name = d.get("name", default_name)
        if not isinstance(name, str) or not name:
            raise PuddingError(f"{where}: a candidate needs a non-empty 'name'")
        if strict and (unknown := sorted(set(d) - {f.name for f in fields(cls)})):
            raise PuddingError(f"{where}: malformed field (candidate {name!r} has unknown "
                               f"key(s) {unknown})")
        skip = d["skip"]
        if any(isinstance(i, bool) or not isinstance(i, int) for i in skip):
            raise PuddingError(f"{where}: candidate {name!r} skip must be a list of block "
                               f"indices, got {skip!r}")
        k = d.get("k", len(skip))
        if isinstance(k, bool) or not isinstance(k, int):
            raise PuddingError(f"{where}: candidate {name!r} k must be an integer, got {k!r}")
        return cls(name, sorted(skip), str(d.get("task", "")), str(d.get("loss", "")), k)


def read_candidates(path: str | Path) -> tuple[list[Candidate], dict]:
    """Candidates and the search settings from a candidates file: `pudding search`'s
    {"candidates": [...], "settings": {...}}, a bare list, or one set such as the SLEB
    baseline's {"name": ..., "skip": [...]} (named after the file when it has no name)."""
    d = read_json(path, "expected a candidates file from `pudding search`")
    if isinstance(d, dict) and "skip" in d:
        return [Candidate.from_dict(d, str(path), Path(path).stem, strict=False)], {}
    items, settings = (d, {}) if isinstance(d, list) else (d.get("candidates"), d.get("settings"))
    if not isinstance(items, list) or not items:
        raise PuddingError(f"{path}: expected a non-empty 'candidates' list")
    cands = [Candidate.from_dict(c, f"{path}: candidate {i}", strict=False)
             for i, c in enumerate(items)]
    names = [c.name for c in cands]
    if len(set(names)) != len(names):
        raise PuddingError(f"{path}: duplicate candidate names {names}")
    return cands, settings if isinstance(settings, dict) else {}


@dataclass
class RouterConfig:
    backbone: str
    num_outputs: int
    # 64 router tokens keep the router under 3% of dense time to first token at 512 prompt
    # tokens on SmolLM2-135M (128: 3.6%); examples/results/bench/README.md has the figures.
    max_length: int = 64
    pooling: str = "mean"  # "mean" over real tokens, or "cls" (first token)
    outputs: list[str] = field(default_factory=list)  # candidate names, output order
    target: str = "likelihood"
    inputs: str = "context"  # per question: the question, or it and its choices (tasks.py)
    kind: str = "encoder"  # one of ROUTER_KINDS
    blocks: int = 0  # in-model: the LLM blocks whose output it pools
    chat_template: bool = False  # in-model: it reads a text through the LLM's chat template

    def __post_init__(self):
        self.backbone = str(self.backbone)

    @classmethod
    def from_dict(cls, d: Any, where: str = ROUTER_CONFIG) -> RouterConfig:
        """From router_config.json; a missing or unknown key is a one-line BundleError."""
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        try:
            return cls(**d)
        except TypeError as e:
            raise BundleError(f"{where}: malformed ({e})") from None


@dataclass
class RouterInfo:
    backbone: str
    max_length: int
    outputs: list[str]  # candidate names, in the order of the router's outputs
    pooling: str = "mean"
    target: str = "likelihood"  # one of ROUTER_TARGETS
    tolerance: float | None = None  # fidelity routers: the default --tolerance (nats/token)
    kind: str = "encoder"  # one of ROUTER_KINDS
    blocks: int = 0  # in-model routers: the LLM blocks every candidate keeps and it reads


@dataclass
class Manifest:
    base_model: str
    num_blocks: int
    candidates: list[Candidate]
    static: Candidate
    router: RouterInfo
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    protected: list[int] = field(default_factory=list)  # blocks no set may skip
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = MANIFEST) -> Manifest:
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected a JSON object")
        version = d.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise BundleError(f"{where}: missing or invalid format_version {version!r}")
        if version > FORMAT_VERSION:
            raise BundleError(
                f"{where}: format version {version} is newer than this pudding-mlx "
                f"understands ({FORMAT_VERSION}); upgrade pudding-mlx"
            )
        try:
            m = cls(
                base_model=str(d["base_model"]),
                num_blocks=_int(d["num_blocks"], "num_blocks", where),
                candidates=[_candidate(c, where) for c in d["candidates"]],
                static=_candidate(d["static"], where),
                router=RouterInfo(**d["router"]),
                files=dict(d.get("files", {})),
                protected=[_int(i, "protected", where) for i in d.get("protected", [])],
                format_version=version,
                extra=dict(d.get("extra", {})),
            )
        except KeyError as e:
            raise BundleError(f"{where}: missing field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise BundleError(f"{where}: malformed field ({e})") from None
        m.validate(where)
        return m

    def validate(self, where: str = MANIFEST) -> None:
        """Check internal consistency (not the files: see `verify_files`)."""
        if self.num_blocks < 1:
            raise BundleError(f"{where}: num_blocks must be positive, got {self.num_blocks}")
        if not self.candidates:
            raise BundleError(f"{where}: no candidate omission sets")
        names = [c.name for c in self.candidates]
        if len(set(names)) != len(names):
            raise BundleError(f"{where}: duplicate candidate names {sorted(names)}")
        for c in [*self.candidates, self.static]:
            self._check_set(c, where)
        r = self.router
        if len(r.outputs) != len(self.candidates):
            raise BundleError(
                f"{where}: router has {len(r.outputs)} outputs but there are "
                f"{len(self.candidates)} candidates"
            )
        unknown = [o for o in r.outputs if o not in names]
        if unknown:
            raise BundleError(f"{where}: router outputs name unknown candidates {unknown}")
        if len(set(r.outputs)) != len(r.outputs):
            raise BundleError(f"{where}: router outputs repeat a candidate")
        if r.kind not in ROUTER_KINDS:
            raise BundleError(f"{where}: router kind must be one of {ROUTER_KINDS}, got "
                              f"{r.kind!r}")
        if r.kind == "in-model":
            self._check_in_model(where)
        elif not isinstance(r.max_length, int) or r.max_length < 2:
            raise BundleError(f"{where}: router max_length must be an integer >= 2")
        if r.pooling not in ("mean", "cls"):
            raise BundleError(f"{where}: router pooling must be 'mean' or 'cls', got {r.pooling!r}")
        if r.target not in ROUTER_TARGETS:
            raise BundleError(f"{where}: router target must be one of {ROUTER_TARGETS}, got "
                              f"{r.target!r}")
        if r.tolerance is not None:
            if r.target != "fidelity":
                raise BundleError(f"{where}: router tolerance is set but the router's target is "
                                  f"{r.target!r}; only a 'fidelity' router takes a tolerance")
            try:
                check_tolerance(r.tolerance)
            except PuddingError as e:
                raise BundleError(f"{where}: router {e}") from None
        for rel in self.files:
            safe_relpath(rel, where)

    def _check_in_model(self, where: str) -> None:
        """An in-model router reads the output of the first `blocks` blocks: no set skips them."""
        n = self.router.blocks
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < self.num_blocks:
            raise BundleError(f"{where}: an in-model router's blocks must be an integer in "
                              f"1..{self.num_blocks - 1}, got {n!r}")
        for c in [*self.candidates, self.static]:
            if hit := sorted(i for i in c.skip if i < n):
                raise BundleError(f"{where}: candidate {c.name!r} skips block(s) {hit}, which "
                                  f"the in-model router reads (blocks 0..{n - 1})")

    def _check_set(self, c: Candidate, where: str) -> None:
        try:
            check_skip_set(c.skip, self.num_blocks, self.protected, f"candidate {c.name!r}")
        except PuddingError as e:
            raise BundleError(f"{where}: {e}") from None

    def candidate(self, name: str) -> Candidate:
        for c in self.candidates:
            if c.name == name:
                return c
        if name == self.static.name:
            return self.static
        raise BundleError(f"{MANIFEST}: no candidate named {name!r}")

    def ordered_candidates(self) -> list[Candidate]:
        """Candidates in the order of the router's outputs."""
        return [self.candidate(n) for n in self.router.outputs]


def _int(v: Any, what: str, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise BundleError(f"{where}: {what} must be an integer, got {v!r}")
    return v


def _candidate(d: Any, where: str) -> Candidate:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: a candidate must be an object, got {d!r}")
    try:
        return Candidate.from_dict(d, where)
    except PuddingError as e:
        raise BundleError(str(e)) from None


def safe_relpath(rel: str, where: str = MANIFEST) -> str:
    """A manifest path must stay inside the bundle: no absolute paths, no '..'."""
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith(("/", "\\")):
        raise BundleError(f"{where}: path {rel!r} leaves the bundle folder")
    return rel


def check_safetensors(path: str | Path) -> None:
    """A safetensors file is whole: its JSON header parses and every tensor's data lies inside
    the file (catches truncated downloads before a loader reads them; reads only the header)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n > size - 8:
                raise BundleError(f"{path}: truncated safetensors file ({size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise BundleError(f"{path}: cannot read ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BundleError(f"{path}: not a safetensors file (bad header)") from None
    if not isinstance(header, dict):
        raise BundleError(f"{path}: not a safetensors file (bad header)")
    end = 0
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if name == "__metadata__":
            continue
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) for o in offsets)):
            raise BundleError(f"{path}: tensor {name!r} has no valid data_offsets")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise BundleError(f"{path}: truncated safetensors file ({size} bytes, the header "
                          f"describes {8 + n + end}); re-download or re-convert it")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


IGNORED = frozenset({".DS_Store"})  # written by macOS Finder into any folder it shows


def bundle_files(root: Path) -> list[str]:
    """Posix paths, relative to `root`, of every file except the manifest, sorted."""
    names = []
    for dirpath, _, files in os.walk(root):
        for name in files:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != MANIFEST and name not in IGNORED:
                names.append(rel)
    return sorted(names)


def hash_tree(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` except the manifest."""
    return {rel: sha256_file(root / rel) for rel in bundle_files(root)}


def read_manifest(bundle: str | Path) -> Manifest:
    bundle = Path(bundle)
    path = bundle / MANIFEST
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a folder (expected a PuDDing bundle)")
    if not path.is_file():
        raise BundleError(f"{path}: missing (not a PuDDing bundle)")
    try:
        d = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not valid JSON ({e})") from None
    return Manifest.from_dict(d, str(path))


def verify_files(bundle: str | Path, manifest: Manifest, hashes: bool = True) -> None:
    """Every listed file exists (and matches its sha256); no unlisted file sits beside them."""
    bundle = Path(bundle).resolve()
    required = ("model/config.json", "router/router_config.json", "router/model.safetensors")
    for rel in required:
        if rel not in manifest.files:
            raise BundleError(f"{bundle / MANIFEST}: file list lacks {rel}")
    for rel, digest in manifest.files.items():
        p = (bundle / safe_relpath(rel)).resolve()
        if bundle not in p.parents:
            raise BundleError(f"{bundle / rel}: resolves outside the bundle")
        if not p.is_file():
            raise BundleError(f"{bundle / rel}: missing (listed in {MANIFEST})")
        if hashes and sha256_file(p) != digest:
            raise BundleError(f"{bundle / rel}: sha256 mismatch (corrupted or modified)")
    on_disk = set(bundle_files(bundle))
    extra = sorted(on_disk - set(manifest.files))
    if extra:
        raise BundleError(f"{bundle / extra[0]}: not listed in {MANIFEST} (unexpected file)")


def write_manifest(bundle: str | Path, manifest: Manifest) -> Path:
    """Hash every file of the bundle into the manifest, validate it and write pudding.json."""
    bundle = Path(bundle)
    manifest.files = hash_tree(bundle)
    manifest.validate(str(bundle / MANIFEST))
    path = bundle / MANIFEST
    path.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    return path
