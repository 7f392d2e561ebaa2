"""Model summary: parameters per tower and forward FLOPs per image / caption, attention apart.

    python -m ds_linclip.models --preset vit_b16 --attention linear-affine --image-size 224
    python -m ds_linclip.models --config configs/x.yaml model.text.attention=softmax --measure
"""

from __future__ import annotations

import argparse
import json
import sys

from ds_linclip.config import ATTENTION_KINDS, ConfigError, load_config
from ds_linclip.models.flops import format_table, measure_forward_flops, model_cost
from ds_linclip.models.presets import PRESETS
from kernels.reference import ALL_DENOMINATORS, ALL_FEATURE_MAPS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ds_linclip.models",
        description=__doc__.split("\n\n")[0] + " FLOPs are matmul FLOPs (2·m·n·k), counted analytically; "
        "softmax attention costs 4·N²·width per layer, linear attention 4·N·head_dim·width.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), help="model shapes (default: the config's, else vit_b16)")
    parser.add_argument("--attention", choices=ATTENTION_KINDS, help="attention kind of both towers")
    parser.add_argument("--image-attention", choices=ATTENTION_KINDS, help="image tower only (wins over --attention)")
    parser.add_argument("--text-attention", choices=ATTENTION_KINDS, help="text tower only (wins over --attention)")
    parser.add_argument("--feature-map", choices=ALL_FEATURE_MAPS, help="linear feature map, both towers (with --attention linear)")
    parser.add_argument("--denominator", choices=ALL_DENOMINATORS, help="linear normaliser, both towers")
    parser.add_argument("--local-kernel", type=int, choices=(0, 3, 5), help="image-tower local branch (depthwise conv on V)")
    parser.add_argument("--image-size", type=int, help="input pixels per side (any multiple of the patch size)")
    parser.add_argument("--config", action="append", default=[], metavar="YAML", help="config file(s) for the model section")
    parser.add_argument("--measure", action="store_true",
                        help="also count FLOPs with torch's FlopCounterMode on a meta-device model (a check)")
    parser.add_argument("--json", action="store_true", help="print a JSON object instead of the table")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. model.image.layers=6")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.preset or not (args.config or any(o.startswith("model.preset=") for o in overrides)):
        overrides.insert(0, f"model.preset={args.preset or 'vit_b16'}")
    for tower, kind in (("image", args.image_attention or args.attention), ("text", args.text_attention or args.attention)):
        if kind:
            overrides.append(f"model.{tower}.attention={kind}")
        if args.feature_map:
            overrides.append(f"model.{tower}.feature_map={args.feature_map}")
        if args.denominator:
            overrides.append(f"model.{tower}.denominator={args.denominator}")
    if args.local_kernel is not None:
        overrides.append(f"model.image.local_kernel={args.local_kernel}")
    if args.image_size:
        overrides.append(f"model.image.image_size={args.image_size}")
    try:
        cfg = load_config(args.config, overrides).model
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    cost = model_cost(cfg)
    measured = measure_forward_flops(cfg) if args.measure else None
    if args.json:
        out = cost.as_dict()
        if measured:
            out["measured_flops"] = measured
        print(json.dumps(out, indent=2))
        return 0
    image, text = cfg.image, cfg.text
    title = (
        f"preset {cfg.preset}: image {image.image_size}px / patch {image.patch_size} -> {cost.image.tokens} tokens, "
        f"width {image.width}, {image.layers} layers, {image.heads} heads | text context {text.context_length}, "
        f"width {text.width}, {text.layers} layers, {text.heads} heads | embed {cfg.embed_dim}\n"
        f"attention: image {cost.image.attention}, text {cost.text.attention}, "
        f"causal; FLOPs = matmul FLOPs (2mnk) of one forward pass\n"
    )
    print(format_table(cost, title=title, measured=measured))
    if measured and cfg.text.attention != "softmax":
        print("\nmeasured text FLOPs include the chunked causal reference's intra-chunk work "
              "(the table counts the recurrent form, 4·N·d² per head).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
