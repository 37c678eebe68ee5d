"""nystromer at an older revision (a copy of its src/) against the tree, alternating call by call.

    git worktree add /tmp/old REV && PYTHONPATH=src python benchmarks/against_revision.py /tmp/old/src
"""
import argparse, shutil, statistics, sys, tempfile, time, importlib
from pathlib import Path
import torch

p = argparse.ArgumentParser()
p.add_argument("old_src")
p.add_argument("--repeats", type=int, default=9)
p.add_argument("--threads", type=int, default=2)
p.add_argument("-n", type=int, default=16384)
p.add_argument("--kmeans", type=int, default=0)
a = p.parse_args()
torch.set_num_threads(a.threads)
tmp = Path(tempfile.mkdtemp())
shutil.copytree(Path(a.old_src) / "nystromer", tmp / "nystromer_old")
sys.path.insert(0, str(tmp))
old = importlib.import_module("nystromer_old")
import nystromer as new
print("old:", old.__file__, "new:", new.__file__)

b, h, n, d, m = 1, 8, a.n, 64, 64
g = torch.Generator().manual_seed(0)
q, k, v, gr = (torch.randn(b, n, h, d, generator=g).transpose(1, 2) for _ in range(4))
for t in (q, k, v):
    t.requires_grad_(True)
pad = torch.arange(n)[None] < n - n // 10
x = torch.randn(b, n, h * d, generator=g, requires_grad=True)
mods = {}
for name, pkg in (("old", old), ("new", new)):
    torch.manual_seed(0)
    mods[name] = pkg.NystromAttention(h * d, h, num_landmarks=m, conv_kernel_size=33, kmeans_iterations=a.kmeans)
mods["new"].load_state_dict(mods["old"].state_dict())

def fwd(pkg, mask):
    with torch.no_grad():
        return pkg.nystrom_attention(q, k, v, num_landmarks=m, mask=mask, kmeans_iterations=a.kmeans)

def fb(pkg, mask):
    for t in (q, k, v):
        t.grad = None
    pkg.nystrom_attention(q, k, v, num_landmarks=m, mask=mask, kmeans_iterations=a.kmeans).backward(gr)

def mfwd(name, mask):
    with torch.no_grad():
        return mods[name](x, mask=mask)

def mfb(name, mask):
    x.grad = None
    for p_ in mods[name].parameters():
        p_.grad = None
    mods[name](x, mask=mask).sum().backward()

# correctness first
with torch.no_grad():
    for mask in (None, pad):
        o, nn_ = fwd(old, mask), fwd(new, mask)
        print("max |old-new| function", (o - nn_).abs().max().item(), "mask" if mask is not None else "")
        o, nn_ = mfwd("old", mask), mfwd("new", mask)
        print("max |old-new| module", (o - nn_).abs().max().item())

tasks = {
    "function forward": lambda var: fwd(var[0], None),
    "function forward+backward": lambda var: fb(var[0], None),
    "function forward, 10% padding": lambda var: fwd(var[0], pad),
    "function forward+backward, 10% padding": lambda var: fb(var[0], pad),
    "module (k=33) forward": lambda var: mfwd(var[1], None),
    "module (k=33) forward+backward": lambda var: mfb(var[1], None),
}
variants = {"old": (old, "old"), "new": (new, "new")}
res = {vn: {t: [] for t in tasks} for vn in variants}
for tname, call in tasks.items():
    for var in variants.values():
        call(var)
    for _ in range(a.repeats):
        for vn, var in variants.items():
            t0 = time.perf_counter(); call(var); res[vn][tname].append((time.perf_counter() - t0) * 1e3)
print(f"\nn = {n:,}, 1 x 8 heads x 64, m = 64, kmeans {a.kmeans}, {a.threads} threads, median of {a.repeats}, alternating")
print("| ms | before | after | before ÷ after |\n|---|--:|--:|--:|")
for t in tasks:
    o, w = statistics.median(res["old"][t]), statistics.median(res["new"][t])
    print(f"| {t} | {o:.1f} | {w:.1f} | {o / w:.2f} |")
