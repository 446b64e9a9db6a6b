"""Compiled artifacts: a build directory written atomically, verified before it is loaded.

    DIR/manifest.json        what was compiled, from what, by which compiler; sha256 of each file
    DIR/report.txt           the same for people
    DIR/kernels/<uri>.py     one rendered Triton file per kernel spec

`compile_policy` renders everything in memory first (any error: nothing is written), writes a
staging directory beside DIR, keeps unchanged files byte-for-byte and with their timestamps
(hard links), then swaps the directories. Identical input gives byte-identical output.
`load` refuses an artifact whose files, compiler, templates or model do not match, listing every
reason, and imports the kernels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvpolicy import __version__
from kvpolicy.compiler.codegen import render, template_hash
from kvpolicy.compiler.specs import CompiledSpecs, LayerKernels, specs_for
from kvpolicy.lang.ir import Policy, policy_from_json, policy_to_json
from kvpolicy.models import ModelShape
from kvpolicy.plan.planner import make_plan
from kvpolicy.plan.report import render_table, to_json

FORMAT = "kvpolicy.artifact/1"
MANIFEST = "manifest.json"
REPORT = "report.txt"
KERNELS = "kernels"
# Launch parameters stored with the artifact; bench/ chooses per-spec values on a GPU.
DEFAULT_LAUNCH = {"num_splits": 8, "block_t": 32}


class ArtifactError(ValueError):
    """An artifact that must not be loaded; the message lists every reason."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dump(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def source_hash(policy: Policy) -> str:
    """sha256 over the policy file and every file it extends (nearest first)."""
    digest = hashlib.sha256()
    for path in (policy.path, *policy.extends):
        data = Path(path).read_bytes() if path and Path(path).is_file() else b""
        digest.update(Path(path).name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


def build_files(policy: Policy, model: ModelShape) -> dict[str, bytes]:
    """Every file of the artifact, rendered in memory: relative path → bytes."""
    compiled = specs_for(policy, model)
    files: dict[str, bytes] = {}
    kernels = []
    for spec in compiled.specs:
        name = f"{KERNELS}/{spec.uri}.py"
        data = render(spec).encode()
        files[name] = data
        kernels.append({"uri": spec.uri, "kind": spec.kind, "file": name,
                        "sha256": _sha256(data)})
    # Paths are reduced to file names so that the artifact does not depend on where it was built.
    plan = make_plan(dataclasses.replace(policy, path=Path(policy.path).name), model,
                     model.max_context)
    plan_json = to_json(plan)
    plan_json["warnings"] = []  # located messages belong to `kvpolicy check`, not the artifact
    for layer in plan_json["layers"]:  # tensor lists and block layouts: see the kernel files
        del layer["tensors"], layer["blocks"]
    manifest = {
        "format": FORMAT,
        "kvpolicy_version": __version__,
        "template_sha256": template_hash(),
        "policy": {"name": policy.name, "file": Path(policy.path).name,
                   "extends": [Path(p).name for p in policy.extends],
                   "source_sha256": source_hash(policy), "ir": policy_to_json(policy)},
        "model": model.to_json() | {"source": model.source if model.source == "preset"
                                    else Path(model.source).name},
        "plan_at_max_context": plan_json,
        "layers": [vars(layer) for layer in compiled.layers],
        "kernels": kernels,
        "launch": DEFAULT_LAUNCH,
    }
    files[MANIFEST] = _dump(manifest)
    files[REPORT] = _report(policy, model, compiled, plan).encode()
    return files


def _report(policy: Policy, model: ModelShape, compiled: CompiledSpecs, plan) -> str:
    lines = [f"kvpolicy {__version__}: {policy.name} compiled for {model.name}", "",
             f"{len(compiled.specs)} kernels:"]
    for spec in compiled.specs:
        users = [str(layer.layer) for layer in compiled.layers if spec.uri in vars(layer).values()]
        lines.append(f"  {spec.kind:<8} {spec.uri}")
        lines.append(f"           used by layers {_compact(users)}")
    lines += ["", "Plan at the model's maximum context:", "", render_table(plan), ""]
    return "\n".join(lines)


def _compact(layers: list[str]) -> str:
    numbers = [int(x) for x in layers]
    if numbers and numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 2:
        return f"{numbers[0]}-{numbers[-1]}"
    return ", ".join(layers)


def compile_policy(policy: Policy, model: ModelShape, out: str | os.PathLike[str]) -> list[str]:
    """Writes the artifact to `out`; returns the relative paths that changed (empty when the
    directory already held exactly this artifact)."""
    files = build_files(policy, model)
    out = Path(out)
    if out.exists() and not (out / MANIFEST).is_file() and any(out.iterdir()):
        raise ArtifactError(f"{out} exists and is not a kvpolicy build directory; "
                            "choose another output directory")
    existing = _read_tree(out) if out.is_dir() else {}
    if existing == files:
        return []
    changed = sorted(name for name, data in files.items() if existing.get(name) != data)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".staging", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the artifact's
    try:
        for name, data in files.items():
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if existing.get(name) == data:
                os.link(out / name, target)  # unchanged: same inode, same timestamps
            else:
                target.write_bytes(data)
        _swap(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return changed


def _read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _swap(staging: Path, out: Path) -> None:
    """Replaces `out` with `staging` (two renames; `out` is never half-written)."""
    if not out.exists():
        os.rename(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(retired)
    os.rename(out, retired)
    os.rename(staging, out)
    shutil.rmtree(retired, ignore_errors=True)


# ---- loading ----------------------------------------------------------------------------------

@dataclass
class CompiledPolicy:
    """A verified artifact: the policy, the model it was compiled for, and its kernel modules."""

    directory: Path
    policy: Policy
    model: ModelShape
    manifest: dict
    layers: tuple[LayerKernels, ...]
    kernels: dict  # uri → imported module

    def plan(self, context: int):
        return make_plan(self.policy, self.model, context)

    def layer_kernels(self, layer: int) -> dict:
        """The modules layer `layer` uses: decode, combine, pack_body, unpack_body, ..."""
        return {role: self.kernels[uri] for role, uri in vars(self.layers[layer]).items()
                if role != "layer" and uri is not None}

    @property
    def launch(self) -> dict:
        return dict(self.manifest.get("launch", DEFAULT_LAUNCH))


def verify(directory: str | os.PathLike[str], model: ModelShape | None = None) -> dict:
    """Checks an artifact without importing anything; returns its manifest or raises
    ArtifactError listing every problem."""
    root = Path(directory)
    manifest_path = root / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{root} is not a kvpolicy artifact: no {MANIFEST} "
                            "(build one with `kvpolicy compile`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{manifest_path} cannot be read: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path} is not a {FORMAT} manifest")
    problems = []
    if manifest.get("kvpolicy_version") != __version__:
        problems.append(f"compiled by kvpolicy {manifest.get('kvpolicy_version')}, this is "
                        f"{__version__}: recompile it")
    if manifest.get("template_sha256") != template_hash():
        problems.append("rendered from other kernel templates than this kvpolicy's: recompile it")
    listed = set()
    for kernel in manifest.get("kernels", []):
        path = root / kernel["file"]
        listed.add(kernel["file"])
        if not path.is_file():
            problems.append(f"{kernel['file']} is missing")
        elif _sha256(path.read_bytes()) != kernel["sha256"]:
            problems.append(f"{kernel['file']} was modified (its sha256 differs from the "
                            "manifest's)")
    kernel_dir = root / KERNELS
    if kernel_dir.is_dir():
        for path in sorted(kernel_dir.rglob("*")):
            name = str(path.relative_to(root))
            if path.is_file() and name not in listed and "__pycache__" not in name:
                problems.append(f"{name} is not listed in the manifest")
    if model is not None:
        compiled_for = manifest.get("model", {})
        for field in ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "kv_dtype"):
            if compiled_for.get(field) != getattr(model, field):
                problems.append(f"compiled for {compiled_for.get('name')} with {field} "
                                f"{compiled_for.get(field)}, but the model ({model.name}) has "
                                f"{getattr(model, field)}")
    if problems:
        raise ArtifactError(f"refusing artifact {root}:\n  - " + "\n  - ".join(problems))
    return manifest


def compiled_for(manifest: dict) -> ModelShape:
    """The model shape a (verified) manifest was compiled for."""
    shape = manifest["model"]
    return ModelShape(
        name=shape["name"], num_layers=shape["num_layers"], num_q_heads=shape["num_q_heads"],
        num_kv_heads=shape["num_kv_heads"], head_dim=shape["head_dim"],
        max_context=shape["max_context"], kv_dtype=shape["kv_dtype"], source=shape["source"])


def load(directory: str | os.PathLike[str], model: ModelShape | None = None) -> CompiledPolicy:
    """Verifies the artifact (and, if given, that it was compiled for `model`'s shape), then
    imports its kernels. Needs torch and triton."""
    from kvpolicy.compiler.loader import import_kernel_file
    root = Path(directory)
    manifest = verify(root, model)
    compiled_model = compiled_for(manifest)
    kernels = {k["uri"]: import_kernel_file(root / k["file"]) for k in manifest["kernels"]}
    layers = tuple(LayerKernels(**layer) for layer in manifest["layers"])
    policy = policy_from_json(manifest["policy"]["ir"])
    return CompiledPolicy(root, policy, compiled_model, manifest, layers, kernels)
