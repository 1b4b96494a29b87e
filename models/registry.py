"""The names users type in `--model`, for every backbone family. Free of torch, so that a command line can list
them (and print its --help) without importing it.

A name is `<family>-<size>/<patch>`: `SiT-XL/2`, `LightningDiT-XL/1`. Each size gives depth, hidden size, heads and
the default block of an alignment head (the paper's: 2 for B, 8 for L and XL; LightningDiT follows SiT's sizes).
"""

from __future__ import annotations

# family -> ({size: (depth, hidden size, heads, default alignment block)}, patch sizes)
FAMILIES = {
    # SiT's sizes (DiT's); patch 1 as REPA-E trains SiT on f16 latents (VA-VAE, E2E-VAE).
    "SiT": ({"S": (12, 384, 6, 2), "B": (12, 768, 12, 2), "L": (24, 1024, 16, 8), "XL": (28, 1152, 16, 8)},
            (1, 2, 4, 8)),
    # LightningDiT publishes B/1, B/2, L/2, XL/1, XL/2; L/1 is added with L's size.
    "LightningDiT": ({"B": (12, 768, 12, 2), "L": (24, 1024, 16, 8), "XL": (28, 1152, 16, 8)}, (1, 2)),
}

MODEL_NAMES = [f"{family}-{size}/{p}" for family, (sizes, patches) in FAMILIES.items() for size in sizes
               for p in patches]


def parse_model_name(name: str) -> tuple[str, str, int]:
    """(family, size, patch) of a registry name; ValueError naming the choices for anything else."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    family, rest = name.split("-", 1)
    size, patch = rest.split("/")
    return family, size, int(patch)


def model_config(name: str) -> dict:
    """Architecture keyword arguments of a registry name (depth, hidden_size, num_heads, patch_size, encoder_depth)."""
    family, size, patch = parse_model_name(name)
    depth, hidden, heads, encoder_depth = FAMILIES[family][0][size]
    return dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch, encoder_depth=encoder_depth)


def model_family(name: str) -> str:
    return parse_model_name(name)[0]


def model_size(name: str) -> str:
    """'B', 'L', 'XL', ... of a registry name (the per-size defaults of the alignment methods key on it)."""
    return parse_model_name(name)[1]


def size_problem(name: str, depth: int | None, hidden_size: int | None, num_heads: int | None) -> str | None:
    """What keeps `name`'s backbone from being built with the --depth / --hidden-size / --num-heads overrides (None:
    the size's own value), as one line naming the flags; None when it can be built."""
    family = model_family(name)
    config = model_config(name)
    given = {"--depth": depth, "--hidden-size": hidden_size, "--num-heads": num_heads}
    values = {flag: config[flag[2:].replace("-", "_")] if value is None else value for flag, value in given.items()}
    for flag, value in values.items():
        if value < 1:
            return f"{flag} must be positive, got {value}"

    def named(flag: str) -> str:
        return f"{flag} {values[flag]}" + ("" if given[flag] is not None else f" ({name}'s)")

    hidden, heads = values["--hidden-size"], values["--num-heads"]
    if hidden % heads:
        return f"{named('--hidden-size')} is not divisible by {named('--num-heads')}: each head takes hidden/heads"
    if family == "SiT" and hidden % 4:
        return f"{named('--hidden-size')}: SiT's 2-D sin-cos position embedding needs a multiple of 4"
    if family == "LightningDiT" and (hidden // heads) % 4:
        return (f"{named('--hidden-size')} / {named('--num-heads')}: LightningDiT's 2-D RoPE needs a head width "
                "(hidden size / heads) divisible by 4")
    return None
