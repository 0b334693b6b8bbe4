"""Issue 17 §3: predicted vs measured token kernels after the normalization- and skip-free pipeline.

For each family (a hand-written 24-block causal transformer, timm's vit_tiny and deit_tiny, Hugging
Face GPT-2, Llama and BERT; width 256 by default) and each of ``--seeds`` independently initialized
networks: ``remove_norms, remove_skips, input_norm, orthogonal_init, attention_shaping, tat``, then
``netsurgeon.token_kernels`` on the network's own example batch. Per attention block (and the last
token node) each network gives three statistics of its predicted and its measured token kernel (means
over its examples): the mean token q and the mean off-diagonal entry k (entries of the kernel itself)
and the mean token cosine (their ratio). The table gives the largest |z| (mean difference over its
standard error across the networks) of q and k, of the cosine, the output cosine and the untransformed
vanilla network's output cosine (``remove_norms, remove_skips`` only, 4 networks).

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
            node, stat, z, diff = r.worst()
            rows[fam] = {"blocks": r.blocks, "predicted": {s: v.tolist() for s, v in r.predicted.items()},
                         "measured": {s: v.tolist() for s, v in r.measured.items()},
                         "z": {s: r.z(s).tolist() for s in tc.STATS}, "worst": [node, stat, z, diff],
                         "vanilla_output": r.vanilla_output, "vanilla_vanished": r.vanilla_vanished,
                         "seconds": time.perf_counter() - t}
            print(f"{fam}: worst |z| {abs(z):.2f} ({stat} at {node}, mean diff {diff:+.4g}), output cosine predicted "
                  f"{r.predicted['cos'][:, -1].mean():.3f} measured {r.measured['cos'][:, -1].mean():.3f}, vanilla "
                  f"{_vanilla({'vanilla_output': r.vanilla_output, 'vanilla_vanished': r.vanilla_vanished})}", flush=True)
    record = {"command": command_line("transformer_correctness.py", argv), "environment": environment(args.threads),
              "width": args.width, "seeds": args.seeds, "families": rows}
    json_path.write_text(json.dumps(record, indent=1))
    lines = [f"`{record['command']}` (width {args.width}, {args.seeds} networks per family)", "",
             "| family | attention blocks | output cosine predicted | measured | worst kernel \\|z\\| (stat, block) | "
             "mean diff there | blocks with kernel \\|z\\| > 3 | worst cosine \\|z\\| | vanilla output cosine |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for fam, r in rows.items():
        zk = np.maximum(np.abs(np.array(r["z"]["q"])), np.abs(np.array(r["z"]["k"])))
        zc = np.abs(np.array(r["z"]["cos"]))
        pred, meas = np.array(r["predicted"]["cos"]), np.array(r["measured"]["cos"])
        node, stat, z, diff = r["worst"]
        lines.append(f"| {fam} | {len(r['blocks']) - 1} | {pred[:, -1].mean():.3f} | {meas[:, -1].mean():.3f} | "
                     f"{abs(z):.2f} ({stat}, {node}) | {diff:+.4g} | {int((zk > 3).sum())} | {zc.max():.2f} | "
                     f"{_vanilla(r)} |")
    md_path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return record


def _vanilla(row: dict) -> str:
    """The vanilla networks' mean output cosine, or where their signal vanished (q = 0 in float32)."""
    gone = [g for g in row.get("vanilla_vanished", []) if g is not None]
    text = f"{np.mean(row['vanilla_output']):.4f}"
    if gone:
        text += (f" at {gone[0]} in {len(gone)}/{len(row['vanilla_output'])} networks: q is 0 in float32 after it "
                 f"(the signal vanishes)")
    return text


if __name__ == "__main__":
    main()
