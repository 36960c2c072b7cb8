"""``latency.runtime=deploy``: prunelab's own served form of a network.

``deploy_form`` copies the network (the caller's is never touched), puts it in eval mode, folds
VGG's pool into ``classifier[0]`` where that is exact, converts the weights to one dtype and
layout, on CUDA runs each Conv2d+ReLU as one cuDNN call, optionally moves 2:4 Linear weights onto
the sparse kernels, and on CUDA replays the forward from a CUDA graph per batch shape, captured
after cuDNN autotuning picked each convolution's algorithm (or runs it through ``torch.compile``).
It never runs a sparse model under autocast (autocast's ``to.dtype`` is not implemented for
semi-structured tensors). It has no file format of its own: it ships as the plain state_dict.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import nn

from prunelab.deploy.form import Form, dtype_name
from prunelab.deploy.registry import Runtime
from prunelab.hardware import detect, resolve_fuse
from prunelab.models.rewrite import INPUT_SIZE, ConvReLU, folded_copy, fuse_conv_relu, memory_format

GRAPH_WARMUP = 3  # forwards on the side stream before capture: cuDNN/cuBLAS pick and cache their plans


@contextlib.contextmanager
def _cudnn_autotune():
    """``torch.backends.cudnn.benchmark`` on for the block, restored after."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


class _Graph:
    """One captured forward: a static input buffer, the graph, and its static output."""

    def __init__(self, net: nn.Module, x: torch.Tensor):
        dev = x.device
        # Normal (not inference) tensors, so the buffer can be refilled in or out of inference mode.
        with torch.inference_mode(False), torch.no_grad():
            self.input = x.detach().clone()
            # Warm up on a side stream (PyTorch's CUDA graphs docs), and capture on that same stream
            # so the library handles it created are the ones the capture uses.
            self.stream = torch.cuda.Stream(dev)
            self.stream.wait_stream(torch.cuda.current_stream(dev))
            # cuDNN autotuning, as a server would run: the first warm-up call picks each convolution's
            # fastest algorithm for this shape, and the capture bakes that choice into the graph (the
            # global setting, which eager timing uses, is left as it was).
            with _cudnn_autotune():
                with torch.cuda.stream(self.stream):
                    for _ in range(GRAPH_WARMUP):
                        net(self.input)
                torch.cuda.current_stream(dev).wait_stream(self.stream)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph, stream=self.stream):
                    self.output = net(self.input)
        torch.cuda.synchronize(dev)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.input.copy_(x)
        self.graph.replay()
        # The output buffer is overwritten by the next replay; logits are small, so hand out a copy.
        return self.output.clone()


class Deployed(Form):
    """A deployed copy of a network; see :func:`deploy_form`."""

    runtime = "deploy"

    def __init__(self, net: nn.Module, *, dtype: torch.dtype, channels_last: bool, device: torch.device,
                 folded_at: tuple[int, int] | None, cuda_graph: bool, compiled: bool, kernels: str | None,
                 sparse: bool, notes: list[str], fused: int = 0):
        super().__init__(net, dtype, channels_last, device)
        self.folded_at, self.compiled, self.kernels, self.sparse = folded_at, compiled, kernels, sparse
        self.fused = fused  # Conv2d+ReLU pairs running as one cuDNN call each
        self.use_graph = cuda_graph and self.device.type == "cuda" and not compiled
        self.notes = list(notes)
        self.compile_s: dict[int, float] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._seen: set[tuple] = set()

    @property
    def batch_sizes(self) -> list[int]:
        """Batch sizes with a captured graph (or a compiled specialisation)."""
        shapes = self._graphs if self.use_graph else self._seen
        return sorted({s[0] for s in shapes})

    @property
    def batch_size(self) -> int | None:
        sizes = self.batch_sizes
        return sizes[0] if len(sizes) == 1 else None

    def disable_graph(self, why: str) -> None:
        if self.use_graph:
            self.use_graph = False
            self._graphs.clear()
            self.notes.append(f"CUDA graph off: {why}")

    def _check_size(self, x: torch.Tensor) -> None:
        if self.folded_at is not None and tuple(x.shape[-2:]) != self.folded_at:
            raise ValueError(f"this form folded VGG's pool for {self.folded_at[0]}x{self.folded_at[1]} inputs, "
                             f"where it is exact; got {tuple(x.shape[-2:])}: make another deploy_form")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_size(x)
        key = tuple(x.shape)
        if self.use_graph:
            graph = self._graphs.get(key)
            if graph is not None:
                # The copy into the graph's input buffer casts device, dtype and layout in one
                # kernel: no separate cast (a launch and a pass over the batch) on the served path.
                return graph(x)
            x = self.prepare(x)
            try:
                graph = self._graphs[key] = _Graph(self.net, x)
            except RuntimeError as exc:  # an op the capture refuses: run eagerly and say so
                with contextlib.suppress(RuntimeError):
                    torch.cuda.synchronize(self.device)
                self.disable_graph(f"capture failed for batch shape {key} ({str(exc).splitlines()[0]})")
                return self.net(x)
            return graph(x)
        x = self.prepare(x)
        if self.compiled:
            return self._compiled(x, key)
        self._seen.add(key)
        return self.net(x)

    def _compiled(self, x: torch.Tensor, key: tuple) -> torch.Tensor:
        cuda = self.device.type == "cuda"
        if cuda:  # reduce-overhead graphs: each call is a new step, its outputs reused by the next
            torch.compiler.cudagraph_mark_step_begin()
        t0 = time.perf_counter()
        out = self.net(x)
        if key not in self._seen:  # the first call per shape compiles it
            self._seen.add(key)
            if cuda:
                torch.cuda.synchronize(self.device)
            self.compile_s[key[0]] = time.perf_counter() - t0
        return out.clone() if cuda else out

    def describe(self) -> dict:
        return dict(super().describe(), folded=self.folded_at is not None, graph=self.use_graph,
                    graph_batch_sizes=sorted({s[0] for s in self._graphs}), compile=self.compiled,
                    compile_s=round(sum(self.compile_s.values()), 3) if self.compiled else None,
                    kernels=self.kernels, sparse=self.sparse, cudnn_autotune=self.use_graph, fused_conv_relu=self.fused)


def _device(net: nn.Module, device) -> torch.device:
    """``device``, else the device of ``net``'s parameters, else the CPU."""
    if device is not None:
        return torch.device(device)
    p = next(net.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _check_fuse(fuse: bool | None, device: torch.device, compile: bool) -> bool:
    """Whether to fuse Conv2d+ReLU: ``None`` as ``latency.fuse=auto`` decides; ``True`` where it
    cannot run is a ValueError."""
    if fuse is None:
        fuse = bool(resolve_fuse("auto", detect(device), compile=compile).value)
    if fuse and compile:
        raise ValueError("fuse=True with compile=True: the compiler does not trace the fused cuDNN call; "
                         "pass fuse=None (it fuses on its own)")
    if fuse and device.type != "cuda":
        raise ValueError(f"fusing Conv2d+ReLU uses cuDNN, which needs a CUDA device (this form is on {device})")
    return fuse


def _fused(net: nn.Module) -> tuple[nn.Module, int]:
    """``net`` (already a copy) with each Conv2d+ReLU pair as one cuDNN call, and how many pairs."""
    net = fuse_conv_relu(net, inplace=True)
    return net, sum(isinstance(m, ConvReLU) for m in net.modules())


def _two_four(net: nn.Module, dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, bool, str]:
    """2:4 Linear weights onto PyTorch's sparse kernels where they exist, in ``dtype`` (already cast)."""
    from prunelab.pruning.semi_structured import SPARSE_DTYPES, to_sparse_kernels

    if device.type != "cuda":
        return net, False, ("no CUDA device: the 2:4 weights ran masked-dense (dense kernels on zeros), "
                            "so no speedup is expected from them here")
    if dtype not in SPARSE_DTYPES:
        return net, False, (f"latency.dtype={dtype_name(dtype)}: PyTorch's 2:4 kernels (cuSPARSELt/CUTLASS) take "
                            "only float16/bfloat16, so the 2:4 weights ran masked-dense; set latency.dtype=bfloat16 "
                            "or float16 to time the sparse kernels")
    return to_sparse_kernels(net, dtype)


def _first_fc_two_four(net: nn.Module) -> bool:
    from prunelab.pruning.semi_structured import is_two_four

    fc = net.classifier[0] if isinstance(getattr(net, "classifier", None), nn.Sequential) else None
    return isinstance(fc, nn.Linear) and is_two_four(fc.weight)


def _sparse(deployed: nn.Module, net: nn.Module, dtype: torch.dtype, device: torch.device,
            folded: bool) -> tuple[nn.Module, bool, str]:
    """``_two_four`` of the deployed copy; the note also says when the fold made ``net``'s first
    2:4 layer dense."""
    deployed, sparse, kernels = _two_four(deployed, dtype, device)
    if folded and _first_fc_two_four(net):
        # Summing 49 columns of a 2:4 row gives a dense one: the fold (49x fewer MACs in that
        # layer) is worth more than 2:4's at most 2x, so it wins, and the report says so.
        kernels = f"{kernels}; classifier.0 was 2:4 but is dense once the pool is folded into it"
    return deployed, sparse, kernels


def deploy_form(net: nn.Module, *, dtype: torch.dtype = torch.float32, channels_last: bool = False,
                fold: bool = True, input_size: tuple[int, int] | None = None, device=None,
                cuda_graph: bool = True, compile: bool = False, example_batch: torch.Tensor | None = None,
                two_four: bool = False, fuse: bool | None = None) -> Deployed:
    """The form ``net`` ships in, as a new module (``net`` itself is left exactly as it was).

    - a copy in eval mode, gradients off; VGG's pool folded into ``classifier[0]`` when ``fold`` and
      exact at ``input_size`` (default: ``example_batch``'s size, else 32x32), else a note says why not;
    - weights in ``dtype`` (cast before anything else touches them, never autocast), ``channels_last``;
    - ``fuse`` (``None``: on CUDA unless ``compile``): each Conv2d+ReLU pair as one cuDNN call
      (``fuse_conv_relu``; the ReLU applied as the convolution writes, no second pass over the map);
    - ``two_four``: 2:4 Linear layers on the sparse kernels (CUDA sm80+, fp16/bf16), else masked-dense
      with the reason in ``.kernels``;
    - on CUDA, a CUDA graph per batch shape when ``cuda_graph``, or ``torch.compile`` when ``compile``
      (``mode="reduce-overhead"`` there, which graphs the compiled code; compile time in
      ``describe()["compile_s"]``). ``example_batch`` is run once so its shape is ready.

    Inputs may come in any dtype/layout on any device: the form casts them (``prepare`` does it once
    up front, e.g. outside a timing loop).
    """
    device = _device(net, device)
    fuse = _check_fuse(fuse, device, compile)
    if input_size is None:
        input_size = tuple(example_batch.shape[-2:]) if example_batch is not None else INPUT_SIZE
    # fold_pool copies the model and sums the weights in their trained dtype, before any cast.
    deployed, folded_at, notes = folded_copy(net, input_size, fold)
    # Cast first: the sparse kernels need their weights in the target dtype before conversion.
    deployed = deployed.eval().requires_grad_(False).to(device=device, dtype=dtype,
                                                        memory_format=memory_format(channels_last))
    deployed, fused = _fused(deployed) if fuse else (deployed, 0)
    kernels, sparse = None, False
    if two_four:
        deployed, sparse, kernels = _sparse(deployed, net, dtype, device, folded_at is not None)
    if compile:
        mode = "reduce-overhead" if device.type == "cuda" and cuda_graph else None
        # dynamic=False: one specialisation per batch shape, like the CUDA graphs.
        deployed = torch.compile(deployed, mode=mode, dynamic=False)
    form = Deployed(deployed, dtype=dtype, channels_last=channels_last, device=device, folded_at=folded_at,
                    cuda_graph=cuda_graph, compiled=compile, kernels=kernels, sparse=sparse, notes=notes,
                    fused=fused)
    if example_batch is not None:
        form.warm(example_batch)
    return form


class DeployRuntime(Runtime):
    name = "deploy"

    def build(self, net, spec, *, device, example_batch, two_four=False, channels_last=None):
        layout = spec.channels_last if channels_last is None else channels_last
        return deploy_form(net, dtype=spec.dtype, channels_last=layout, device=device, cuda_graph=spec.cuda_graph,
                           compile=spec.compile, example_batch=example_batch, two_four=two_four, fuse=spec.fuse)

    def load_snippet(self, path, spec):
        return (f"from prunelab.deploy.native import deploy_form\n\nform = deploy_form(net, dtype=torch.{spec.dtype_name}, "
                f"channels_last={spec.channels_last})\nlogits = form(images)  # float32 NCHW images, cast inside")


RUNTIME = DeployRuntime()
