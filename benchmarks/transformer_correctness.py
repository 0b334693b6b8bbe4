"""Issue 17 §3: predicted vs measured token kernels after the normalization- and skip-free pipeline.

For each family (a hand-written 24-block causal transformer, timm's vit_tiny and deit_tiny, Hugging
Face GPT-2, Llama and BERT; width 256 by default) and each of ``--seeds`` independently initialized
networks: ``remove_norms, remove_skips, input_norm, orthogonal_init, attention_shaping, tat``, then
``netsurgeon.token_kernels`` on the network's own example batch. Per attention block (and the last
token node) the table gives the mean over networks of the predicted and of the measured mean token
cosine, the largest |z| (mean difference over its standard error across the networks) and the
untransformed vanilla network's output cosine (``remove_norms, remove_skips`` only, 4 networks).

    python benchmarks/transformer_correctness.py --seeds 16 --threads 1
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import transformer_correctness as tc  # noqa: E402
from harness.cli import add_output_args, command_line, environment, new_parser, output_paths, torch_threads  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "figures"


def main(argv=None) -> dict:
    p = new_parser(__doc__)
    p.add_argument("--families", nargs="*", default=list(tc.FAMILIES), choices=list(tc.FAMILIES))
    p.add_argument("--seeds", type=int, default=16)
    p.add_argument("--width", type=int, default=tc.WIDTH)
    add_output_args(p, OUT, "transformer_correctness.md")
    args = p.parse_args(argv)
    tc.WIDTH = args.width
    out_dir, md_path = output_paths(args, "transformer_correctness.md")
    json_path = out_dir / "transformer_correctness.json"
    rows = {}
    with torch_threads(args.threads):
        for fam in args.families:
            t = time.perf_counter()
            r = tc.run(fam, seeds=args.seeds)
            node, z, diff = r.worst()
            rows[fam] = {"blocks": r.blocks, "predicted": r.predicted.tolist(), "measured": r.measured.tolist(),
                         "z": r.z().tolist(), "worst": [node, z, diff], "vanilla_output": r.vanilla_output,
                         "seconds": time.perf_counter() - t}
            print(f"{fam}: worst |z| {abs(z):.2f} at {node} (mean |diff| {diff:.4f}), output predicted "
                  f"{r.predicted[:, -1].mean():.3f} measured {r.measured[:, -1].mean():.3f}, vanilla "
                  f"{np.mean(r.vanilla_output):.4f}", flush=True)
    record = {"command": command_line("transformer_correctness.py", argv), "environment": environment(args.threads),
              "width": args.width, "seeds": args.seeds, "families": rows}
    json_path.write_text(json.dumps(record, indent=1))
    lines = [f"`{record['command']}` (width {args.width}, {args.seeds} networks per family)", "",
             "| family | attention blocks | output cosine predicted | measured | worst \\|z\\| (block) | "
             "mean \\|diff\\| there | blocks with \\|z\\| > 3 | vanilla output cosine |", "|---|---:|---:|---:|---|---:|---:|---:|"]
    for fam, r in rows.items():
        z = np.abs(np.array(r["z"]))
        pred, meas = np.array(r["predicted"]), np.array(r["measured"])
        lines.append(f"| {fam} | {len(r['blocks']) - 1} | {pred[:, -1].mean():.3f} | {meas[:, -1].mean():.3f} | "
                     f"{abs(r['worst'][1]):.2f} ({r['worst'][0]}) | {r['worst'][2]:.4f} | {int((z > 3).sum())} | "
                     f"{np.mean(r['vanilla_output']):.4f} |")
    md_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


if __name__ == "__main__":
    main()
