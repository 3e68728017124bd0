"""Build a variant of a golden set, to check that the golden tests hold on sets other than the public one.

    python tests/make_golden_variant.py SRC DST VARIANT [VARIANT ...]
    GROK1_GOLDEN_DIR=DST python -m pytest tests/test_golden.py tests/test_checkpoint.py

Without xAI's code no new reference outputs can be made, so every variant keeps what the golden files state
true of the same model:
- `zero-prefix`: case 0's stable_prefix becomes 0 (its first routing gap is lowered below 0.003 to match, as
  the README defines it). Comparing fewer positions claims less, so the other files stay valid.
- `retyped`: the bfloat16 embedding is stored as float32, and leaves.json says so. Exact: the values are
  unchanged, and the model (like the reference) casts the embedding to bfloat16 where it uses it.
- `retyped-scales`: the quantisation scales are stored as float32 too. For the checkpoint tests only: the
  values are unchanged, but the reference (and our model) multiplies int8 weights in the scales' dtype, so
  float32 scales skip a bfloat16 rounding and the model's outputs move off the golden ones.
- `grouped4`, `grouped2`: every quantised leaf's scales tiled to G = 4 (or 2) equal groups, and leaves.json
  says so. The dequantised weights are unchanged.
- `sequence-len`: config.json's sequence_len doubled (a limit on inputs; no forward pass here reaches it),
  so the config differs from the public set's and configs/grok-1-tiny.yaml no longer describes it.
The checkpoint is rewritten with grok1.checkpoint's writer (record class under "model", as golden sets have it).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import ml_dtypes
import numpy as np

from grok1.checkpoint import load_checkpoint, save_checkpoint
from grok1.config import load_config
from grok1.params import QuantizedWeight, reference_leaves

VARIANTS = ("zero-prefix", "retyped", "retyped-scales", "grouped2", "grouped4", "sequence-len")
STABLE_GAP = 0.003  # the README's threshold on the 2nd-3rd expert probability gap


def _map_params(params, fn_float, fn_record):
    layers = {name: fn_record(value) if isinstance(value, QuantizedWeight) else fn_float(value)
              for name, value in params["layers"].items()}
    return {"embedding": fn_float(params["embedding"]), "final_norm": fn_float(params["final_norm"]),
            "layers": layers}


def _retyped(value: np.ndarray) -> np.ndarray:
    return value.astype(np.float32) if value.dtype == ml_dtypes.bfloat16 else value


def _tiled(groups: int):
    def tile(record: QuantizedWeight) -> QuantizedWeight:
        assert record.scales.shape[-2] == 1, "only G = 1 scales are tiled"
        assert record.weight.shape[-2] % groups == 0
        return QuantizedWeight(record.weight, np.repeat(record.scales, groups, axis=-2))
    return tile


def _leaves_json(params, config) -> list[dict]:
    """leaves.json for `params`, in the format of the public set's."""
    listed = []
    for index, (path, name, layer) in enumerate(reference_leaves(config)):
        value = params[name] if layer is None else params["layers"][name]
        array = value.weight if isinstance(value, QuantizedWeight) else value
        array = array if layer is None else array[layer]
        entry = {"index": index, "path": path, "shape": list(array.shape)}
        if isinstance(value, QuantizedWeight):
            scales = value.scales[layer]
            entry["dtype"] = f"int8+{scales.dtype.name} scales [{', '.join(map(str, scales.shape))}]"
        else:
            entry["dtype"] = array.dtype.name
        entry["quantised"] = isinstance(value, QuantizedWeight)
        listed.append(entry)
    return listed


def make_variant(src: Path, dst: Path, variants: list[str]) -> Path:
    raw_config = json.loads((src / "config.json").read_text())
    config = load_config(src / "config.json").model
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("README.md", "config.json", "golden.json", "golden_logits.npz"):
        shutil.copyfile(src / name, dst / name)
    params = load_checkpoint(src, config)
    cases = json.loads((src / "golden.json").read_text())
    for variant in variants:
        if variant == "zero-prefix":
            cases["stable_prefix"][0] = 0
            cases["router_gap_2nd_3rd"][0][0] = min(cases["router_gap_2nd_3rd"][0][0], STABLE_GAP / 2)
        elif variant == "retyped":
            params = _map_params(params, _retyped, lambda record: record)
        elif variant == "retyped-scales":
            params = _map_params(params, _retyped, lambda r: QuantizedWeight(r.weight, _retyped(r.scales)))
        elif variant == "sequence-len":
            raw_config["sequence_len"] *= 2
            (dst / "config.json").write_text(json.dumps(raw_config, indent=1))
        elif variant.startswith("grouped"):
            params = _map_params(params, lambda v: v, _tiled(int(variant.removeprefix("grouped"))))
        else:
            raise SystemExit(f"unknown variant {variant!r} (one of {', '.join(VARIANTS)})")
    (dst / "golden.json").write_text(json.dumps(cases))
    (dst / "leaves.json").write_text(json.dumps(_leaves_json(params, config), indent=1))
    save_checkpoint(dst, params, config, record_module="model")
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("variants", nargs="+", choices=VARIANTS)
    args = parser.parse_args()
    print(make_variant(args.src, args.dst, args.variants))


if __name__ == "__main__":
    main()
