"""Model files on a cluster: a model name resolved to a local directory, downloaded from the hub once per node.

Every process that loads a model (training workers, precompute encoder actors, Ray Data preprocessing tasks, the
driver) asks :func:`local_pretrained` for a local directory holding the files it loads; the driver hands out model
*names* (:func:`model_ref`), never paths, so each node resolves its own. For a hub id (``org/name``):

- the first process on a node takes a file lock in the hub cache, lists the repo once and downloads, with
  ``huggingface_hub.snapshot_download``, only the files the run loads (component configs, the chosen variant's
  weights, tokenizers, scheduler); the node's other processes wait on the lock and then find the files;
- the repo's listing is recorded beside the snapshot, so later callers (a restarted worker, every epoch's
  preprocessing tasks, the next run on the node) find every file they need on disk and make no hub call at all:
  a hub outage mid-run cannot stop training. When there is no record but the hub is unreachable, the cached
  snapshot is used as it is (as ``huggingface_hub`` itself does).

Environment (read at each call, so a Ray ``runtime_env`` can set it per job):

- ``HF_HOME``: the Hugging Face home; the cache is ``$HF_HOME/hub`` (default ``~/.cache/huggingface/hub``). Point it
  at a volume that outlives worker processes and pods (the cluster files mount a persistent model-cache volume), so
  restarts and later runs reuse the download. ``HF_HUB_CACHE`` sets the cache directory itself.
- ``HF_TOKEN``: a token for gated or private repos (SDXL base 1.0 needs none).
- ``HF_HUB_OFFLINE=1``: never call the hub; the snapshot must be in the cache already (e.g. seeded with
  ``huggingface-cli download``, or a read-only pre-seeded volume) and is used as it is.
- ``HF_ENDPOINT``: a hub mirror.

The lock is a ``filelock`` lock (``flock``) in ``<cache>/.locks/``: released by the OS when its holder dies. One
download per node with a node-local cache; one per cluster on a shared file system that honours ``flock``.

Light on purpose (no torch, no diffusers): Ray Data preprocessing tasks import it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping, Sequence

logger = logging.getLogger(__name__)

# huggingface_hub and filelock are imported by the functions that call the hub: the usual caller (every
# preprocessing task, every restarted worker) finds its files on disk and needs neither.

TINY = "tiny"
# Bump when the tiny architecture/tokenizer changes so stale cache dirs are never reused.
TINY_VERSION = 1

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

TOKENIZERS = ("tokenizer", "tokenizer_2")
ENCODERS = ("vae", "text_encoder", "text_encoder_2")
PIPELINE = ("unet", *ENCODERS, *TOKENIZERS, "scheduler")  # what training loads
STANDALONE_VAE = "<vae>"  # a separate VAE repo: its root when it is a bare VAE, else its vae/ folder
_WEIGHT_PARTS = {"unet", "vae", "text_encoder", "text_encoder_2", ""}  # "": a bare model at the repo root
# A CLIP tokenizer's vocabulary, in either form. Without it transformers 5 loads an empty tokenizer, silently.
_VOCABULARIES = ({"vocab.json", "merges.txt"}, {"tokenizer.json"})
# diffusers' and transformers' weight files, single or sharded, per variant: "<stem>[.<variant>][-000NN-of-000NN].ext"
_WEIGHT_FILE = re.compile(r"^(?:diffusion_pytorch_model|model|pytorch_model)(?:\.(?P<variant>[^.\-]+))?"
                          r"(?:-\d+-of-\d+)?\.(?P<ext>safetensors|bin)$")


def default_cache_dir() -> str:
    """Where built artefacts (the tiny model) live: ``$RAYDIFF_CACHE`` or ``~/.cache/raydiff``."""
    return os.environ.get("RAYDIFF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "raydiff")


def tiny_dir(cache_dir: str | None = None, seed: int = 0) -> str:
    return os.path.join(cache_dir or default_cache_dir(), f"tiny-sdxl-v{TINY_VERSION}-seed{seed}")


def hub_cache_dir() -> str:
    """``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else huggingface_hub's default."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


# --------------------------------------------------------------------------------------------- names


def model_ref(name: str, revision: str | None = None) -> str:
    """One string naming a model for other processes: ``"tiny"``, an absolute local path, or ``org/name[@revision]``
    (hub ids never contain ``@``). Read back with :func:`parse_ref`."""
    if name != TINY and os.path.exists(name):
        return os.path.abspath(name)
    return f"{name}@{revision}" if revision and HUB_ID.match(name) else name


def zeros_for_empty_prompt(pretrained: str, revision: str | None = None) -> bool:
    """Whether the model's pipeline samples an empty negative prompt as zeros (SDXL base: yes): its
    ``model_index.json`` (what diffusers' ``load_config`` of the pipeline reads), without importing diffusers."""
    with open(os.path.join(local_pretrained(pretrained, revision, parts=()), "model_index.json")) as f:
        return bool(json.load(f).get("force_zeros_for_empty_prompt", True))


def parse_ref(ref: str) -> tuple[str, str | None]:
    name, sep, revision = ref.partition("@")
    if sep and not os.path.exists(ref) and HUB_ID.match(name):
        return name, revision
    return ref, None


def pinned_revision(name: str, revision: str | None = None) -> str | None:
    """The commit a hub id's ``revision`` (its default branch when None) points at now, for the driver to pin a run
    to before any node downloads: a branch can move between two nodes' downloads, or since a node's persistent cache
    was filled, and only the UNet is broadcast by DeepSpeed (encoders and tokenizers would differ per node). One hub
    call. Local paths, ``"tiny"`` and commits come back as they are; so does ``revision`` when the hub cannot be
    reached (each node then uses the snapshot it has)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    if os.path.exists(name) or not HUB_ID.match(name) or re.fullmatch(r"[0-9a-f]{40}", revision or "") or hub_offline():
        return revision
    try:
        return HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None).model_info(name, revision=revision).sha
    except (RepositoryNotFoundError, RevisionNotFoundError):
        raise
    except Exception as e:  # the hub down at launch: run on what the nodes have
        logger.warning("%s: the hub is unreachable (%s); revision %s is not pinned, each node loads the snapshot "
                       "it has", name, type(e).__name__, revision or "main")
        return revision


# --------------------------------------------------------------------------------------------- resolving


def local_pretrained(name: str, revision: str | None = None, parts: Sequence[str] = PIPELINE,
                     variant: str | None = None, prefer: Mapping[str, str] | None = None) -> str:
    """A local directory holding ``parts`` of model ``name`` (a :func:`model_ref`, a local path, ``"tiny"`` or a hub
    id): a hub id is downloaded into this node's hub cache on first use (see the module docstring).

    ``variant``: the weight files of every weight part (``fp16`` ...), as ``from_pretrained(variant=...)``.
    ``prefer``: per part, a variant to take where the repo has it and ``variant`` is unset (:func:`part_variant`).
    """
    if revision is None:
        name, revision = parse_ref(name)
    if name == TINY:
        return _tiny()
    if os.path.exists(name):
        return name
    if not HUB_ID.match(name):
        raise FileNotFoundError(f"model path {name!r} does not exist (and is not a hub id 'org/name')")

    def select(files: Sequence[str]) -> list[str]:
        try:
            return select_files(files, parts, variant, prefer)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{name} (revision {revision or 'main'}): {e}") from None

    return hub_snapshot(name, revision, select)


def _tiny() -> str:
    path = tiny_dir()
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    from raydiff import models  # builds it (torch, diffusers): once per node

    return models.resolve_pretrained(TINY)


def part_variant(names: Sequence[str], variant: str | None, preferred: str | None) -> str | None:
    """The variant whose weights a part loads, from the part folder's file ``names``: ``variant`` if set, else
    ``preferred`` if the folder has those weights, else the default (no variant)."""
    if variant is None and preferred and _weights(names, preferred):
        return preferred
    return variant


def local_part_variant(path: str, part: str, variant: str | None, preferred: str | None) -> str | None:
    """:func:`part_variant` of a local model directory's ``part`` folder."""
    folder = os.path.join(path, part)
    return part_variant(os.listdir(folder) if os.path.isdir(folder) else [], variant, preferred)


def select_files(files: Sequence[str], parts: Sequence[str], variant: str | None = None,
                 prefer: Mapping[str, str] | None = None) -> list[str]:
    """The files of a repo listing (``/``-separated paths) that loading ``parts`` reads: ``model_index.json``;
    every file of a tokenizer or scheduler folder; a model folder's JSON files (config, shard indexes) and the
    weights of its variant (safetensors, else .bin). A part the listing lacks is an error naming it."""
    folders: dict[str, list[str]] = {}
    for f in files:
        folder, _, base = f.rpartition("/")
        folders.setdefault(folder, []).append(base)
    root = folders.get("", [])
    out = {"model_index.json"} & set(root)
    for part in parts:
        if part == STANDALONE_VAE:
            part = "" if "config.json" in root else "vae"
        names, prefix = folders.get(part, []), f"{part}/" if part else ""
        if part not in _WEIGHT_PARTS:
            if not names:
                raise FileNotFoundError(f"the model has no {prefix or 'root'} folder (files: {_sample(files)})")
            if part in TOKENIZERS and not any(v <= set(names) for v in _VOCABULARIES):
                raise FileNotFoundError(f"the model's {prefix} has no vocab.json + merges.txt or tokenizer.json")
            out.update(prefix + n for n in names)
            continue
        chosen = part_variant(names, variant, (prefer or {}).get(part))
        weights = _weights(names, chosen)
        if "config.json" not in names:
            raise FileNotFoundError(f"the model has no {prefix}config.json (files: {_sample(files)})")
        if not weights:
            have = sorted({m["variant"] or "default" for m in map(_WEIGHT_FILE.match, names) if m})
            raise FileNotFoundError(f"the model has no {chosen or 'default'} weights in {prefix or 'its root'} "
                                    f"(weight variants there: {have or 'none'})")
        out.update(prefix + n for n in names if n.endswith(".json"))
        out.update(prefix + w for w in weights)
    return sorted(out)


def _weights(names: Sequence[str], variant: str | None) -> list[str]:
    found: dict[str, list[str]] = {"safetensors": [], "bin": []}
    for n in names:
        m = _WEIGHT_FILE.match(n)
        if m and m["variant"] == variant:
            found[m["ext"]].append(n)
    return found["safetensors"] or found["bin"]


def _sample(files: Sequence[str]) -> str:
    return ", ".join(list(files)[:8]) + (", ..." if len(files) > 8 else "")


# --------------------------------------------------------------------------------------------- the hub cache


def hub_snapshot(repo_id: str, revision: str | None, select: Callable[[list[str]], list[str]]) -> str:
    """The local snapshot directory of ``repo_id`` at ``revision`` holding the files ``select`` picks from the repo
    listing; downloaded under this node's lock the first time, found with no hub call after."""
    from filelock import FileLock, Timeout

    cache = hub_cache_dir()
    record = _record_path(cache, repo_id, revision)
    found = _recorded_snapshot(cache, repo_id, record, select)
    if found:
        return found
    if hub_offline():
        return _cached_snapshot(cache, repo_id, revision, select, "HF_HUB_OFFLINE is set")
    os.makedirs(os.path.dirname(record), exist_ok=True)
    lock = FileLock(os.path.join(os.path.dirname(record), "raydiff.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("%s: another process on this node is downloading it; waiting", repo_id)
        lock.acquire()
    try:
        return _recorded_snapshot(cache, repo_id, record, select) or _download(cache, repo_id, revision, record, select)
    finally:
        lock.release()


def _record_path(cache: str, repo_id: str, revision: str | None) -> str:
    from huggingface_hub.file_download import repo_folder_name

    key = hashlib.sha1((revision or "main").encode()).hexdigest()[:12]
    return os.path.join(cache, ".locks", repo_folder_name(repo_id=repo_id, repo_type="model"), f"raydiff-{key}.json")


def _recorded_snapshot(cache: str, repo_id: str, record: str, select: Callable[[list[str]], list[str]]) -> str | None:
    """The snapshot a previous download on this node recorded, if it holds every file wanted now. No hub call."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:
        with open(record, encoding="utf-8") as f:
            listing = json.load(f)
        commit, files = listing["commit"], listing["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    wanted = select(files)  # a part the repo lacks is the caller's error, not a cache miss
    try:
        path = snapshot_download(repo_id, revision=commit, cache_dir=cache, allow_patterns=wanted,
                                 local_files_only=True)
    except LocalEntryNotFoundError:  # the snapshot was deleted, or (huggingface_hub >= 2) is incomplete
        return None
    return path if all(os.path.isfile(os.path.join(path, f)) for f in wanted) else None


def _download(cache: str, repo_id: str, revision: str | None, record: str,
              select: Callable[[list[str]], list[str]]) -> str:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import RepositoryNotFoundError, RevisionNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, revision=revision)
    except (RepositoryNotFoundError, RevisionNotFoundError):  # also gated / private without HF_TOKEN
        raise
    except Exception as e:  # the hub unreachable or failing: what this node's cache holds, as huggingface_hub does
        logger.warning("%s: the hub failed (%s); loading the cached snapshot", repo_id, type(e).__name__)
        return _cached_snapshot(cache, repo_id, revision, select, f"the hub failed: {type(e).__name__}: {e}")
    files = [s.rfilename for s in info.siblings or []]
    wanted = select(files)
    logger.info("downloading %d of %d files of %s@%s into %s", len(wanted), len(files), repo_id, info.sha, cache)
    path = snapshot_download(repo_id, revision=info.sha, cache_dir=cache, allow_patterns=wanted, endpoint=endpoint)
    if revision != info.sha:  # the branch or tag as huggingface_hub records it: offline loads of it find the commit
        _write_atomic(os.path.join(os.path.dirname(os.path.dirname(path)), "refs", revision or "main"), info.sha)
    _write_atomic(record, json.dumps({"repo": repo_id, "revision": revision, "commit": info.sha, "files": files}))
    return path


def _cached_snapshot(cache: str, repo_id: str, revision: str | None, select: Callable[[list[str]], list[str]],
                     why: str) -> str:
    """The cache's snapshot of ``repo_id`` as it is, without the repo's listing: the files are chosen from what the
    snapshot holds (seeded by ``huggingface-cli download``, or downloaded before the hub failed)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import LocalEntryNotFoundError

    try:  # locate only (allow_patterns=[] requires no file); what it holds is checked by `select`
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, allow_patterns=[],
                                 local_files_only=True)
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"{repo_id} (revision {revision or 'main'}) is not in the Hugging Face cache {cache} and cannot be "
            f"downloaded ({why}): download it there first (`HF_HOME=... huggingface-cli download {repo_id}`)") from e
    files = [os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
             for d, _, names in os.walk(path) for f in names]
    try:
        select(files)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"the cached snapshot {path} is incomplete ({why}): {e}") from e
    return path


def _write_atomic(path: str, text: str) -> None:
    path = os.path.normpath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


__all__ = [
    "ENCODERS",
    "PIPELINE",
    "STANDALONE_VAE",
    "TINY",
    "TOKENIZERS",
    "default_cache_dir",
    "hub_cache_dir",
    "hub_snapshot",
    "local_part_variant",
    "local_pretrained",
    "model_ref",
    "parse_ref",
    "part_variant",
    "pinned_revision",
    "select_files",
    "tiny_dir",
]
