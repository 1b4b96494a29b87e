"""The writer's side of the latent format: the files of a shard and its sidecar, the checks of an existing --dest,
whether a shard is already done, writing a shard, and the complete manifest once every shard is written."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from cli import UsageError
from integrity import atomic_write, inside, remove_stale_temps, sha256_file, write_text
from latent_data.format import FORMAT, MANIFEST, shard_kinds
from preprocessing.normalization import channel_moments, final_normalization

# Manifest entries that must agree between two runs writing into one --dest, and the flag that sets each.
CONFIG_FLAGS = {
    "vae": "--vae",
    "resolution": "--resolution",
    "precision": "--precision",
    "dtype": "--dtype",
    "flip": "--flip",
    "images": "--save-images",
    "shard_size": "--shard-size",
    "scale": "--scale",
    "shift": "--shift",
    "latent_norm": "--latent-norm",
    "latent_stats": "--latent-stats",
    "latent_multiplier": "--latent-multiplier",
    "num_classes": "--num-classes",
    "posterior": "--posterior",
    "posterior_seed": "--posterior-seed",
    "source_sha256": "--source/--labels (the list of image files and their labels)",
}
# The files of a latent dataset, the only ones --overwrite deletes (and their temporary names of older versions).
OUR_FILES = re.compile(
    r"^(((flip-)?(mean|std)|images)-\d+\.npy|shard-\d+\.json|labels\.npy|" + re.escape(MANIFEST) + r")(\.tmp)?$"
)


def json_text(obj: dict) -> str:
    """The layout of the manifest and the shard sidecars."""
    return json.dumps(obj, indent=1) + "\n"


def read_json(path: Path) -> dict:
    """A JSON file of ours in --dest; UsageError (pass --overwrite) when it cannot be read."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: cannot be read as JSON ({e}); pass --overwrite to replace it") from e


def save_npy(path: Path, arr: np.ndarray) -> str:
    """Write `arr` atomically (temporary name, then rename) and return the file's sha256."""
    with atomic_write(path) as f:
        np.save(f, arr)
    return sha256_file(path)


def shard_files(k: int, flip: bool, images: bool, std: bool = True) -> dict[str, str]:
    """File name of each array of shard k, by kind (without std: --posterior sample, "mean" holds the sample)."""
    return {kind: f"{kind}-{k:05d}.npy" for kind in shard_kinds(flip, images, std)}


def posterior_noise(seed: int, index: int, flipped: bool, shape: tuple[int, ...]) -> np.ndarray:
    """The standard normal noise of image `index`'s stored posterior sample (--posterior sample), float32."""
    return np.random.default_rng([seed, index, int(flipped)]).standard_normal(shape, dtype=np.float32)


def sample_posterior(moments: list[np.ndarray], indices: list[int], seed: int) -> list[np.ndarray]:
    """One posterior sample z = mean + std eps per image (and per flipped image), float32, from encode_batch's
    [mean, std(, flip-mean, flip-std)]."""
    samples = []
    for flipped, (mean, std) in enumerate(zip(moments[::2], moments[1::2])):
        eps = np.stack([posterior_noise(seed, i, bool(flipped), mean.shape[1:]) for i in indices])
        samples.append(mean + std * eps)
    return samples


def sidecar_path(dest: Path, k: int) -> Path:
    """Shard k's sidecar JSON: its files, checksums, labels and moments; present once the shard is complete."""
    return dest / f"shard-{k:05d}.json"


def check_destination(dest: Path, config: dict, normalisation: dict | None = None) -> dict | None:
    """Refuse a --dest that holds another dataset; return its manifest when this run continues it. `normalisation`
    (preprocessing.normalization.resolve_normalisation's): what --latent-stats resolved to, compared with a
    channel-wise dataset's record (the file it names, and the values read from a file), not only the flag's text."""
    if not dest.exists():
        return None
    if not dest.is_dir():
        raise UsageError(f"--dest {dest} exists and is not a directory")
    manifest_path = dest / MANIFEST
    if not manifest_path.exists():
        ours = sorted(p.name for p in dest.iterdir() if OUR_FILES.match(p.name))
        if ours:
            raise UsageError(
                f"--dest {dest} holds {ours[0]} ({len(ours)} latent-dataset files in all) but no manifest.json, "
                "so they cannot be checked against this run. Choose another --dest, or pass --overwrite to "
                "replace them."
            )
        return None
    manifest = read_json(manifest_path)
    if manifest.get("format") != FORMAT:
        raise UsageError(
            f"{manifest_path} is not a manifest written by this tool (format {manifest.get('format')!r}, "
            f"expected {FORMAT!r}). Choose another --dest, or pass --overwrite to replace it."
        )
    # A finished channel-wise dataset records the scale and shift its statistics give (normalization.py's
    # final_normalization) where this run's request holds None: the request is compared by its --latent-* flags, and
    # by what --latent-stats resolved to.
    recorded = manifest.get("normalization") or {}
    derived = {"scale", "shift"} if recorded.get("type") == "channelwise" else set()
    differences = [
        f"{CONFIG_FLAGS[key]}: {manifest_path} records {manifest.get(key)!r}, this run asks for {value!r}"
        for key, value in config.items()
        if manifest.get(key) != value and not (key in derived and value is None)
    ]
    if normalisation is not None and normalisation["type"] == "channelwise" == recorded.get("type"):
        if normalisation["stats"] != recorded.get("stats"):
            differences.append(f"--latent-stats: {manifest_path} records statistics from {recorded.get('stats')!r}, "
                               f"this run's come from {normalisation['stats']!r}")
        elif any(json.loads(json.dumps(normalisation[k])) != recorded.get(k) for k in ("mean", "std")
                 if k in normalisation):
            differences.append(f"--latent-stats: {normalisation['stats']} holds other values than {manifest_path} "
                               "records (the file changed since)")
    if differences:
        raise UsageError(
            f"--dest {dest} already holds a different dataset:\n  " + "\n  ".join(differences)
            + "\nChoose another --dest, or pass --overwrite to replace it."
        )
    return manifest


def check_writable(dest: Path) -> None:
    """Make sure --dest (or, while it does not exist, the folder it would be created in) takes files; UsageError
    naming it otherwise. Creates nothing that stays."""
    import tempfile

    probe = dest
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if not probe.is_dir():
            raise NotADirectoryError(20, f"{probe} is not a directory")
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise UsageError(f"--dest {dest}: cannot write there ({e.strerror or e}); choose a folder you can write "
                         "to") from e


def open_destination(dest: Path, base: dict, overwrite: bool, resumed: bool) -> None:
    """Rank 0, before any shard is written: with `overwrite`, delete the latent-dataset files in --dest (and the
    leftovers of their interrupted writes); create the folder; unless this run continues a dataset (`resumed`),
    write its manifest as far as it is known (`base`, complete: false)."""
    if overwrite and dest.is_dir():
        for p in dest.iterdir():
            if OUR_FILES.match(p.name):
                p.unlink()
        remove_stale_temps(dest, OUR_FILES)
    dest.mkdir(parents=True, exist_ok=True)
    if not resumed:
        write_text(dest / MANIFEST, json_text(base))


def sidecar_files(dest: Path, side: Path, info: dict) -> dict[str, Path]:
    """A sidecar's shard files as paths in --dest; UsageError naming the entry when one leads out of it."""
    files = {}
    for kind, name in info["files"].items():
        path = inside(dest, name)
        if path is None:
            raise UsageError(f"{side}: its {kind!r} file {name!r} is not a file name inside --dest {dest} (an absolute "
                             "path, '..' or a link leading out of it); a shard's sidecar names only the files beside "
                             f"it, so nothing was read. Delete {side.name} (the shard is then encoded again) or pass "
                             "--overwrite")
        files[kind] = path
    return files


def shard_is_done(dest: Path, k: int, config: dict, latent_shape: list[int]) -> bool:
    """True when shard k's sidecar exists, matches this run and every file matches its checksum."""
    side = sidecar_path(dest, k)
    if not side.exists():
        return False
    try:
        info = json.loads(side.read_text())
        ok = info["config"] == config and info["latent_shape"] == latent_shape
        for kind, path in sidecar_files(dest, side, info).items():
            ok = ok and path.is_file() and sha256_file(path) == info["sha256"][kind]
    except UsageError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        print(f"warning: shard {k} does not match {side.name} (damaged or changed); encoding it again",
              file=sys.stderr)
    return ok


def write_shard(dest: Path, k: int, parts: list[list[np.ndarray]], kept: list[int], skipped: list[dict],
                paths: list[str], labels: list[int], config: dict, latent_shape: list[int]) -> None:
    """Write shard k's arrays (`parts`: per batch, the arrays of shard_files' kinds, in order; `kept`: the indices
    of their images), then its sidecar JSON: the sidecar's presence marks the shard complete."""
    names = shard_files(k, config["flip"], config["images"], config.get("posterior") != "sample")
    empty = {"images": (0, config["resolution"], config["resolution"], 3)}
    sha, stored = {}, {}
    for j, kind in enumerate(names):
        if parts:
            arr = np.concatenate([p[j] for p in parts])
        else:
            arr = np.zeros(empty.get(kind, (0, *latent_shape)))
        arr = arr.astype(np.uint8 if kind == "images" else config["dtype"], copy=False)
        sha[kind] = save_npy(dest / names[kind], arr)
        if kind in ("mean", "std"):
            stored[kind] = arr
    write_text(sidecar_path(dest, k), json_text({
        "shard": k,
        "count": len(kept),
        "config": config,
        "latent_shape": latent_shape,
        "files": names,
        "sha256": sha,
        "labels": [labels[i] for i in kept],
        "paths": [paths[i] for i in kept],
        "skipped": skipped,
        # of the stored values, which training reads (a stored sample has no spread of its own)
        "moments": channel_moments(stored["mean"], stored.get("std", np.zeros_like(stored["mean"]))),
    }))


def finalize(dest: Path, base: dict, num_shards: int, world_size: int) -> dict:
    """Rank 0, once every shard exists: labels.npy and the complete manifest.json."""
    shards, labels, skipped, moments = [], [], [], []
    for k in range(num_shards):
        side = sidecar_path(dest, k)
        if not side.exists():
            raise UsageError(
                f"{side} is missing: rank {k % world_size} did not finish shard {k}. Run the same command again "
                "to encode the missing shards (finished shards are kept)."
            )
        info = read_json(side)
        sidecar_files(dest, side, info)
        shards.append({"count": info["count"], "files": info["files"], "sha256": info["sha256"]})
        labels += info["labels"]
        skipped += info["skipped"]
        moments.append(info.get("moments"))
    labels_sha = save_npy(dest / "labels.npy", np.asarray(labels, dtype=np.int64))
    manifest = {**base, "complete": True, "num_images": len(labels), "labels": "labels.npy",
                "labels_sha256": labels_sha, "shards": shards, "skipped": skipped}
    manifest.update(final_normalization(base["normalization"], moments, dest))
    write_text(dest / MANIFEST, json_text(manifest))
    for p in dest.glob("*.tmp"):  # leftovers of a killed run whose shard has been rewritten since (older names)
        if OUR_FILES.match(p.name):
            p.unlink()
    remove_stale_temps(dest, OUR_FILES)
    return manifest
