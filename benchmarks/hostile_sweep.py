"""A hostile but honest user against the CLI, ``convert``, ``load`` and the Python API.

Each case runs netsurgeon in a fresh process (as a user would), checks what was expected
(a clean refusal: exit 2, one line on stderr, no traceback; nothing run, written or lost)
and records what happened. Kills land at several moments of a large model's write, plain
and while ``--force`` replaces an earlier output; after each kill the output must be absent
or whole, and the next run must recover and say so.

Usage:
    python benchmarks/hostile_sweep.py                       # all cases, large model vit_large_patch16_224
    python benchmarks/hostile_sweep.py --quick               # resnet50 for the kills, fewer moments
    python benchmarks/hostile_sweep.py --json docs/figures/reliability/sweep.json --markdown table.md

Exit status 1 when any case does not hold. The table in docs/reliability.md is this script's output.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

SHAPE = "1,3,32,32"
PY = sys.executable


class Opaque:
    """Any pickled object in a checkpoint."""


@dataclass
class Outcome:
    group: str
    case: str
    expected: str
    observed: str
    held: bool


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return run([PY, "-m", "netsurgeon", *args], cwd)


def py(cwd: Path, code: str) -> subprocess.CompletedProcess:
    return run([PY, "-c", textwrap.dedent(code)], cwd)


def convert(cwd: Path, out: str, *extra: str, model: str = "resnet10t") -> subprocess.CompletedProcess:
    return cli(cwd, "convert", model, "--passes", "strip_bn", "--input-shape", SHAPE, "--out", out, "--quiet", *extra)


def one_line(p: subprocess.CompletedProcess, rc: int = 2) -> tuple[bool, str]:
    """A clean refusal: exit ``rc``, exactly one stderr line, no traceback or escape codes."""
    lines = p.stderr.strip().splitlines()
    ok = (p.returncode == rc and len(lines) == 1 and "Traceback" not in p.stderr + p.stdout
          and "\x1b[" not in p.stderr)
    shown = lines[0] if len(lines) == 1 else f"{len(lines)} lines: {' | '.join(lines[:2])}"
    return ok, f"exit {p.returncode}; {shown}"


def hidden(d: Path) -> list[str]:
    return sorted(n for n in os.listdir(d) if n.startswith("."))


# ------------------------------------------------------------------------------------------- cases
def trust_cases(work: Path, base: Path) -> list[Outcome]:
    out = []

    def tampered(name: str, **changes) -> Path:
        d = work / name
        shutil.copytree(base, d)
        recipe = json.loads((d / "recipe.json").read_text())
        recipe.update(changes)
        (d / "recipe.json").write_text(json.dumps(recipe))
        return d

    marker = work / "pwned"
    victim = work / "victim"
    victim.mkdir()
    for model, kwargs in [("os:system", {"command": f"touch {marker}"}),
                          ("subprocess:run", {"args": ["touch", str(marker)]}),
                          ("shutil:rmtree", {"path": str(victim)})]:
        d = tampered(f"evil-{model.replace(':', '-')}", model=model, model_kwargs=kwargs)
        p = py(work, f"import netsurgeon; netsurgeon.load({str(d)!r})")
        q = cli(work, "inspect", str(d), "--quiet")
        ok, seen = one_line(q)
        held = p.returncode != 0 and "UntrustedCodeError" in p.stderr and ok and not marker.exists() and victim.is_dir()
        out.append(Outcome("trust", f"recipe model {model!r} with {list(kwargs)}",
                           "refused before import; nothing runs", f"load: UntrustedCodeError; inspect: {seen}", held))
    for kwargs in [{"pretrained": True}, {"checkpoint_path": "/etc/passwd"}, {"pretrained_cfg_overlay": {"file": "x"}}]:
        d = tampered(f"kw-{list(kwargs)[0]}", model_kwargs=kwargs)
        ok, seen = one_line(cli(work, "inspect", str(d), "--quiet"))
        out.append(Outcome("trust", f"recipe model_kwargs {kwargs}", "refused unless --trust-code", seen,
                           ok and "--trust-code" in seen))
    for name in ["hf-hub:timm/resnet18", "timm/resnet18"]:
        ok, seen = one_line(cli(work, "inspect", str(tampered(f"name-{name.replace('/', '_').replace(':', '_')}",
                                                               model=name)), "--quiet"))
        out.append(Outcome("trust", f"recipe model {name!r}", "refused: not a timm registry name", seen, ok))
    other = work / "seed1"
    convert(work, str(other), "--seed", "1")
    swapped = tampered("swapped")
    shutil.copy(other / "model.safetensors", swapped / "model.safetensors")
    ok, seen = one_line(cli(work, "inspect", str(swapped), "--quiet"))
    out.append(Outcome("trust", "model.safetensors from another seed", "refused: sha256 differs", seen,
                       ok and "sha256" in seen))
    return out


def recipe_cases(work: Path, base: Path) -> list[Outcome]:
    out = []
    recipe = json.loads((base / "recipe.json").read_text())
    variants: dict[str, Callable[[], bytes]] = {
        "missing 'model'": lambda: json.dumps({k: v for k, v in recipe.items() if k != "model"}).encode(),
        "missing 'passes'": lambda: json.dumps({k: v for k, v in recipe.items() if k != "passes"}).encode(),
        "missing 'seed'": lambda: json.dumps({k: v for k, v in recipe.items() if k != "seed"}).encode(),
        "missing 'input_shape'": lambda: json.dumps({k: v for k, v in recipe.items() if k != "input_shape"}).encode(),
        "a JSON list": lambda: json.dumps([recipe]).encode(),
        "seed 'abc'": lambda: json.dumps({**recipe, "seed": "abc"}).encode(),
        "passes a string": lambda: json.dumps({**recipe, "passes": "strip_bn"}).encode(),
        "model_kwargs a list": lambda: json.dumps({**recipe, "model_kwargs": [1]}).encode(),
        "not UTF-8": lambda: b'{"format": 2, "model": "\xff"}',
        "format 99": lambda: json.dumps({**recipe, "format": 99}).encode(),
        "input_shape negative": lambda: json.dumps({**recipe, "input_shape": [-1, 3, 32, 32]}).encode(),
        "input_shape 1x3x100000x100000": lambda: json.dumps({**recipe, "input_shape": [1, 3, 100000, 100000]}).encode(),
        "num_classes 1e7": lambda: json.dumps({**recipe, "model_kwargs": {"num_classes": 10 ** 7}}).encode(),
        "a 2 MB recipe": lambda: b" " * (2 << 20) + b"{}",
        "nested 100,000 deep": lambda: b"[" * 100000 + b"]" * 100000,
    }
    for name, make in variants.items():
        d = work / f"recipe-{len(out)}"
        shutil.copytree(base, d)
        (d / "recipe.json").write_bytes(make())
        p = py(work, f"""
            import netsurgeon
            try:
                netsurgeon.load({str(d)!r})
            except netsurgeon.RecipeError as e:
                print("RecipeError:", e)""")
        ok = p.returncode == 0 and p.stdout.startswith("RecipeError:")
        out.append(Outcome("recipe", name, "RecipeError naming the field",
                           (p.stdout.strip() or p.stderr.strip().splitlines()[-1])[:160], ok))
    return out


_KILL_AFTER_ASIDE = """
import os, signal, sys
import netsurgeon
rename = os.rename
def rename_then_die(src, dst):
    rename(src, dst)
    if "netsurgeon-old-" in str(dst):
        os.kill(os.getpid(), signal.SIGKILL)
os.rename = rename_then_die
netsurgeon.convert("resnet10t", ["strip_bn"], sys.argv[1], input_shape=(1, 3, 32, 32), force=True, seed=5)
"""


def clobber_cases(work: Path) -> list[Outcome]:
    out = []
    race = work / "race"
    args = [PY, "-m", "netsurgeon", "convert", "resnet10t", "--passes", "strip_bn", "--input-shape", SHAPE,
            "--out", str(race), "--quiet"]
    first = subprocess.Popen([*args, "--seed", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)
    second = subprocess.Popen([*args, "--seed", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    codes = [first.wait(), second.wait()]
    errs = [first.stderr.read(), second.stderr.read()]
    seed = json.loads((race / "recipe.json").read_text())["seed"] if (race / "recipe.json").exists() else None
    held = sorted(codes) == [0, 2] and seed == codes.index(0) + 1 and "--force" in errs[codes.index(2)]
    out.append(Outcome("clobber", "two converts to one --out, 0.2 s apart", "one exits 0, the other 2 (exists)",
                       f"exits {codes}; kept seed {seed}; loser: {errs[codes.index(2)].strip()[:90] if 2 in codes else '-'}",
                       held))

    swap = work / "swap"
    convert(work, str(swap))
    before = (swap / "model.safetensors").read_bytes()
    k = run([PY, "-c", _KILL_AFTER_ASIDE, str(swap)], work)
    state = f"killed ({k.returncode}); out exists: {swap.exists()}; hidden: {len(hidden(work))}"
    again = convert(work, str(swap))
    restored = swap.exists() and (swap / "model.safetensors").read_bytes() == before
    out.append(Outcome("clobber", "SIGKILL between the two renames of --force", "next run restores the old output "
                       "and says so", f"{state}; next run: {again.stderr.strip()[:120]}",
                       k.returncode == -signal.SIGKILL and restored and "restored" in again.stderr
                       and not [n for n in hidden(work) if n.startswith(".swap.")]))

    own = work / "own"
    own.mkdir()
    (own / "recipe.json").write_text('{"mine": true}')
    ok, seen = one_line(convert(work, str(own), "--force"))
    out.append(Outcome("clobber", "--force on a directory holding the user's own recipe.json", "refused; file kept",
                       seen, ok and (own / "recipe.json").read_text() == '{"mine": true}'))
    self_conv = work / "selfconv"
    convert(work, str(self_conv))
    ok, seen = one_line(convert(work, str(self_conv), "--checkpoint", str(self_conv / "model.safetensors"), "--force"))
    out.append(Outcome("clobber", "--checkpoint selfconv/model.safetensors --out selfconv --force",
                       "refused; checkpoint kept", seen, ok and (self_conv / "model.safetensors").exists()))
    return out


def _wait_for_writing(proc: subprocess.Popen) -> float:
    """Read progress lines until the write starts; return that moment (monotonic)."""
    for line in proc.stderr:
        if "] writing " in line:
            return time.monotonic()
    raise RuntimeError("the conversion ended before writing")


def write_seconds(work: Path, model: str, shape: str) -> float:
    """How long an unkilled conversion of ``model`` takes from its "writing" line to its exit."""
    d = work / "timing"
    d.mkdir()
    proc = subprocess.Popen([PY, "-m", "netsurgeon", "convert", model, "--passes", "strip_bn", "--input-shape", shape,
                             "--out", str(d / "out")], cwd=d, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    start = _wait_for_writing(proc)
    proc.wait()
    return time.monotonic() - start


def kill_cases(work: Path, model: str, fractions: list[float]) -> list[Outcome]:
    """SIGKILL at ``fractions`` of the measured write time of ``model`` after its write starts, plain
    and while --force replaces an earlier output."""
    out = []
    shape = "1,3,224,224"
    span = write_seconds(work, model, shape)
    print(f"writing {model} takes {span:.2f} s here; kills at {', '.join(f'{f:.0%}' for f in fractions)} of it",
          flush=True)
    moments = [round(f * span, 2) for f in fractions]
    for force in (False, True):
        for t in moments:
            d = work / f"kill-{'force' if force else 'new'}-{t}"
            d.mkdir()
            target = d / "out"
            old_sha = None
            if force:
                p = convert(d, str(target), "--seed", "1")
                old_sha = json.loads((target / "recipe.json").read_text())["files"]["model.safetensors"]["sha256"]
            args = [PY, "-m", "netsurgeon", "convert", model, "--passes", "strip_bn", "--input-shape", shape,
                    "--out", str(target), *(["--force"] if force else [])]
            proc = subprocess.Popen(args, cwd=d, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
            start = _wait_for_writing(proc)
            time.sleep(max(0.0, start + t - time.monotonic()))
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            after_kill = _state(target)
            leftovers = len(hidden(d))
            probe = py(d, f"""
                import json, netsurgeon
                try:
                    gm = netsurgeon.load({str(target)!r}, trust_code=False)
                    print("whole", json.load(open({str(target / 'recipe.json')!r}))["files"]["model.safetensors"]["sha256"])
                except Exception as e:
                    print("absent" if not __import__("os").path.exists({str(target)!r}) else f"BROKEN {{e}}")
                """) if after_kill != "absent" else None
            verdict = probe.stdout.strip() if probe else "absent"
            rerun = convert(d, str(target), *(["--force"] if force else []))
            notes = [ln for ln in rerun.stderr.splitlines() if "note:" in ln]
            clean = not hidden(d)
            whole = verdict == "absent" or verdict.startswith("whole")
            old_back = (not force or verdict != "absent" or
                        any("restored" in n for n in notes))
            held = whole and old_back and clean and rerun.returncode in (0, 2) and (rerun.returncode == 0 or force
                                                                                    or verdict.startswith("whole"))
            which = ("old" if old_sha and old_sha in verdict else "new" if verdict.startswith("whole") else verdict)
            out.append(Outcome("kill", f"SIGKILL {t:.2f} s into writing {model}{' over an old output (--force)' if force else ''}",
                               "output absent or whole; next run recovers, says so, leaves no temporary",
                               f"after kill: {after_kill} ({which}), {leftovers} hidden; next run exit "
                               f"{rerun.returncode}, {len(notes)} note(s): {'; '.join(n[18:70] for n in notes)}",
                               held))
    return out


def _state(target: Path) -> str:
    if not target.exists():
        return "absent"
    return "dir with " + ",".join(sorted(os.listdir(target)))


def error_cases(work: Path) -> list[Outcome]:
    out = []
    checks: list[tuple[str, list[str], str]] = [
        ("--seed 1180591620717411303424", ["convert", "resnet10t", "--passes", "strip_bn", "--seed",
                                           "1180591620717411303424", "--out", "o1"], "seed"),
        ("--input-shape 1,3,100000,100000", ["convert", "resnet10t", "--passes", "strip_bn", "--input-shape",
                                             "1,3,100000,100000", "--out", "o2"], "elements"),
        ("--out name of 300 bytes", ["convert", "resnet10t", "--passes", "strip_bn", "--out", "n" * 300], "bytes long"),
        ("inspect --input-shape 1,3,32", ["inspect", "resnet10t", "--input-shape", "1,3,32", "--quiet"], ""),
        ("--passes tat,strip_bn (15 blocking nodes)", ["convert", "resnet10t", "--passes", "tat,strip_bn",
                                                       "--input-shape", SHAPE, "--out", "o3", "--quiet"], "more"),
        ("--set input_norm.dim=7 on a 4-D input", ["convert", "resnet10t", "--passes", "input_norm", "--set",
                                                   "input_norm.dim=7", "--input-shape", SHAPE, "--out", "o4",
                                                   "--quiet"], "dim"),
    ]
    for name, args, must in checks:
        ok, seen = one_line(cli(work, *args))
        out.append(Outcome("one line", name, "exit 2, one line", seen, ok and must in seen))

    import torch  # checkpoints of several kinds
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = timm.create_model("resnet10t").state_dict()

    torch.save({"state_dict": sd, "obj": Opaque()}, work / "pickled.pt")
    save_file({k: (v.round().long() if k == "conv1.0.weight" else v) for k, v in sd.items()}, work / "int.safetensors")
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, work / "half.safetensors")
    nan = {k: v.clone() for k, v in sd.items()}
    nan["fc.weight"][0, 0] = float("nan")
    save_file(nan, work / "nan.safetensors")
    for name, file, must, rc in [("pickled objects in a .pt", "pickled.pt", "pickled Python objects", 2),
                                 ("an int64 weight", "int.safetensors", "refused rather than cast", 2),
                                 ("NaN in a weight", "nan.safetensors", "fc.weight (1 NaN)", 2)]:
        ok, seen = one_line(convert(work, f"ck-{file}", "--checkpoint", str(work / file)), rc)
        out.append(Outcome("one line", f"checkpoint with {name}", "exit 2, one line naming it", seen, ok and must in seen))
    p = convert(work, "ck-half", "--checkpoint", str(work / "half.safetensors"))
    report = (work / "ck-half" / "report.md").read_text() if p.returncode == 0 else ""
    out.append(Outcome("one line", "float16 checkpoint", "converted; a line in report.md",
                       f"exit {p.returncode}; report: {'converted from float16' in report}",
                       p.returncode == 0 and "converted from float16 to float32" in report))
    p = py(work, """
        import timm, torch, netsurgeon
        m = timm.create_model("resnet10t"); before = {k: v.clone() for k, v in m.state_dict().items()}
        try:
            netsurgeon.transform(m, ["strip_bn"], inplace="no")
        except netsurgeon.NetsurgeonError as e:
            print(type(e).__name__, e)
        print("unchanged" if all(torch.equal(before[k], v) for k, v in m.state_dict().items()) else "MUTATED")""")
    out.append(Outcome("one line", "transform(inplace='no')", "error; model unchanged",
                       " / ".join(p.stdout.strip().splitlines())[:160], "unchanged" in p.stdout and "Error" in p.stdout))

    small = work / "tmpfs"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True).returncode == 0:
        try:
            ok, seen = one_line(convert(work, str(small / "o")))
            out.append(Outcome("one line", "disk full while writing (4 MiB tmpfs)", "exit 2, one line; nothing left",
                               seen, ok and "No space" in seen and not os.listdir(small)))
        finally:
            subprocess.run(["umount", str(small)])
    else:
        out.append(Outcome("one line", "disk full while writing", "exit 2, one line", "not run: cannot mount tmpfs",
                           False))
    return out


def _cell(text: str, limit: int = 200) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="resnet50 for the kills, three moments")
    parser.add_argument("--only-kills", action="store_true", help="run the kill cases alone")
    parser.add_argument("--json", help="write the outcomes here")
    parser.add_argument("--markdown", help="write the table here")
    args = parser.parse_args(argv)
    model, fractions = ("resnet50", [0.0, 0.5, 0.9]) if args.quick else (
        "vit_large_patch16_224", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="ns-sweep-") as tmp:
        work = Path(tmp)
        base = work / "base"
        assert convert(work, str(base)).returncode == 0
        groups = [lambda: trust_cases(work, base), lambda: recipe_cases(work, base), lambda: clobber_cases(work),
                  lambda: error_cases(work)]
        for group in ([] if args.only_kills else groups) + [lambda: kill_cases(work, model, fractions)]:
            for o in group():
                outcomes.append(o)
                print(f"[{'held' if o.held else 'FAILED'}] {o.group}: {o.case}: {o.observed}", flush=True)
    rows = ["| group | case | expected | observed | held |", "|---|---|---|---|---|"]
    rows += [f"| {o.group} | {o.case} | {o.expected} | {_cell(o.observed)} | {'yes' if o.held else '**no**'} |"
             for o in outcomes]
    table = "\n".join(rows) + "\n"
    held = sum(o.held for o in outcomes)
    print(f"\n{held} of {len(outcomes)} cases held")
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"model": model, "fractions": fractions, "held": held,
                                               "cases": [asdict(o) for o in outcomes]}, indent=2) + "\n")
    return 0 if held == len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
