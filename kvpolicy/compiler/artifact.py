"""Compiled artifacts: a build directory written atomically, verified whole before it is loaded.

    DIR/manifest.json        what was compiled, from what, by which compiler; sha256 of every other
                             file; `manifest_sha256`: sha256 of the manifest's own canonical body
    DIR/report.txt           the same for people
    DIR/kernels/<uri>.py     one rendered Triton file per kernel spec
    DIR/kernels/<uri>.c      the paged store's specs (decode, page packing) again, in C, for CPU
                             engines (compiled on first use by kvpolicy.kernels.cpu; listed under
                             `files`)

`compile_policy` renders everything in memory first (any error: nothing is written), writes a
staging directory beside DIR, keeps unchanged files byte-for-byte and with their timestamps
(hard links), then swaps the directories. Identical input gives byte-identical output.

`verify` trusts nothing it has not checked. Every byte the runtime acts on is covered: the
manifest's own digest covers every field (policy IR, model shape, layers, launch, provenance), the
manifest's sha256 of every other file covers those, no file outside the manifest may be in the
directory, and the artifact is rebuilt in memory from the manifest's policy and model and must
come out byte for byte as it is on disk (so a manifest edited and re-digested by hand is refused
too, unless it is exactly what this kvpolicy compiles). `load` imports the kernels from the bytes
it verified, never from bytecode caches. `check_model` refuses an artifact for any other model
shape than the one it was compiled for, listing every difference.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kvpolicy._version import __version__
from kvpolicy.compiler.codegen import render, render_cpu, template_hash
from kvpolicy.compiler.specs import CompiledSpecs, LayerKernels, specs_for
from kvpolicy.diagnostics import PolicyError
from kvpolicy.files import FileProblem, read_limited, shown_path
from kvpolicy.lang.ir import Policy, policy_from_json, policy_to_json
from kvpolicy.models import ModelError, ModelShape, model_from_json, resolve_model
from kvpolicy.plan.pages import page_plans
from kvpolicy.plan.planner import make_plan
from kvpolicy.plan.report import render_table, to_json

FORMAT = "kvpolicy.artifact/2"
MANIFEST = "manifest.json"
REPORT = "report.txt"
KERNELS = "kernels"
DIGEST = "manifest_sha256"
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 16 * 1024 * 1024  # a rendered kernel is a few KiB
# Launch parameters stored with the artifact; bench/ chooses per-spec values on a GPU.
DEFAULT_LAUNCH = {"num_splits": 8, "block_t": 32}
# The fields of a model shape an artifact's kernels depend on: the model's (MODEL_FIELDS), and
# the dtype of the cache's full-precision regions, which the kernels read and write. A runtime
# that uses an artifact only for its policy (PyTorch attention) checks MODEL_FIELDS.
MODEL_FIELDS = ("num_layers", "num_q_heads", "num_kv_heads", "head_dim", "window_layers",
                "sliding_window")
SHAPE_FIELDS = MODEL_FIELDS + ("kv_dtype",)


class ArtifactError(ValueError):
    """An artifact that must not be loaded (or cannot be written); the message lists every
    reason."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dump(data) -> bytes:
    return (json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def manifest_digest(manifest: dict) -> str:
    """sha256 of the manifest's canonical body: every field but the digest itself, keys sorted,
    no whitespace, ASCII."""
    body = {key: value for key, value in manifest.items() if key != DIGEST}
    return _sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                              ensure_ascii=True).encode())


@dataclass(frozen=True)
class Provenance:
    """Where a compiled policy came from: its file's name, the files it extends, and the sha256
    of their bytes. Recorded in the manifest; the rest of the artifact follows from the IR."""

    file: str
    extends: tuple[str, ...]
    source_sha256: str

    @classmethod
    def of(cls, policy: Policy) -> "Provenance":
        return cls(Path(policy.path).name, tuple(Path(p).name for p in policy.extends),
                   source_hash(policy))


def source_hash(policy: Policy) -> str:
    """sha256 over the policy file and every file it extends (nearest first)."""
    digest = hashlib.sha256()
    for path in (policy.path, *policy.extends):
        data = Path(path).read_bytes() if path and Path(path).is_file() else b""
        digest.update(Path(path).name.encode() + b"\0" + data + b"\0")
    return digest.hexdigest()


def build_files(policy: Policy, model: ModelShape,
                provenance: Provenance | None = None) -> dict[str, bytes]:
    """Every file of the artifact, rendered in memory: relative path → bytes. `provenance`
    defaults to the policy's own files (verify passes the manifest's, to rebuild it)."""
    provenance = provenance or Provenance.of(policy)
    # A config's path is reduced to its file name: the artifact does not depend on where it was
    # built, and verify rebuilds it from the manifest's model alone.
    model = dataclasses.replace(model, source=model.source if model.source == "preset"
                                else Path(model.source).name)
    # Paths are reduced to file names so that the artifact does not depend on where it was built.
    plan = make_plan(dataclasses.replace(policy, path=provenance.file), model,
                     model.max_context)
    compiled = specs_for(plan)
    pages = page_plans(policy, model)
    files: dict[str, bytes] = {}
    kernels = []
    for spec in compiled.specs:
        name = f"{KERNELS}/{spec.uri}.py"
        data = render(spec).encode()
        files[name] = data
        kernels.append({"uri": spec.uri, "kind": spec.kind, "file": name,
                        "sha256": _sha256(data)})
    plan_json = to_json(plan)
    plan_json["warnings"] = []  # located messages belong to `kvpolicy check`, not the artifact
    for layer in plan_json["layers"]:  # tensor lists and block layouts: see the kernel files
        del layer["tensors"], layer["blocks"]
    manifest = {
        "format": FORMAT,
        "kvpolicy_version": __version__,
        "template_sha256": template_hash(),
        "policy": {"name": policy.name, "file": provenance.file,
                   "extends": list(provenance.extends),
                   "source_sha256": provenance.source_sha256, "ir": policy_to_json(policy)},
        "model": model.to_json(),
        "plan_at_max_context": plan_json,
        # what a paged engine's pages keep at each block size it may choose (kvpolicy.store)
        "pages": {str(size): fmt.to_json() for size, fmt in pages.items()},
        "layers": [vars(layer) for layer in compiled.layers],
        "kernels": kernels,
        "launch": DEFAULT_LAUNCH,
    }
    report = _report(policy, model, compiled, plan, pages).encode()
    files[REPORT] = report
    manifest["files"] = {REPORT: _sha256(report)}
    paged = {uri for layer in compiled.layers for uri in (
        layer.paged_decode, layer.pack_page_body, layer.pack_page_guard) if uri}
    for spec in compiled.specs:  # the paged store's kernels for CPU engines (kernels/cpu.py)
        if spec.uri in paged:
            files[cpu_file(spec.uri)] = data = render_cpu(spec).encode()
            manifest["files"][cpu_file(spec.uri)] = _sha256(data)
    manifest[DIGEST] = manifest_digest(manifest)
    files[MANIFEST] = _dump(manifest)
    return files


def _report(policy: Policy, model: ModelShape, compiled: CompiledSpecs, plan,
            pages: dict) -> str:
    lines = [f"kvpolicy {__version__}: {policy.name} compiled for {model.name}", "",
             f"{len(compiled.specs)} kernels:"]
    for spec in compiled.specs:
        users = [str(layer.layer) for layer in compiled.layers if spec.uri in vars(layer).values()]
        lines.append(f"  {spec.kind:<8} {spec.uri}")
        lines.append(f"           used by layers {_compact(users)}")
    lines += ["", "Plan at the model's maximum context:", "", render_table(plan), "",
              "Pages in a paged engine (vLLM --block-size N; kvpolicy.store), per KV head of a "
              "block:"]
    for size, fmt in pages.items():
        kept = "/".join(map(str, fmt.kept_tokens()))
        lines.append(f"  block {size:>3}: {fmt.page_bytes:,} bytes (16-bit: "
                     f"{fmt.baseline_page_bytes:,}), sealed blocks keep {kept} of {size} tokens "
                     f"per layer and KV head: {fmt.capacity_ratio:.2f}x the tokens in the pool")
    lines.append("")
    return "\n".join(lines)


def _compact(layers: list[str]) -> str:
    numbers = [int(x) for x in layers]
    if numbers and numbers == list(range(numbers[0], numbers[-1] + 1)) and len(numbers) > 2:
        return f"{numbers[0]}-{numbers[-1]}"
    return ", ".join(layers)


def compile_policy(policy: Policy, model: ModelShape, out: str | os.PathLike[str]) -> list[str]:
    """Writes the artifact to `out`; returns the relative paths that changed (empty when the
    directory already held exactly this artifact). ArtifactError (naming `out` as given) when it
    cannot be written there; nothing is left behind then."""
    files = build_files(policy, model)
    shown = shown_path(out)
    target = Path(out)
    try:
        if target.is_symlink():
            target = target.resolve(strict=True)  # write where the link points, keep the link
        exists, is_dir = target.exists(), target.is_dir()
    except (OSError, RuntimeError) as exc:
        why = _why(exc)
        raise ArtifactError(f"cannot write the artifact to {shown}: {why}") from None
    if exists and not is_dir:
        raise ArtifactError(f"cannot write the artifact to {shown}: it exists and is a file, "
                            "not a directory")
    if exists and not (target / MANIFEST).is_file() and any(target.iterdir()):
        raise ArtifactError(f"{shown} exists and is not a kvpolicy build directory; "
                            "choose another output directory")
    existing = _read_tree(target) if exists else {}
    if existing == files:
        return []
    changed = sorted(name for name, data in files.items() if existing.get(name) != data)
    created = _make_parents(target.parent, shown)
    staging = None
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".staging",
                                        dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the artifact's
        for name, data in files.items():
            path = staging / name
            path.parent.mkdir(parents=True, exist_ok=True)
            if existing.get(name) == data:
                os.link(target / name, path)  # unchanged: same inode, same timestamps
            else:
                path.write_bytes(data)
        _swap(staging, target)
    except BaseException as exc:
        if staging is not None:
            _remove_tree(staging)
        for directory in reversed(created):
            try:
                directory.rmdir()
            except OSError:
                pass
        if isinstance(exc, OSError):
            raise ArtifactError(f"cannot write the artifact to {shown}: {_why(exc)}") from None
        raise
    return changed


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        from kvpolicy.files import reason
        why = reason(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            why = f"{why} (its directory is not writable)"
        return why
    return "a symbolic link loop" if isinstance(exc, RuntimeError) else str(exc)


def _make_parents(directory: Path, shown: str) -> list[Path]:
    """Creates `directory` and missing parents; returns what it created (outermost first)."""
    missing = []
    for candidate in (directory, *directory.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    created = []
    try:
        for candidate in reversed(missing):
            candidate.mkdir()
            created.append(candidate)
    except OSError as exc:
        for candidate in reversed(created):
            candidate.rmdir()
        raise ArtifactError(f"cannot write the artifact to {shown}: {_why(exc)}") from None
    return created


def _read_tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def _remove_tree(path: Path) -> None:
    """Removes a directory tree, making read-only parts writable first if it must."""
    def writable_then_retry(function, name, _):
        os.chmod(os.path.dirname(name), stat.S_IRWXU)
        if os.path.isdir(name) and not os.path.islink(name):
            os.chmod(name, stat.S_IRWXU)
        function(name)
    shutil.rmtree(path, onerror=writable_then_retry)


def _swap(staging: Path, out: Path) -> None:
    """Replaces `out` with `staging` by renames: `out` is never half-written, and an
    interruption between the renames puts the old directory back."""
    if not out.exists():
        os.rename(staging, out)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rmdir(retired)
    os.rename(out, retired)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(retired, out)
        raise
    try:
        _remove_tree(retired)
    except OSError:
        pass  # the new artifact is in place; an undeletable old copy is reported by nothing


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
    files: dict = dataclasses.field(default_factory=dict, repr=False)  # verified: path → bytes

    def plan(self, context: int):
        return make_plan(self.policy, self.model, context)

    def layer_kernels(self, layer: int) -> dict:
        """The modules layer `layer` uses: decode, combine, pack_body, unpack_body, ..."""
        return {role: self.kernels[uri] for role, uri in vars(self.layers[layer]).items()
                if role != "layer" and uri is not None}

    @property
    def launch(self) -> dict:
        return dict(self.manifest["launch"])

    def cpu_source(self, uri: str) -> str:
        """The C source of the paged store's kernel `uri` for CPU engines (kernels/cpu.py)."""
        return self.files[cpu_file(uri)].decode()


def cpu_file(uri: str) -> str:
    """Where an artifact holds the CPU (C) kernel of the paged store's spec `uri`."""
    return f"{KERNELS}/{uri}.c"


def is_artifact(path: str | os.PathLike[str]) -> bool:
    """Does `path` look like an artifact directory (a directory holding a manifest.json)?"""
    try:
        return Path(path).is_dir() and (Path(path) / MANIFEST).exists()
    except OSError:
        return False


def verify(directory: str | os.PathLike[str], model=None,
           fields: tuple[str, ...] = SHAPE_FIELDS) -> dict:
    """Checks an artifact without importing anything; returns its manifest or raises
    ArtifactError listing every problem. `model` (a preset name, config.json, model directory or
    ModelShape): also refuse unless the artifact was compiled for that model's shape (`fields`
    of it)."""
    return _verified(Path(directory), model, fields)[0]


def _verified(root: Path, model, fields: tuple[str, ...]) -> tuple[dict, dict[str, bytes]]:
    """(manifest, the bytes of every kernel file as verified)."""
    shown = shown_path(root)
    wanted = _model_at_hand(model)
    manifest_path = root / MANIFEST
    try:
        raw = read_limited(manifest_path, MAX_MANIFEST_BYTES)
    except FileProblem as exc:
        if not root.exists():
            raise ArtifactError(f"{shown}: no such artifact directory") from None
        if not root.is_dir():
            raise ArtifactError(f"{shown} is not a kvpolicy artifact: it is a file, not a "
                                "directory") from None
        if exc.reason == "no such file":
            raise ArtifactError(f"{shown} is not a kvpolicy artifact: no {MANIFEST} "
                                "(build one with `kvpolicy compile`)") from None
        raise ArtifactError(f"{shown}/{MANIFEST} cannot be read: {exc.reason}") from None
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{shown}/{MANIFEST} cannot be read: not valid JSON "
                            f"({type(exc).__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        older = isinstance(found, str) and found.startswith("kvpolicy.artifact/") and \
            found.rsplit("/", 1)[1].isdigit() and int(found.rsplit("/", 1)[1]) < 2
        hint = (": it was compiled by an older kvpolicy; recompile it" if older else
                f" (its format is '{shown_path(str(found))}')")
        raise ArtifactError(f"{shown}/{MANIFEST} is not a {FORMAT} manifest{hint}")
    problems = []
    if manifest.get("kvpolicy_version") != __version__:
        problems.append(f"compiled by kvpolicy {_field(manifest, 'kvpolicy_version')}, this is "
                        f"{__version__}: recompile it")
    if manifest.get("template_sha256") != template_hash():
        problems.append("rendered from other kernel templates than this kvpolicy's: recompile it")
    comparable = not problems  # same compiler and templates: a rebuild must be byte-identical
    if manifest.get(DIGEST) != manifest_digest(manifest):
        problems.append(f"{MANIFEST} was modified: its {DIGEST} does not match its contents "
                        "(every field of the manifest is covered; recompile it)")
    files, file_problems = _listed_files(root, manifest)
    problems += file_problems
    policy, compiled_model, shape_problems = _policy_and_model(manifest)
    problems += shape_problems
    if comparable and policy is not None and compiled_model is not None:
        problems += _rebuild_differences(root, manifest, policy, compiled_model, files)
    if wanted is not None and compiled_model is not None:
        problems += model_mismatches(compiled_model, wanted, fields)
    if problems:
        raise ArtifactError(f"refusing artifact {shown}:\n  - " + "\n  - ".join(problems))
    return manifest, files


def _field(manifest: dict, key: str) -> str:
    return shown_path(str(manifest.get(key)))


def _listed_files(root: Path, manifest: dict) -> tuple[dict[str, bytes], list[str]]:
    """Checks every file the manifest lists against its sha256, and that nothing else is in the
    directory. → (relative path → verified bytes, problems)."""
    problems = []
    listed: dict[str, str] = {}
    kernels = manifest.get("kernels")
    extra = manifest.get("files")
    if not isinstance(kernels, list) or not isinstance(extra, dict):
        return {}, [f"{MANIFEST} lists no files (its 'kernels' or 'files' is missing)"]
    for kernel in kernels:
        if not (isinstance(kernel, dict) and isinstance(kernel.get("file"), str)
                and isinstance(kernel.get("sha256"), str)):
            problems.append(f"{MANIFEST} has a malformed kernel entry")
            continue
        listed[kernel["file"]] = kernel["sha256"]
    for name, digest in extra.items():
        listed[name] = str(digest)
    verified = {}
    for name, digest in sorted(listed.items()):
        relative = Path(name)
        if relative.is_absolute() or ".." in relative.parts or not relative.parts:
            problems.append(f"{MANIFEST} lists a file outside the artifact: {shown_path(name)}")
            continue
        try:
            data = read_limited(root / relative, MAX_FILE_BYTES)
        except FileProblem as exc:
            state = "is missing" if exc.reason == "no such file" else f"cannot be read: {exc}"
            problems.append(f"{shown_path(name)} {state}")
            continue
        if _sha256(data) != digest:
            problems.append(f"{shown_path(name)} was modified (its sha256 differs from the "
                            "manifest's)")
            continue
        verified[name] = data
    directories = {str(parent) for name in listed for parent in Path(name).parents} - {"."}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if name == MANIFEST or name in listed or (name in directories and path.is_dir()
                                                  and not path.is_symlink()):
            continue
        problems.append(f"{shown_path(name)} is not listed in the manifest (an artifact holds "
                        "only what `kvpolicy compile` wrote)")
    return verified, problems


def _policy_and_model(manifest: dict) -> tuple[Policy | None, ModelShape | None, list[str]]:
    policy = compiled_model = None
    problems = []
    try:
        compiled_model = model_from_json(manifest.get("model"))
    except ModelError as exc:
        problems.append(f"{MANIFEST}: its model is not a valid model shape ({exc})")
    try:
        ir = manifest["policy"]["ir"]
        policy = policy_from_json(ir)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problems.append(f"{MANIFEST}: its policy is not a valid checked policy "
                        f"({type(exc).__name__})")
    return policy, compiled_model, problems


def _rebuild_differences(root: Path, manifest: dict, policy: Policy, model: ModelShape,
                         files: dict[str, bytes]) -> list[str]:
    """Compiles the manifest's policy for its model again, in memory; every file must come out as
    it is. Lists what differs (by manifest field, or by file)."""
    try:
        record = manifest["policy"]
        provenance = Provenance(str(record["file"]), tuple(map(str, record["extends"])),
                                str(record["source_sha256"]))
        rebuilt = build_files(policy, model, provenance)
    except (PolicyError, KeyError, TypeError, ValueError, AttributeError) as exc:
        return [f"{MANIFEST}: its policy does not compile for its model "
                f"({type(exc).__name__})"]
    problems = []
    expected = json.loads(rebuilt[MANIFEST])
    for key in sorted(set(expected) | set(manifest)):
        if key != DIGEST and expected.get(key) != manifest.get(key):
            problems.append(f"{MANIFEST}: '{shown_path(key)}' is not what compiling its policy "
                            "for its model gives")
    for name, data in sorted(rebuilt.items()):
        if name != MANIFEST and name in files and files[name] != data:
            problems.append(f"{shown_path(name)} is not what compiling the manifest's policy "
                            "for its model gives")
    return problems


def _model_at_hand(model) -> ModelShape | None:
    if model is None or isinstance(model, ModelShape):
        return model
    try:
        return resolve_model(model)
    except ModelError as exc:
        raise ArtifactError(str(exc)) from None


def model_mismatches(compiled: ModelShape, model: ModelShape,
                     fields: tuple[str, ...] = SHAPE_FIELDS) -> list[str]:
    """Every way `model` differs from the shape an artifact was compiled for."""
    return [f"compiled for {compiled.name} with {field} {getattr(compiled, field)}, but the "
            f"model ({model.name}) has {getattr(model, field)}"
            for field in fields if getattr(compiled, field) != getattr(model, field)]


def check_model(compiled: "CompiledPolicy", model, what: str = "the model",
                fields: tuple[str, ...] = SHAPE_FIELDS) -> None:
    """ArtifactError listing every difference unless `model` (anything `resolve_model` takes, or
    a ModelShape) has the shape `compiled` was built for (`fields` of it)."""
    shape = _model_at_hand(model)
    problems = model_mismatches(compiled.model, shape, fields)
    if problems:
        raise ArtifactError(
            f"refusing artifact {shown_path(compiled.directory)} for {what}:\n  - "
            + "\n  - ".join(problems)
            + "\n  (compile the policy for this model: `kvpolicy compile POLICY --model M`)")


def check_manifest_model(directory: str | os.PathLike[str], manifest: dict, model,
                         fields: tuple[str, ...] = SHAPE_FIELDS) -> None:
    """ArtifactError, in `verify`'s words, unless a verified manifest was compiled for `model`'s
    shape (`fields` of it): the model check without verifying the artifact again."""
    problems = model_mismatches(compiled_for(manifest), _model_at_hand(model), fields)
    if problems:
        raise ArtifactError(f"refusing artifact {shown_path(Path(directory))}:\n  - "
                            + "\n  - ".join(problems))


def compiled_for(manifest: dict) -> ModelShape:
    """The model shape a (verified) manifest was compiled for."""
    return model_from_json(manifest["model"])


def load(directory: str | os.PathLike[str], model=None,
         fields: tuple[str, ...] = SHAPE_FIELDS) -> CompiledPolicy:
    """Verifies the artifact — and, if `model` is given (a preset name, a config.json path, a
    model directory or a ModelShape), that it was compiled for that model's shape (`fields` of
    it) — then imports its kernels from the bytes it verified. Needs torch and triton."""
    from kvpolicy.compiler.loader import import_kernel_source
    root = Path(directory)
    manifest, files = _verified(root, model, fields)
    kernels = {k["uri"]: import_kernel_source(root / k["file"], files[k["file"]])
               for k in manifest["kernels"]}
    layers = tuple(LayerKernels(**layer) for layer in manifest["layers"])
    policy = policy_from_json(manifest["policy"]["ir"])
    return CompiledPolicy(root, policy, compiled_for(manifest), manifest, layers, kernels, files)
