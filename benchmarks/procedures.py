"""The two procedures' measured steps, each a ``child_*`` function that ``run_child`` runs in its own
process: prunelab's through its own config tree, the notebook's through ``notebook_procedure``."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from benchmarks.isolated import cpu_seconds, peak_since, start_peak_window


def compose(spec: dict, extra: list[str]):
    """Compose prunelab's ``train.yaml`` as the app does, with this run's data and paths."""
    from prunelab.compose import compose as prunelab_compose
    from prunelab.resolve import resolve_auto

    work = spec["work_dir"]
    if spec["data"] == "synthetic":
        data = ["data=synthetic", f"data.train_size={spec['train_size']}", f"data.test_size={spec['test_size']}"]
    else:
        data = [f"data.root={spec['data_root']}", "data.download=false"]
    overrides = [*data, f"model.arch={spec['arch']}", "model.weights=null", "callbacks=none", "logger=none",
                 f"trainer.accelerator={'gpu' if spec['device'].startswith('cuda') else 'cpu'}",
                 "trainer.enable_progress_bar=false", "+trainer.enable_checkpointing=false",
                 "+trainer.enable_model_summary=false", "trainer.num_sanity_val_steps=0",
                 "trainer.limit_val_batches=0", *extra]
    cfg = prunelab_compose(overrides, work)
    resolve_auto(cfg)  # +experiment=fast's "auto" settings become what this machine runs fastest
    return cfg


def _datamodule(cfg):
    from hydra.utils import instantiate

    dm = instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _trainer(cfg, callbacks):
    from lightning import Trainer
    from omegaconf import OmegaConf

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    kwargs.pop("_target_")
    return Trainer(**kwargs, callbacks=callbacks, logger=False)


def _classifier(cfg, weights_path: str | None):
    from hydra.utils import instantiate

    from prunelab.io import load_state_dict

    module = instantiate(cfg.model)
    if weights_path:
        state = load_state_dict(weights_path)
        module.net.load_state_dict(state, strict=True)
        del state
    return module


def fast_resolution(spec: dict) -> dict:
    """What +experiment=fast's "auto" settings resolve to on this machine (for the results)."""
    from prunelab.compose import compose as prunelab_compose
    from prunelab.resolve import resolve_auto

    return resolve_auto(prunelab_compose(["+experiment=fast", "data=synthetic"], spec["work_dir"]))


def child_train(spec: dict) -> dict:
    """Fine-tune with prunelab (or reuse its cache) and return the dense.pt path."""
    import lightning as L

    from prunelab.finetune import finetune

    cfg = compose(spec, [*spec["train_overrides"], f"trainer.max_epochs={spec['epochs']}",
                         f"finetune.cache={'true' if spec['cache_dir'] else 'false'}",
                         f"finetune.cache_dir={spec['cache_dir'] or Path(spec['work_dir']) / 'cache'}"])
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = _datamodule(cfg)
    module = _classifier(cfg, None)
    trainer = _trainer(cfg, [])
    ft = finetune(cfg, trainer, module, dm)
    path = Path(ft.source) if ft.reused else None
    if path is None:
        from prunelab.io import save_state_dict

        path = Path(cfg.finetune.cache_dir) / ft.key / "dense.pt" if spec["cache_dir"] else \
            save_state_dict(Path(spec["work_dir"]) / "dense.pt", module.net.state_dict())
    return {"weights": str(path), "reused": ft.reused, "seconds": ft.seconds, "key": ft.key,
            "overrides": spec["train_overrides"] + [f"trainer.max_epochs={spec['epochs']}"]}


def _timers() -> dict:
    """Wrap the search's phases with timers (instrumentation only; nothing else changes)."""
    import prunelab.search.oneshot as cb
    from prunelab.pruning.magnitude import MagnitudePruner

    timer: dict = {"evaluate": 0.0, "rank_and_copy": 0.0, "mask": 0.0, "stats": 0.0, "evaluate_calls_s": []}

    def wrap(fn, key):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                timer[key] += time.perf_counter() - t0
                if key == "evaluate":
                    timer["evaluate_calls_s"].append(time.perf_counter() - t0)
        return timed

    cb.count_correct = wrap(cb.count_correct, "evaluate")
    MagnitudePruner.prepare = wrap(MagnitudePruner.prepare, "rank_and_copy")
    MagnitudePruner.apply = wrap(MagnitudePruner.apply, "mask")
    MagnitudePruner.stats = wrap(MagnitudePruner.stats, "stats")
    return timer


def child_prunelab_search(spec: dict) -> dict:
    """prunelab's search, layerwise like the notebook, rule contiguous, default early stop."""
    from prunelab.callbacks import RatioSearch

    cfg = compose(spec, [])
    dm = _datamodule(cfg)
    device = torch.device(spec["device"])
    timer = _timers()
    baseline, reset = start_peak_window()  # right before the search's model is built
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    module = _classifier(cfg, spec["weights"])
    net = module.net.to(device)
    timer["build_and_load"] = time.perf_counter() - t0
    # full_curve=False: each phase stops at its first failure, which cannot change the contiguous
    # answer (the notebook's side evaluates its whole curve; same_answer compares contiguous answers).
    searcher = RatioSearch(tolerance=spec["tolerance"], rule="contiguous", grid=spec["grid"],
                           refine_step=spec["step"], scope="layerwise", exact=False,
                           batch_size=dm.eval_batch_size, precision=str(cfg.trainer.precision), full_curve=False,
                           fast_eval=True)  # NHWC, and VGG's pool folded at 32x32: same function, faster
    result = searcher.run(net, dm.val_set, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    memory = peak_since(baseline, reset)
    d = result.to_dict()
    curve = [{k: c[k] for k in ("ratio", "val_acc", "acc_is_bound", "seen", "passed")} for c in d["curve"]]
    return {
        "search_wall_s": wall,
        "search_cpu_s": cpu,
        "search_images": len(dm.val_set) + sum(c["seen"] for c in curve),
        **memory,
        "search_peak_device_mem": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "model_bytes": sum(p.numel() * p.element_size() for p in net.parameters()),
        "params": sum(p.numel() for p in net.parameters()),
        "dense_acc": d["dense_val_acc"],
        "best_ratio": d["best_ratio"],
        "best_ratio_highest": d["best_ratio_highest"],  # None: the curve stopped at the first failure
        "full_curve": d["full_curve"],
        "candidates": len(curve),
        "curve": curve,
        "breakdown_s": {k: v for k, v in timer.items() if k != "evaluate_calls_s"},
        "evaluate_calls_s": timer["evaluate_calls_s"],
        "val_images": len(dm.val_set),
    }


def child_notebook_search(spec: dict) -> dict:
    from benchmarks import notebook_procedure as nb

    cfg = compose(spec, [])
    dm = _datamodule(cfg)
    device = torch.device(spec["device"])
    baseline, reset = start_peak_window()  # nb.search builds its model first
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0, cpu0 = time.perf_counter(), cpu_seconds()
    out = nb.search(spec["arch"], spec["weights"], dm.val_set, device, spec["grid"], spec["step"],
                    spec["tolerance"], spec["rule"], num_workers=spec["num_workers"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    out.update(search_wall_s=wall, search_cpu_s=cpu, search_images=out.pop("images"), **peak_since(baseline, reset),
               search_peak_device_mem=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None)
    return out


def child_notebook_latency(spec: dict) -> dict:
    from benchmarks import notebook_procedure as nb

    dm = _datamodule(compose(spec, []))
    return nb.latency(spec["arch"], spec["weights"], dm.val_set, torch.device(spec["device"]),
                      num_workers=spec["num_workers"])


def child_prunelab_latency(spec: dict) -> dict:
    from prunelab.latency import sample_batch, summarize, time_forward

    cfg = compose(spec, [])
    dm = _datamodule(cfg)
    device = torch.device(spec["device"])
    net = _classifier(cfg, spec["weights"]).net.to(device)
    batch = sample_batch(dm.val_set, cfg.latency.batch_size)
    samples = time_forward(net, batch, device, warmup=spec["latency_warmup"], iters=spec["latency_iters"],
                           include_transfer=bool(cfg.latency.include_transfer))
    stats = summarize(samples, batch.shape[0])
    return {"p50_ms": stats["p50"], "p90_ms": stats["p90"], "p99_ms": stats["p99"], "iters": stats["iters"],
            "warmup": spec["latency_warmup"], "batch_size": stats["batch_size"],
            "method": "prunelab.latency.time_forward: batch on device, warm-up, device sync"}


def child_notebook_finetune(spec: dict) -> dict:
    from benchmarks import notebook_procedure as nb

    dm = _datamodule(compose(spec, []))
    return nb.finetune_throughput(spec["arch"], spec["weights"], dm.train_set, torch.device(spec["device"]),
                                  spec["ft_warmup"], spec["ft_batches"], num_workers=spec["num_workers"])


def child_prunelab_finetune(spec: dict) -> dict:
    """Lightning Trainer + ImageClassifier + the datamodule, prunelab's config (``spec['fast']``
    adds ``+experiment=fast``), for warm-up + timed batches; startup is not timed."""
    from lightning import Callback

    warm, n = spec["ft_warmup"], spec["ft_batches"]
    device = torch.device(spec["device"])

    class BatchClock(Callback):
        def __init__(self):
            self.ends: list[float] = []
            self.sizes: list[int] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.ends.append(time.perf_counter())
            self.sizes.append(int(batch[1].shape[0]))

    extra = ["+experiment=fast"] if spec["fast"] else []
    cfg = compose(spec, [*extra, "trainer.max_epochs=1", f"trainer.limit_train_batches={warm + n}"])
    dm = _datamodule(cfg)
    module = _classifier(cfg, spec["weights"])
    clock = BatchClock()
    trainer = _trainer(cfg, [clock])
    trainer.fit(module, datamodule=dm)
    if len(clock.ends) < warm + n:
        raise RuntimeError(f"only {len(clock.ends)} training batches ran, wanted {warm + n}")
    seconds = clock.ends[warm + n - 1] - (clock.ends[warm - 1] if warm else clock.ends[0])
    seen = sum(clock.sizes[warm:warm + n]) if warm else sum(clock.sizes[1:n])
    return {"images_per_s": seen / seconds, "images": seen, "seconds": seconds, "warmup_batches": warm,
            "precision": str(cfg.trainer.precision), "channels_last": bool(cfg.model.channels_last),
            "on_device": bool(cfg.data.on_device), "num_workers": int(cfg.data.num_workers)}
