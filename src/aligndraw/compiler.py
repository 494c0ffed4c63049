"""``torch.compile`` for the library's models, with one graph pass of its own.

A weight shared by the T steps of a recurrence gets T gradient products, one per step, which
autograd adds up: Σ_t g_tᵀ x_t, each product with only B rows (K = B). Eagerly
``aligndraw.recurrent_linear.StepLinear`` records the steps and forms the sum as one product
over T·B rows; that recording is a Python side effect the compiler cannot trace. Here the
same rewrite is done on the compiled backward graph instead: every sum of products that
share their output shape,

    Σ_i A_i B_i  =  [A_1 … A_n] · [B_1; …; B_n],

becomes one product of concatenated operands (``stack_products``). It applies to
``aten.mm``, ``aten.bmm`` (the context mix's per-step outer products, summed into the
words' gate contributions) and oneDNN's and OpenBLAS's weight gradients (``aligndraw.gemm``). Same sum, other
rounding order (fp32 results agree to rounding, as the eager path's do). The pass runs before
inductor's own post-grad patterns (``post_grad_custom_pre_pass``): those fold ``mm(A, B) + C``
into ``addmm(C, A, B)``, which would turn the plain bf16 ``mm`` gradients of autocast into a
chain addmm(addmm(mm(A_1, B_1), A_2, B_2), …) that is no longer a sum. Run first, the pass
stacks them too: one bf16 product over T·B rows, rounded once, instead of T − 1 bf16
roundings of a running sum. CPU stacks of rows are built by ``aligndraw::stack_rows``, whose
lowering (``lower_stack_rows``) has the steps' kernels write their gradients straight into
the stack instead of copying them there after the last step (item 27). While the library's
CPU fp32 products are MKL's (the default on Intel processors), sums of CPU fp32 ``aten.mm``
are left to inductor (``stacks_cpu_fp32_mm``): there the stacking measured slower.

A second pass, ``unfuse_cpu_bias``, runs after inductor's patterns
(``post_grad_custom_post_pass``): a CPU fp32 ``addmm`` whose 1-D bias feeds only pointwise
ops becomes ``mm`` + bias, the addition done in the fused kernel that reads the product anyway,
as inductor does on GPUs (compiled sampling 1.042× and 1.066× faster in two A/Bs on an Intel
Xeon, training 1.006× and 1.012×; ``docs/performance-log.md``, item 25). After it, where the
batched products' backend is OpenBLAS (``gemm.batched_backend``, AMD processors with AVX-512),
``openblas_batched`` moves CPU fp32 ``bmm`` and ``baddbmm`` to OpenBLAS's batched op (an AMD
EPYC Zen 4's compiled training 1.05× faster; item 26); where they stay PyTorch's on an AMD
processor, ``transpose_tall_products`` forms the products whose matrices come out taller than
wide as transposed views of wide ones (MKL's AVX2 kernels run them 2.0–2.7× faster; item 36;
eagerly the Python autograd node that would do the same cost more than it saved).

``FixedShapes`` runs a model's forward and sample compiled for evaluation (``aligndraw
evaluate --compile``), each call padded to sizes compiled before.

Symbols: R rows of one step's product (B, or 1 for the shared initial state), N/K a weight's
output/input size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch._functorch.config as functorch_config
from torch import Tensor, fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils import _pytree as pytree

from aligndraw import gemm, openblas
from aligndraw.model import DrawLoss, check_temperature, standard_noise

aten = torch.ops.aten
# product op → (dim of the first operand, dim of the second) along which summed products'
# operands are concatenated: A (M, K) @ B (K, N) → cat A on dim 1, B on dim 0.
CONCAT_DIMS: dict[Any, tuple[int, int]] = {
    aten.mm.default: (1, 0),  # (M, K) @ (K, N)
    aten.bmm.default: (2, 1),  # (b, M, K) @ (b, K, N)
    torch.ops.aligndraw.onednn_weight_grad.default: (0, 0),  # g (R, N), x (R, K) → gᵀx
}  # + aligndraw_openblas::tmm (g (R, N), x (R, K) → gᵀx) once loaded: ``stack_products``
_ADD = aten.add.Tensor


def _val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(t: torch.Tensor, skip: int | None = None) -> tuple[str, ...]:
    """A hashable shape (symbolic sizes, under dynamic shapes, by their expression), without
    dimension ``skip``."""
    return tuple(str(s) for i, s in enumerate(t.shape) if i != skip)


def _is_sum(node: fx.Node) -> bool:
    """A plain a + b of two graph tensors of the same shape (no alpha, no broadcasting)."""
    if node.op != "call_function" or node.target is not _ADD or node.kwargs or len(node.args) != 2:
        return False
    vals = [_val(a) for a in (node, *node.args)]
    return (all(isinstance(v, torch.Tensor) for v in vals)
            and len({(_shape(v), v.dtype) for v in vals}) == 1)


def _terms(root: fx.Node) -> list[fx.Node]:
    """The addends of the sum tree under ``root`` (inner sums used only by the tree are opened)."""
    terms, stack = [], list(root.args)
    while stack:
        node = stack.pop(0)
        if isinstance(node, fx.Node) and _is_sum(node) and len(node.users) == 1:
            stack[:0] = list(node.args)  # depth first, in the graph's order of addends
        else:
            terms.append(node)
    return terms


_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _product(term: fx.Node) -> tuple[fx.Node, fx.Node | None]:
    """(product, the view of it that is the addend, or None): a batched product's result is
    often reshaped (``_unsafe_view``) before it is added."""
    if (term.op == "call_function" and term.target in _VIEWS and len(term.users) == 1
            and isinstance(term.args[0], fx.Node) and term.args[0].target in CONCAT_DIMS):
        return term.args[0], term
    return term, None


def _group_key(node: fx.Node, cpu_fp32_mm: bool = True) -> tuple | None:
    """Products that can be stacked together share a key; None for anything else (and, with
    ``cpu_fp32_mm`` False, for CPU fp32 ``mm``)."""
    node, view = _product(node)
    if view is not None:
        key = _group_key(node, cpu_fp32_mm)
        return None if key is None else (*key, view.target, _shape(_val(view)))
    if node.op != "call_function" or node.target not in CONCAT_DIMS or len(node.users) != 1:
        return None
    if node.kwargs or len(node.args) != 2 or not all(isinstance(_val(a), torch.Tensor) for a in node.args):
        return None
    a, b = (_val(x) for x in node.args)
    if (not cpu_fp32_mm and node.target is aten.mm.default and a.device.type == "cpu"
            and a.dtype == b.dtype == torch.float32):
        return None
    da, db = CONCAT_DIMS[node.target]
    return (node.target, _shape(a, skip=da), _shape(b, skip=db), a.dtype, b.dtype)


def _call(graph: fx.Graph, target: Callable, *args: Any, **kwargs: Any) -> fx.Node:
    """Insert ``target(*args, **kwargs)`` with its fake value in ``meta["val"]`` (inductor needs it)."""
    node = graph.call_function(target, args, kwargs)
    vals = fx.node.map_arg(args, _val)  # graph nodes → their fake tensors, also inside lists
    mode = torch._guards.detect_fake_mode(
        [v for v in pytree.tree_leaves(vals) if isinstance(v, torch.Tensor)])
    with mode:
        node.meta["val"] = target(*vals, **kwargs)
    return node


def _stack_rows(parts: list[Tensor]) -> Tensor:
    """The parts (R_i, N) one under another: (ΣR_i, N). Its own op, ``aligndraw::stack_rows``,
    for its lowering (``lower_stack_rows``); the same function gives its fake values."""
    return torch.cat(parts)


torch.library.custom_op("aligndraw::stack_rows", mutates_args=())(_stack_rows).register_fake(_stack_rows)


def _concatenated(graph: fx.Graph, parts: list[fx.Node], dim: int) -> fx.Node:
    """``cat(parts, dim)``: (…, R_i, …) along ``dim`` → (…, ΣR_i, …). CPU row stacks become
    ``aligndraw::stack_rows`` where its lowering is registered (``lower_stack_rows``, here),
    so that parts are computed in place in the stack."""
    on_cpu = all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in map(_val, parts))
    if dim == 0 and on_cpu and lower_stack_rows():
        return _call(graph, torch.ops.aligndraw.stack_rows.default, parts)
    return _call(graph, aten.cat.default, parts, dim)


def _stacked(graph: fx.Graph, terms: list[fx.Node]) -> fx.Node:
    """One product of the concatenated operands of ``terms`` (same op, same output, maybe
    viewed the same way)."""
    products = [_product(t)[0] for t in terms]
    view = _product(terms[0])[1]
    target = products[0].target
    da, db = CONCAT_DIMS[target]
    firsts = _concatenated(graph, [p.args[0] for p in products], da)
    seconds = _concatenated(graph, [p.args[1] for p in products], db)
    out = _call(graph, target, firsts, seconds)
    return out if view is None else _call(graph, view.target, out, *view.args[1:])


def stack_products(graph: fx.Graph, cpu_fp32_mm: bool = True) -> int:
    """Rewrite every sum of ≥ 2 stackable products in ``graph``; returns how many sums changed.

    ``cpu_fp32_mm`` False leaves sums of CPU fp32 ``aten.mm`` alone (``stacks_cpu_fp32_mm``)."""
    if openblas.loaded():  # OpenBLAS's weight gradient op exists once it is loaded
        CONCAT_DIMS.setdefault(torch.ops.aligndraw_openblas.tmm.default, (0, 0))
    changed = 0
    for root in reversed(list(graph.nodes)):  # outermost sums first: inner ones are absorbed
        if not _is_sum(root):
            continue
        if len(root.users) == 1 and _is_sum(next(iter(root.users))):
            continue  # part of a larger sum, handled from its root
        terms = _terms(root)
        groups: dict[tuple, list[fx.Node]] = {}
        for term in terms:
            key = _group_key(term, cpu_fp32_mm) if isinstance(term, fx.Node) else None
            if key is not None:
                groups.setdefault(key, []).append(term)
        stackable = [g for g in groups.values() if len(g) >= 2]
        if not stackable:
            continue
        with graph.inserting_before(root):
            stacked_terms = {id(p) for g in stackable for p in g}
            new = [_stacked(graph, g) for g in stackable]
            new += [t for t in terms if id(t) not in stacked_terms]
            total = new[0]
            for term in new[1:]:
                total = _call(graph, _ADD, total, term)
        root.replace_all_uses_with(total)
        changed += 1
    graph.eliminate_dead_code()
    return changed


def stacks_cpu_fp32_mm() -> bool:
    """Whether the pass should stack CPU fp32 ``mm`` sums: not while the library's CPU products
    are MKL's (``gemm.backend()`` "aten", the default on Intel processors). There MKL forms the
    T products of B rows about as fast as one of T·B rows, and gathering the stacked operands
    costs more than it saves (mnist-captions on an Intel Xeon: compiled training 1.044× and
    1.086× faster without any stacking in two A/Bs, coco32 unchanged;
    ``docs/performance-log.md``, item 3). oneDNN's weight gradients, batched products and bf16
    sums are stacked either way."""
    return gemm.backend() != "aten"


class StackProducts(CustomGraphPass):
    """``stack_products`` as inductor's post-grad pass, CPU fp32 ``mm`` sums included as
    ``stacks_cpu_fp32_mm()`` says when it runs (just after the graph was traced, under the same
    CPU product backend). Keyed by this file, ``gemm``'s and that backend for inductor's cache."""

    def __call__(self, graph: fx.Graph) -> None:
        stack_products(graph, stacks_cpu_fp32_mm())

    def uuid(self) -> bytes:
        files = (__file__, gemm.__file__, openblas.__file__, str(openblas.SOURCE))
        return get_hash_for_files(files) + gemm.backend().encode()


def unfuse_cpu_bias(graph: fx.Graph) -> int:
    """Rewrite CPU fp32 ``addmm(bias, A, B)`` with a 1-D bias whose users are all pointwise (through
    views) as ``mm(A, B) + bias``; returns how many changed. Inductor then adds the bias inside the
    fused kernel that already reads the product (the LSTM gates' nonlinearities, the projection's
    parts), instead of ``addmm`` copying the broadcast bias into its output before the product
    adds into it (a copy op of its own per product, and the output written twice). Inductor
    does the same on GPUs (``post_grad.unfuse_bias_add_to_pointwise``); run after its patterns,
    which would fold the two back into ``addmm`` on the CPU. Same sum, the bias added last:
    other rounding."""
    from torch._inductor.utils import is_pointwise_use

    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.addmm.default or node.kwargs:
            continue
        bias = _val(node.args[0])
        if (not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.device.type != "cpu"
                or bias.dtype != torch.float32):
            continue
        if not node.users or not all(is_pointwise_use(use) for use in node.users):
            continue
        with graph.inserting_before(node):
            product = _call(graph, aten.mm.default, node.args[1], node.args[2])  # (M, N)
            total = _call(graph, _ADD, product, node.args[0])  # + (N,), broadcast over rows
        node.replace_all_uses_with(total)
        graph.erase_node(node)
        changed += 1
    return changed


_BATCHED = {aten.bmm.default: "bmm", aten.baddbmm.default: "baddbmm"}


def _cpu_fp32_batched(vals: list[Any]) -> bool:
    """Whether every operand's fake value is a CPU fp32 stack of matrices (3-D)."""
    return all(isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dtype == torch.float32
               and v.dim() == 3 for v in vals)


def openblas_batched(graph: fx.Graph) -> int:
    """Rewrite CPU fp32 ``bmm(A, B)`` and ``baddbmm(C, A, B)`` (C of the output's shape, β = α = 1)
    as OpenBLAS's batched products (``aligndraw.openblas``); returns how many changed. Same
    products, each matrix's sums in OpenBLAS's order. Needs OpenBLAS's op loaded. A ``bmm``
    whose matrices have one row or one column (the context mix's α_t-weighted sum, (1, L)·(L, D))
    is left to inductor, which lowers it on the CPU as a product and a sum inside its fused
    kernels: as an op of its own it would be one more call a drawing step."""
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _BATCHED or node.kwargs:
            continue
        vals = [_val(a) for a in node.args]
        if not _cpu_fp32_batched(vals):
            continue
        a, b = vals[-2], vals[-1]  # (P, M, K), (P, K, N)
        if node.target is aten.baddbmm.default and tuple(vals[0].shape) != (*a.shape[:2], b.shape[2]):
            continue  # a broadcast C
        if node.target is aten.bmm.default and 1 in (a.shape[1], b.shape[2]):
            continue  # one row or column per matrix: inductor sums it in its own fused kernels
        op = getattr(torch.ops.aligndraw_openblas, _BATCHED[node.target]).default
        with graph.inserting_before(node):
            new = _call(graph, op, *node.args)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed += 1
    return changed


def transpose_tall_products(graph: fx.Graph) -> int:
    """Rewrite CPU fp32 ``bmm(A, B)`` whose matrices come out taller than wide (M > N > 1) as
    ``(Bᵀ Aᵀ)ᵀ``, a transposed view of the product formed with its long side along the rows;
    returns how many changed. Same sums. Run where ``gemm.transposes_tall_products`` (PyTorch's
    batched products on an AMD processor), on every graph; the model's tall products are the
    gradients of the write's and the reads' filterbanks in its backward graph, which MKL's AVX2
    kernels ran 2.0–2.7× slower tall than wide."""
    changed = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not aten.bmm.default or node.kwargs:
            continue
        vals = [_val(a) for a in node.args]
        if not _cpu_fp32_batched(vals):
            continue
        a, b = vals  # (P, M, K), (P, K, N)
        if not gemm.comes_out_tall(a.shape[1], b.shape[2]):
            continue
        with graph.inserting_before(node):
            b_t = _call(graph, aten.permute.default, node.args[1], [0, 2, 1])  # (P, N, K)
            a_t = _call(graph, aten.permute.default, node.args[0], [0, 2, 1])  # (P, K, M)
            wide = _call(graph, aten.bmm.default, b_t, a_t)  # (P, N, M)
            tall = _call(graph, aten.permute.default, wide, [0, 2, 1])  # (P, M, N), a view
        node.replace_all_uses_with(tall)
        graph.erase_node(node)
        changed += 1
    return changed


def _openblas_batched_on() -> bool:
    """Whether ``LastPasses`` moves batched products to OpenBLAS: its backend chosen, its op loaded."""
    return gemm.batched_backend() == "openblas" and openblas.loaded()


class LastPasses(CustomGraphPass):
    """``unfuse_cpu_bias``, then ``openblas_batched`` where ``_openblas_batched_on()`` or else
    ``transpose_tall_products`` where ``gemm.transposes_tall_products()``, as inductor's last
    post-grad pass. Keyed by this file, OpenBLAS's op and which second pass runs, for inductor's
    cache."""

    def __call__(self, graph: fx.Graph) -> None:
        unfuse_cpu_bias(graph)
        if _openblas_batched_on():
            openblas_batched(graph)
        elif gemm.transposes_tall_products():
            transpose_tall_products(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__, openblas.__file__, str(openblas.SOURCE))) \
            + (b"openblas" if _openblas_batched_on()
               else b"aten, tall transposed" if gemm.transposes_tall_products() else b"aten")


# inductor's C++ wrapper: the generated code calls its kernels from C++, not Python (built
# apart from the kernels: built together, the model's wrapper took longer than 15 minutes;
# a PyTorch without that setting compiles without the wrapper)
CPP_WRAPPER = ({"cpp_wrapper": True, "cpp_wrapper_build_separate": True}
               if hasattr(torch._inductor.config, "cpp_wrapper_build_separate") else {})


@functools.cache
def lower_onednn_linear() -> None:
    """Have inductor call oneDNN's own op for ``aligndraw::onednn_linear`` (one extern kernel,
    called from the C++ wrapper through PyTorch's dispatcher) rather than the custom op, whose
    body is Python: per product that cost 233 µs of CPU on an AVX2 AMD EPYC (61 ms of a
    compiled training step's 1125, 262 calls; ``docs/performance-log.md``, item 13 and the Zen 3
    profile it points to). Same oneDNN call, same operands (the op keeps its traced strides).
    Registered once; where this PyTorch's inductor lacks the hooks used, nothing is registered
    and the custom op runs as before."""
    try:
        from torch._inductor.lowering import fallback_handler, register_lowering
    except ImportError:  # another PyTorch's inductor
        return
    pointwise = fallback_handler(torch.ops.mkldnn._linear_pointwise.default,
                                 add_to_fallback_set=False)
    # replaces the plain fallback that an earlier torch.compile may have registered for the op
    register_lowering(torch.ops.aligndraw.onednn_linear.default, type_promotion_kind=None)(
        lambda x, weight, bias: pointwise(x, weight, bias, "none", [], ""))


def _read_only_after(part: Any) -> bool:
    """Whether the graph only reads FX node ``part`` from here on: no user mutates it (an
    in-place op of a later pass) and it is not one of the graph's outputs (which would keep
    the whole stack alive and let the caller write into it)."""
    if not isinstance(part, fx.Node):
        return False
    for user in part.users:
        schema = getattr(user.target, "_schema", None)
        if user.op == "output" or (schema is not None and schema.is_mutable):
            return False
    return True


def _computed_in_place(src: Any, dst: Any) -> bool:
    """Whether buffer ``src`` (R, N), whose layout is already fixed, can become the view
    ``dst`` of a stack, rows of a (ΣR, N) buffer, instead of being copied there: the dense
    output of a kernel or of a concatenation (not a graph input, an extern kernel's output, a
    view, or a buffer mutated, resized or given another storage) with ``dst``'s sizes and
    strides. ``lower_stack_rows`` asks only for parts the graph reads alone from the stack on
    (``_read_only_after``)."""
    from torch._inductor import ir
    from torch._inductor.virtualized import V

    box = src.data if isinstance(src, ir.TensorBox) else src
    if not isinstance(box, ir.StorageBox) or not isinstance(box.data, (ir.ComputedBuffer, ir.ConcatKernel)):
        return False
    layout, name = box.data.layout, box.data.get_name()
    if (type(layout) is not ir.FixedLayout or layout.offset != 0 or name in V.graph.mutated_buffers
            or name in V.graph.never_reuse_buffers):
        return False

    def same(ours: Any, theirs: Any) -> bool:
        return len(ours) == len(theirs) and all(
            V.graph.sizevars.statically_known_equals(a, b) for a, b in zip(ours, theirs, strict=True))

    return (layout.dtype == dst.get_dtype() and same(layout.size, dst.get_size())
            and same(layout.stride, dst.get_stride()))


@functools.cache
def lower_stack_rows() -> bool:
    """Have inductor compute each part of an ``aligndraw::stack_rows`` in place in the stack.

    Inductor's own concatenation does so only for parts whose layout is still open; a step's
    gradient g_t is first read by the step's input-gradient product, which fixes its layout, so
    each part was copied into the stack after the last step (a training step of
    mnist-captions: one kernel of 15.5 ms in 432 under the profiler on an AMD EPYC Zen 4,
    item 27). Here a part whose fixed layout is its slice's (``_computed_in_place``) and
    which the graph only reads from then on (``_read_only_after``) becomes that slice: its
    kernels write the stack, and its earlier readers read it there. Anything else is
    copied, as inductor does. Registered once, by the pass at its first row stack; returns
    whether it is: where this PyTorch's inductor lacks the hooks used, the pass keeps
    ``aten.cat``."""
    import inspect

    try:
        from torch._inductor import ir
        from torch._inductor.lowering import register_lowering
        from torch._inductor.virtualized import V
    except ImportError:  # another PyTorch's inductor
        return False
    rule = inspect.getattr_static(ir.ConcatKernel, "can_realize_into_without_copy", None)
    if not isinstance(rule, classmethod):
        return False
    plain = rule.__func__

    def stack_rows(parts: list[Any]) -> Any:
        nodes = V.graph.current_node.args[0]  # the parts' FX nodes
        # the parts (their storage boxes, as the rule sees them) that may move into the stack
        movable = {id(getattr(p, "data", p)) for p, n in zip(parts, nodes, strict=True)
                   if _read_only_after(n)}

        class InPlace(ir.ConcatKernel):
            @classmethod
            def can_realize_into_without_copy(cls, src: Any, dst: Any = None) -> bool:
                return plain(cls, src, dst) or (dst is not None and id(src) in movable
                                                and _computed_in_place(src, dst))

        return ir.TensorBox(InPlace.create(parts, 0))

    register_lowering(torch.ops.aligndraw.stack_rows.default, type_promotion_kind=None)(stack_rows)
    return True


def on_cpu(model: Any) -> bool:
    """Whether ``model`` (a module or a module's bound method) computes on the CPU: all of its
    module's parameters and buffers are there. Any other callable counts as CPU (pass
    ``cpp_wrapper`` to ``compile`` for one that wraps a model elsewhere)."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "__self__", None)
    if not isinstance(module, torch.nn.Module):
        return True
    return all(t.device.type == "cpu" for t in (*module.parameters(), *module.buffers()))


# what Dynamo puts in a graph compiled under autocast (the trainer's and the benchmarks' bf16:
# the step runs inside ``torch.autocast``); the value keys the cached results
AUTOCAST_FUNCTIONS = ("torch.amp.autocast_mode._enter_autocast",
                      "torch.amp.autocast_mode._exit_autocast")
# options that ``torch.compile`` takes for itself, not for the backend
TORCH_COMPILE_OPTIONS = ("guard_filter_fn", "use_aoti")


@contextlib.contextmanager
def aot_autograd_cached() -> Iterator[None]:
    """Let AOTAutograd's cache take the library's graphs, for what runs inside.

    PyTorch keeps two kinds of graph out of that cache by default: those that hold an
    ``autograd.Function`` (the alignment's ``_FactoredScores``: every training graph;
    ``autograd_cache_allow_custom_autograd_functions``) and those that enter autocast (bf16;
    ``AUTOCAST_FUNCTIONS``, not on its list of safe functions). A warm compile then traced the
    joint forward and backward graph again and ran the partitioner, though inductor's own
    cache held every kernel. Both are safe to cache here: Dynamo traces the function's forward
    and backward into the graph it hands on, and the library's are pure functions of their
    inputs (the setting admits any ``autograd.Function`` of a model given to ``compile``);
    autocast's enter and exit act by their arguments alone (device, dtype, enabled), which
    are in the graph. The cache key hashes that graph. Where this PyTorch lacks a setting,
    it is left out. A caller's own ``unsafe_marked_cacheable_functions`` option to
    ``compile`` replaces the marking of autocast's functions.
    """
    with contextlib.ExitStack() as stack:
        inductor = torch._inductor.config
        if hasattr(inductor, "unsafe_marked_cacheable_functions"):
            marked = {**inductor.unsafe_marked_cacheable_functions,
                      **dict.fromkeys(AUTOCAST_FUNCTIONS, torch.__version__)}
            stack.enter_context(inductor.patch(unsafe_marked_cacheable_functions=marked))
        if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
            stack.enter_context(
                functorch_config.patch(autograd_cache_allow_custom_autograd_functions=True))
        yield


class InductorBackend(torch._TorchCompileInductorWrapper):
    """The backend ``torch.compile(backend="inductor", options=...)`` makes, each call run
    under ``aot_autograd_cached``: while Dynamo's graph is compiled and the cache looked up
    (a backward compiled later, at the first backward, needs neither setting), not
    process-wide. Named "inductor", as Dynamo names that backend (its logs, and the clean-up
    it does after compiling for registered backends).

    ``options`` are inductor's, ``dynamic`` and ``name`` as given to ``torch.compile``. Passed
    as an object, it reaches Dynamo inside ``torch.compile``'s wrapper for other backends, so
    three debugging paths differ from the stock backend: the compiled model's
    ``get_compiler_config()`` is None, Dynamo's ``debug_inductor_config_override`` cannot
    reach it, and ``torch._dynamo.aot_compile`` does not recognise it as inductor.
    """

    def __init__(self, options: dict[str, Any], dynamic: bool | None, name: str | None) -> None:
        # PyTorch before 2.8 or so takes no name (mode, options, dynamic)
        super().__init__(None, options, dynamic, *([name] if name is not None else []))
        self.__name__ = "inductor"  # torch.compile's wrapper takes it as the compiler's name

    def __call__(self, model_: fx.GraphModule, inputs_: list, **kwargs: Any) -> Callable:
        with aot_autograd_cached():
            return super().__call__(model_, inputs_, **kwargs)


def compile(model: Any, cpp_wrapper: bool | None = None, **kwargs: Any) -> Any:  # noqa: A001 - mirrors torch.compile
    """``torch.compile(model, **kwargs)`` with ``StackProducts`` as inductor's first post-grad pass
    and ``LastPasses`` as its last.

    ``mode`` (e.g. "reduce-overhead": CUDA graphs on a GPU) is applied as its inductor options,
    since ``torch.compile`` does not take a mode beside options.
    ``cpp_wrapper`` (None: when ``on_cpu(model)``) compiles with inductor's C++ wrapper
    (``CPP_WRAPPER``): a step of mnist-captions makes a few thousand kernel and product calls,
    and making them from the generated Python code cost the Intel Xeon's compiled training
    1.054× (sampling 1.048×) against making them from C++ (``docs/performance.md``). A cold
    compile also builds the wrapper; loading from inductor's cache takes as long as without.
    The backend is ``InductorBackend``, so that a warm compile loads the whole compiled forward
    and backward from AOTAutograd's cache (``aot_autograd_cached``), bf16 graphs too.
    """
    # before inductor's patterns: they fold mm + C into addmm, hiding bf16 sums (module docstring)
    options = {"post_grad_custom_pre_pass": StackProducts(), "post_grad_custom_post_pass": LastPasses()}
    # torch.compile takes a mode or options, not both: a mode becomes its options here
    if (mode := kwargs.pop("mode", None)) not in (None, "default"):
        options |= torch._inductor.list_mode_options(mode, kwargs.get("dynamic"))
    lower_onednn_linear()
    if on_cpu(model):  # e.g. OpenBLAS's op, built and loaded before tracing; no CPU products elsewhere
        gemm.prepare()
    if cpp_wrapper if cpp_wrapper is not None else on_cpu(model):
        options |= CPP_WRAPPER
    options |= kwargs.pop("options", None) or {}
    own = {key: options.pop(key) for key in TORCH_COMPILE_OPTIONS if key in options}
    # AOTInductor packages its own artefacts, with no AOTAutograd cache to open: PyTorch's backend
    if own.get("use_aoti"):
        return torch.compile(model, options=options | own, **kwargs)
    backend = InductorBackend(options, kwargs.get("dynamic"), kwargs.get("name"))
    return torch.compile(model, backend=backend, options=own or None, **kwargs)


# ------------------------------------------------------------------------------ evaluation
def pad_rows(t: Tensor, rows: int) -> Tensor:
    """(b, …) → (rows, …), rows ≥ b: the first row repeated below the others (real values,
    so that padded rows compute what real ones do and give no inf or NaN)."""
    b = t.shape[0]
    if rows < b:
        raise ValueError(f"cannot pad {b} rows to {rows}: rows must be at least {b}")
    if b == rows:
        return t
    return torch.cat([t, t[:1].expand(rows - b, *t.shape[1:])])  # (rows, …)


def pad_words(t: Tensor, words: int) -> Tensor:
    """Word ids (B, L) or caption states (B, L, D2) → L = ``words`` ≥ L, padded with 0 (the
    vocabulary's padding id, ``Vocabulary.pad_id``; past each caption's length the models
    mask the words out)."""
    if t.dim() not in (2, 3):
        raise ValueError(f"pad_words takes word ids (B, L) or caption states (B, L, D2), "
                         f"got shape {tuple(t.shape)}")
    length = t.shape[1]
    if words < length:
        raise ValueError(f"cannot pad {length} words to {words}: words must be at least {length}")
    if words == length:
        return t
    pad = (0, words - length) if t.dim() == 2 else (0, 0, 0, words - length)  # last dim first
    return torch.nn.functional.pad(t, pad)


def packed(t: Tensor) -> Tensor:
    """``t`` with the strides a new tensor of its shape has, copied only where they differ.
    A static graph's guards compare strides, those of size-1 dimensions too (a (B, 1, H, W)
    image batch from numpy and one made by ``torch.cat`` differ there)."""
    strides, step = [], 1
    for size in reversed(t.shape):
        strides.append(step)
        step *= max(size, 1)
    return t if t.stride() == tuple(reversed(strides)) else t.clone(memory_format=torch.contiguous_format)


class FixedShapes:
    """A model (``AlignDraw`` or ``CaptionVAE``) whose ``forward`` and ``sample`` run compiled
    at fixed sizes: for evaluation, which runs many batches of one size, a smaller last one
    and captions of several lengths.

    Each call is padded so that a graph compiles once. Captions go to ``words`` words (the
    split's longest): padding gets no alignment weight, and the encoders read a caption up to
    its length only. Rows go to the smallest row count called before that holds them (the
    first row repeated); a call with more rows than any before compiles a graph for its own
    count. Outputs are cut back to the call's rows and words. Graphs are static
    (``dynamic=False``).

    ``forward`` runs the caption encoder eagerly (it is small) and the rest compiled, always
    with the importance weight, so that the lower bound, the importance-weighted bound and
    retrieval (caption states given) share one graph. ``sample`` compiles one graph with and
    one without the canvases (``history``); its temperature scales the noise outside the
    graph. (``sentvec``'s caption encoder, a GRU over packed sequences, runs inside ``sample``
    and splits its graph: Dynamo does not trace it.) Noise not given is drawn as the model
    draws it (the same generator calls). So the results equal the eager model's to fp32
    rounding. The model is put in eval mode, the mode its graphs are traced in. Other
    attributes are the model's.

    ``compile_seconds``: [(graph, rows, seconds)] of each graph's first call at a new row
    count (compiling, or loading from the compiler's caches, and running it once); graphs
    "forward", "sample" and "sample with canvases".
    """

    def __init__(self, model: Any, words: int, **kwargs: Any) -> None:
        if words < 1:
            raise ValueError(f"words must be at least 1 (the longest caption), got {words}")
        self.model, self.words = model.eval(), words
        kwargs.setdefault("dynamic", False)
        self._forward = compile(model, **kwargs)
        self._sample = compile(model.sample, **kwargs)
        self.compile_seconds: list[tuple[str, int, float]] = []

    def __getattr__(self, name: str) -> Any:  # only for names not set in __init__
        model = self.__dict__.get("model")
        if model is None:  # e.g. while copied or unpickled, before __init__'s attributes
            raise AttributeError(name)
        return getattr(model, name)

    def _check_words(self, length: int) -> None:
        if length > self.words:
            raise ValueError(f"captions of {length} words do not fit this compiled model, which "
                             f"pads captions to {self.words} words; build it with words ≥ {length}")

    def _fixed(self, t: Tensor, rows: int, words: bool = False) -> Tensor:
        """An argument padded to ``rows`` (and to ``self.words`` words), ``packed``."""
        t = pad_rows(t, rows)
        return packed(pad_words(t, self.words) if words else t)

    def _run(self, graph: str, b: int, call: Callable[[int], Any]) -> Any:
        """``call(rows)`` at the smallest row count ≥ b called before, timing a new one's first call."""
        rows = min((r for g, r, _ in self.compile_seconds if g == graph and r >= b), default=None)
        if rows is not None:
            return call(rows)
        start = time.perf_counter()
        out = call(b)
        self.compile_seconds.append((graph, b, time.perf_counter() - start))
        return out

    def __call__(self, images: Tensor, tokens: Tensor, lengths: Tensor,
                 generator: torch.Generator | None = None, noise: Tensor | None = None,
                 h_lang: Tensor | None = None, log_weight: bool = False) -> Any:
        """``model(…)``, arguments as ``AlignDraw.forward`` (noise (B, T, Z); ``CaptionVAE``'s
        (B, 1, Z)), compiled; a ``DrawLoss`` (``log_weight`` None unless asked for)."""
        b, length = images.shape[0], (h_lang if h_lang is not None else tokens).shape[1]
        self._check_words(length)
        if h_lang is None:
            h_lang = self.model.encoder(tokens, lengths)  # (B, L, D2), eagerly
        eps = standard_noise(self.model.noise_shape(b), noise, images, generator)  # (B, T, Z)

        def call(rows: int) -> Any:
            return self._forward(self._fixed(images, rows), self._fixed(tokens, rows, words=True),
                                 self._fixed(lengths, rows), noise=self._fixed(eps, rows),
                                 h_lang=self._fixed(h_lang, rows, words=True), log_weight=True)

        out = _cut(self._run("forward", b, call), b)
        if not log_weight:
            out.log_weight = None
        return out

    def sample(self, tokens: Tensor, lengths: Tensor, generator: torch.Generator | None = None,
               noise: Tensor | None = None, temperature: float = 1.0,
               history: bool = True) -> Any:
        """``model.sample(…)``, arguments as ``AlignDraw.sample``, compiled; a ``DrawSample``."""
        temperature = check_temperature(temperature)
        b, length = tokens.shape
        self._check_words(length)
        like = next(self.model.parameters())  # the model's dtype and device
        eps = standard_noise(self.model.noise_shape(b), noise, like, generator) * temperature

        def call(rows: int) -> Any:
            # temperature 1 in the graph: a Python float would be a constant, a graph per value
            out = self._sample(self._fixed(tokens, rows, words=True), self._fixed(lengths, rows),
                               noise=self._fixed(eps, rows), temperature=1.0, history=history)
            return _cut(out, b)

        out = self._run("sample with canvases" if history else "sample", b, call)
        out.alignments = out.alignments[..., :length]  # (B, T, L): the call's words
        return out


def _cut(out: Any, b: int) -> Any:
    """A ``DrawLoss`` or ``DrawSample`` with every per-row tensor cut to its first b rows (a
    ``DrawLoss``'s batch mean ``loss`` made anew from them)."""
    fields = {f.name: getattr(out, f.name) for f in dataclasses.fields(out)}
    cut = {k: v[:b] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in fields.items()}
    if isinstance(out, DrawLoss):
        del cut["loss"]
        return DrawLoss.of(**cut)
    return type(out)(**cut)
