"""Which CPU kernel settings really change the arithmetic on this machine (docs/reproducibility.md).

    .venv/bin/python .ci/kernel_settings.py [--pick N] [--out FILE] [--all] [SETTING ...]

Runs one forward pass of tests/tiny.py's random LLaVA (8 images, logits) and one backward pass
(the projector's and the first layer's weight gradients) in a fresh process per setting, and
compares the bits with the default setting's. A setting that changes no bit of the forward pass on
this CPU would make a test re-run under it vacuous: it is reported loudly and not picked. Writes the
first N settings that do change the forward pass (probing stops there unless --all) to FILE, one per line (``VAR=VALUE`` words, or
``PROJLENS_TEST_THREADS=2``, read by tests/conftest.py), and exits 1 if fewer than N do.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# In order of preference: MKL's AVX2 code path (what an AVX2-only CPU runs, e.g. the project's
# AMD EPYC machines), ATen's unvectorised kernels, MKL's conditional-bitwise-reproducibility path,
# ATen's AVX2 kernels, two threads.
CANDIDATES = ["MKL_ENABLE_INSTRUCTIONS=AVX2", "ATEN_CPU_CAPABILITY=default", "MKL_CBWR=COMPATIBLE",
              "ATEN_CPU_CAPABILITY=avx2", "PROJLENS_TEST_THREADS=2"]

PROBE = r"""
import os, sys, torch
sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
torch.set_num_threads(int(os.environ.get("PROJLENS_TEST_THREADS", "1")))
from tiny import PROMPT, tiny_images, tiny_llava
model, proc = tiny_llava(seed=0)
enc = proc(images=tiny_images(8, seed=1), text=[PROMPT] * 8, return_tensors="pt")
with torch.no_grad():
    logits = model(**enc).logits
model(**enc).logits[:, -1].logsumexp(-1).sum().backward()
grads = {n: p.grad for n, p in model.named_parameters()
         if p.grad is not None and ("multi_modal_projector" in n or "layers.0." in n)}
torch.save({"logits": logits, "grads": grads, "capability": torch.backends.cpu.get_cpu_capability()}, sys.argv[1])
"""


def probe(setting: str | None, folder: Path) -> dict:
    import torch
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MKL_", "ATEN_CPU", "PROJLENS_TEST_THREADS"))}
    env.update({"OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"})
    if setting:
        k, v = setting.split("=", 1)
        env[k] = v
    out = folder / f"{setting or 'default'}.pt"
    subprocess.run([sys.executable, "-c", PROBE, str(out), str(REPO)], env=env, check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return torch.load(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pick", type=int, default=2, help="how many effective settings CI needs")
    ap.add_argument("--out", type=Path, help="file to write the picked settings to, one per line")
    ap.add_argument("--all", action="store_true", help="probe every setting, not only until N are picked")
    ap.add_argument("settings", nargs="*", default=CANDIDATES)
    args = ap.parse_args()
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        base = probe(None, Path(tmp))
        print(f"default: ATen capability {base['capability']}; torch {torch.__version__}")
        picked = []
        for s in args.settings:
            r = probe(s, Path(tmp))
            fwd = (r["logits"] != base["logits"]).float().mean().item()
            bwd = sum(int(not torch.equal(g, base["grads"][n])) for n, g in r["grads"].items())
            diff = (r["logits"] - base["logits"]).abs().max().item()
            line = (f"{s:32s} ATen {r['capability']:8s} forward: {100 * fwd:5.1f} % of logits differ "
                    f"(max {diff:.1e}); weight gradients: {bwd}/{len(r['grads'])} tensors differ")
            if fwd == 0:
                print(f"{line}\n  !!! VACUOUS on this CPU: {s} changes no bit of the forward pass; "
                      f"a test re-run under it would check nothing. Not picked.")
                continue
            print(line)
            picked.append(s)
            if len(picked) == args.pick and not args.all:
                break
    print(f"picked: {' '.join(picked) or '(none)'}")
    if args.out:
        args.out.write_text("".join(f"{s}\n" for s in picked))
    if len(picked) < args.pick:
        print(f"!!! only {len(picked)} of the {args.pick} settings needed change the arithmetic on this CPU", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
