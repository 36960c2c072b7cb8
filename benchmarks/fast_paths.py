# ruff: noqa: E402, E701, E702  (a measurement script: compact on purpose)
"""Throughput of the fast paths on this machine, in one process: loaders, VGG16 forward, train step,
and bf16-vs-fp32 prediction agreement. Results: benchmarks/results/*-fast-paths-*.json
(2026-11-25, this 2-core Xeon VM with AVX512-BF16/AMX, torch 2.14.1, measured in a quiet window)."""
import json
import statistics
import sys
import time

import torch
from torch import nn

from prunelab.data import SyntheticDataModule
from prunelab.models import build_classifier

torch.set_num_threads(2)
import os


def _cpu_busy(interval=1.0):
    def snap():
        v = list(map(int, open("/proc/stat").readline().split()[1:]))
        return sum(v), v[3] + v[4]
    t0, i0 = snap(); time.sleep(interval); t1, i1 = snap()
    return 1 - (i1 - i0) / max(1, t1 - t0)

def wait_quiet(max_wait=600):
    t0 = time.time()
    while _cpu_busy() > 0.1 and time.time() - t0 < max_wait:
        time.sleep(2)
    return _cpu_busy()

res = {'loadavg_start': os.getloadavg()}

def epoch_rate(loader, n):
    res.setdefault('busy_before', []).append(round(wait_quiet(), 2))
    t0 = time.perf_counter(); seen = 0
    for _x, y in loader:
        seen += len(y)
    assert seen == n, (seen, n)
    return n / (time.perf_counter() - t0)

# 4,000 training images: train_size 5000 with val_fraction 0.2
for on_dev in (False, True):
    dm = SyntheticDataModule(train_size=5000, test_size=10, batch_size=128, num_workers=2, on_device=on_dev)
    dm.setup()
    ld = dm.train_dataloader()
    r1 = epoch_rate(ld, 4000); r2 = epoch_rate(ld, 4000); r3 = epoch_rate(ld, 4000)
    key = "loader_on_device" if on_dev else "loader_pil_workers2"
    res[key] = [round(r1), round(r2), round(r3)]
    print(key, "images/s epochs 1,2,3:", res[key], flush=True)
    del ld, dm
# PIL with 0 workers for reference
dm = SyntheticDataModule(train_size=5000, test_size=10, batch_size=128, num_workers=0)
dm.setup(); ld = dm.train_dataloader()
res["loader_pil_workers0"] = [round(epoch_rate(ld, 4000)) for _ in range(2)]
print("loader_pil_workers0", res["loader_pil_workers0"], flush=True)

torch.manual_seed(0)
net = build_classifier("vgg16", None, 10).eval()
x = torch.randn(128, 3, 32, 32)

def time_fwd(model, inp, bf16, iters=6, warm=2):
    res.setdefault('busy_before', []).append(round(wait_quiet(), 2))
    ts = []
    with torch.no_grad():
        for i in range(warm + iters):
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(inp)
            if i >= warm: ts.append(time.perf_counter() - t0)
    return 128 / statistics.median(ts)

res["vgg16_fwd_fp32"] = round(time_fwd(net, x, False)); print("fwd fp32", res["vgg16_fwd_fp32"], flush=True)
res["vgg16_fwd_bf16"] = round(time_fwd(net, x, True)); print("fwd bf16", res["vgg16_fwd_bf16"], flush=True)
net_cl = build_classifier("vgg16", None, 10).eval(); net_cl.load_state_dict(net.state_dict())
net_cl = net_cl.to(memory_format=torch.channels_last)
xcl = x.contiguous(memory_format=torch.channels_last)
res["vgg16_fwd_cl_fp32"] = round(time_fwd(net_cl, xcl, False)); print("fwd cl fp32", res["vgg16_fwd_cl_fp32"], flush=True)
res["vgg16_fwd_cl_bf16"] = round(time_fwd(net_cl, xcl, True)); print("fwd cl bf16", res["vgg16_fwd_cl_bf16"], flush=True)

# prediction agreement fp32 vs bf16 on 128 real-looking (synthetic, normalised) images
dm = SyntheticDataModule(train_size=1280, test_size=256, on_device=True, batch_size=128)
dm.setup()
xt = torch.cat([b[0] for b in dm.test_dataloader()])[:128]
with torch.no_grad():
    p32 = net(xt).argmax(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        p16 = net(xt).argmax(1)
        p16cl = net_cl(xt).argmax(1)
    l32 = net(xt)
top2 = l32.topk(2, 1).values
res["vgg16_random_init_agree_bf16"] = int((p32 == p16).sum())
res["vgg16_random_init_agree_cl_bf16"] = int((p32 == p16cl).sum())
res["vgg16_random_init_distinct_fp32_predictions"] = int(p32.unique().numel())
res["vgg16_random_init_median_top2_gap"] = float((top2[:, 0] - top2[:, 1]).median())
print("agreement random vgg16", res["vgg16_random_init_agree_bf16"], res["vgg16_random_init_agree_cl_bf16"], "/128", flush=True)

def time_step(model, bf16, cl, iters=3, warm=1):
    res.setdefault('busy_before', []).append(round(wait_quiet(), 2))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    y = torch.randint(0, 10, (128,))
    inp = x.contiguous(memory_format=torch.channels_last) if cl else x
    ts = []
    for i in range(warm + iters):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = nn.functional.cross_entropy(model(inp), y)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        if i >= warm: ts.append(time.perf_counter() - t0)
    return 128 / statistics.median(ts), statistics.median(ts)

for name, bf16, cl in (("step_fp32", False, False), ("step_bf16", True, False), ("step_cl_bf16", True, True)):
    torch.manual_seed(0)
    m = build_classifier("vgg16", None, 10)
    if cl: m = m.to(memory_format=torch.channels_last)
    ips, s = time_step(m, bf16, cl)
    res["vgg16_" + name] = [round(ips), round(s, 2)]
    print(name, "images/s, s/step", res["vgg16_" + name], flush=True)
    del m

import os

res["loadavg_end"] = os.getloadavg()
json.dump(res, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/bench/fast_paths.json", "w"), indent=1)
print(json.dumps(res))
