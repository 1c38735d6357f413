r"""The autogram engine: the Gramian of the Jacobian of a vector of losses, without the Jacobian."""

import weakref
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.modules.module as module_hooks
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils._pytree import tree_leaves
from torch.utils.hooks import RemovableHandle

import torchjd.autogram._rules  # noqa: F401  (registers the built-in rules)
from torchjd._amp import without_autocast
from torchjd.autogram._batched_grad import NotVectorized, batched_grad
from torchjd.autogram._fused import FusionPlan, accumulate, per_sample_weights
from torchjd.autogram._module_call import (
    ModuleCall,
    flat_leaves,
    in_float32,
    release_like,
    shape_only,
)
from torchjd.autogram._registry import Rule, find_rule
from torchjd.autogram._rules._generic import generic_rule, generic_subtree_rule
from torchjd.autogram._rules._tied import fuses_from_recorded, tied_group_gramian
from torchjd.autogram._streaming import (
    FOLDS_IN_PLACE,
    GramianStream,
    activation_folds,
    fold_activation,
    lowest_edges,
    register_grad_hooks,
    streams_several_objectives,
    walk_graph,
)
from torchjd.autogram._workspace import Workspaces, raise_heap_thresholds

_StandInKey = tuple[torch.dtype, torch.device, torch.layout, torch.Size]
"""What a stand-in (see ``Engine._stand_in``) keeps of a tensor: its dtype, device, layout and
shape."""


class Engine:
    r"""Computes the Gramian :math:`G = J J^\top` of the Jacobian :math:`J` of a tensor of
    objectives w.r.t. the trainable parameters of some modules, without forming :math:`J`.

    The engine hooks the given modules (and their descendants). During the forward pass it records
    each hooked call's inputs; :meth:`compute_gramian` then backpropagates once to get the
    gradients :math:`\Gamma` of the objectives w.r.t. each call's output, and sums the blocks
    :math:`G = \sum_\ell J_\ell J_\ell^\top` given by a rule per module type: closed forms for
    ``Linear``, convolutions and ``Embedding``; sums of Linear blocks for ``MultiheadAttention``
    and ``RNN``/``LSTM``/``GRU``; small per-sample gradients for normalisation layers; an exact
    generic rule for any other module with parameters (see
    :func:`~torchjd.autogram.register_rule`). A rule sums the calls of its module before the
    product, so a module called several times is handled exactly. This is the autogram engine of
    Jacobian descent (Quinton & Rey, 2024, arXiv 2406.16232); a step of instance-wise risk
    minimisation is

    .. math::

        w = \mathcal W(G), \qquad \nabla_\theta\, w^\top \ell(\theta).

    :param modules: The modules whose parameters make the columns of :math:`J`: the direct
        trainable parameters of each module and of all its descendants.
    :param batch_dim: The dimension of the objectives (and of the hooked modules' inputs and
        outputs) that indexes independent samples, or None. With a batch dimension, the modules
        must treat samples independently (no ``BatchNorm`` in training mode), and one backward pass
        gives every sample's output gradients. In a hooked module's output, the samples are taken
        along ``batch_dim`` when its size there is the batch size, else along the only dimension
        of that size; modules with a ``batch_first`` attribute (``RNN``, ``LSTM``, ``GRU``,
        ``MultiheadAttention``) hold them at 0 or 1 accordingly. With None, no assumption is made
        (always correct, slower: one backward pass per objective, vectorised).

    Tied parameters are supported. Hooked modules that share a parameter (transitively: a language
    model's output ``Linear`` whose weight is its ``Embedding``'s, say) form a group, whose Gramian
    one rule gives from all their calls, with the cross terms of the shared parameters. For an
    ``Embedding`` and a ``Linear`` sharing the table, the cross terms have a closed form
    (:math:`B^2RTU` numbers for ``T`` looked-up positions and ``U`` positions of the head per
    sample), used when :math:`BTU \le Vd`; otherwise, and for any other group, the rule forms each
    module's rows of the Jacobian (in closed form for ``Linear`` and ``Embedding``, else by
    re-running the module on its recorded inputs) and holds the rows of the shared parameters,
    ``[m, P]`` for ``P`` shared numbers (``V d`` per objective for an embedding of ``V`` tokens of
    size ``d``). In :meth:`backward`, a group of stock ``Linear`` and ``Embedding`` layers is fused
    as its modules would be (a shared parameter's gradient is the sum of theirs, when every module
    holding it fuses: not a sparse ``Embedding``); the parameters of any other group get their
    gradients from the second backward pass. A group whose shared parameters do not require grad
    uses its modules' own rules. A module holding one tensor under two of its own names
    (``rnn.weight_hh_l0 = rnn.weight_ih_l0``, say) gets the generic rule (re-running the module), as
    the closed forms treat its parameters as distinct. Tie the parameters before creating the
    engine: the groups and rules are chosen then (a tie made later is not seen, and the Gramian
    would miss its cross terms). A module's own parameter that a hooked module inside it also holds
    is refused. A parameter also used outside the hooked modules (partial Jacobian descent over one
    of two tied modules) has in its columns of :math:`J` the contributions of the hooked calls only;
    the fused step still gives it its whole gradient.

    The engine's hooks stay until :meth:`close` (or the end of a ``with`` block, or the engine's
    deletion). Forward passes run with grad enabled are recorded until the next
    :meth:`compute_gramian`, which must come from all of them; run the others under
    :func:`torch.no_grad` (this includes the forward re-runs of activation checkpointing). On the
    CPU, the engine also keeps the largest intermediates of some rules (a convolution's unfolded
    inputs, and its per-objective gradients when formed by blocks of samples) in buffers reused from
    step to step, one per module, rather than taking fresh memory at every step; they are freed with
    the hooks. The first engine of a process allocates and frees (without touching it) a CPU block
    of 16 MiB, which makes glibc's ``malloc`` keep up to 32 MiB of free memory at the top of its
    heap instead of giving it back to the system and taking it again, a page fault per page, at
    every layer of the Gramian's backward pass.

    The blocks of ``Linear`` layers, convolutions, ``Embedding``, normalisation layers and
    ``MultiheadAttention`` are computed during the backward pass itself, from hooks on the
    recorded outputs, as soon as their gradients are known, so that each layer's output
    gradients are freed before the pass reaches the layers below (a hook of yours registered on
    such an output after the engine's still receives the gradient). With several objectives per
    sample, the pass is vectorised over them, and each hook receives all of them at once.

    For a linear model, the gradient of the output for sample :math:`i` is :math:`(x_i, 1)`, so
    :math:`G = X X^\top + 1`:

    >>> import torch
    >>> from torchjd.autogram import Engine
    >>> model = torch.nn.Linear(2, 1)
    >>> engine = Engine(model, batch_dim=0)
    >>> output = model(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).squeeze(dim=1)
    >>> engine.compute_gramian(output)
    tensor([[ 6., 12.],
            [12., 26.]])
    >>> output.backward(torch.tensor([0.5, 0.5]))  # the graph was kept for the weighted step
    """

    def __init__(self, *modules: nn.Module, batch_dim: int | None) -> None:
        if not modules:
            raise ValueError("Expected at least one module in `modules`, got none.")
        for k, module in enumerate(modules):
            if not isinstance(module, nn.Module):
                raise TypeError(
                    f"Expected `modules[{k}]` to be a torch.nn.Module, got {type(module).__name__}."
                )
        if batch_dim is not None and (
            isinstance(batch_dim, bool) or not isinstance(batch_dim, int)
        ):
            raise TypeError(f"Expected `batch_dim` to be an int or None, got {batch_dim!r}.")
        self._batch_dim = batch_dim
        self._modules: tuple[nn.Module, ...] = modules
        self._rules: dict[nn.Module, tuple[Rule, bool]] = {}
        self._handles: list[RemovableHandle] = []
        self._recording = True
        self._reset_transient()
        seen: set[nn.Module] = set()
        for module in modules:
            self._collect(module, seen)
        self._groups = self._tie_groups()
        # the modules of a tie group whose rows may come from a re-run (not Linear or Embedding,
        # whose closed forms, or re-runs, draw no random numbers): their random state is saved
        rerun = {
            m
            for g in self._groups
            for m, _ in g.members
            if not fuses_from_recorded(self._rules[m][0])
        }
        self._batch_norms = [m for m in self._all_modules() if isinstance(m, _BatchNorm)]
        # The hooks hold the engine weakly, so that deleting the engine removes them.
        for module, (rule, _) in self._rules.items():
            if _uses_recomputation(rule) or module in rerun:
                pre_hook = _EngineHook(self._this, "_save_rng_state")
                self._handles.append(module.register_forward_pre_hook(pre_hook))
            hook = _EngineHook(self._this, "_record")
            self._handles.append(module.register_forward_hook(hook, with_kwargs=True))

    def _reset_transient(self) -> None:
        """The state that is not copied with the engine (see :meth:`__getstate__`): what is
        recorded during a step, what is kept from step to step for speed, and the weak reference
        that the hooks hold."""
        self._calls: dict[nn.Module, list[ModuleCall]] = {}
        self._rng_states: dict[nn.Module, list[Any]] = {}
        self._stream: GramianStream | None = None  # while a streamed backward pass runs
        self._stand_ins: dict[_StandInKey, Tensor] = {}  # see _stand_in
        self._zeros: dict[tuple[torch.dtype, torch.device, torch.layout], Tensor] = {}
        self._workspaces = Workspaces()  # the rules' buffers kept from step to step (CPU)
        raise_heap_thresholds()  # fewer page faults in the Gramian's pass (see _workspace.py)
        self._this = weakref.ref(self)
        # set by torchjd.distributed for one compute_gramian: makes the calls hold the samples of
        # every rank and returns their number
        self._exchange_calls: Callable[[dict[nn.Module, list[ModuleCall]], int, int], int] | None
        self._exchange_calls = None

    def _collect(self, module: nn.Module, seen: set[nn.Module]) -> None:
        if module in seen:
            return
        seen.add(module)
        entry = find_rule(module)
        if entry is not None and entry.covers_children:
            if any(True for _ in module.parameters()):
                tied = _holds_tied_parameters(module, recurse=True)
                self._rules[module] = (generic_subtree_rule if tied else entry.rule, True)
            return
        if any(True for _ in module.parameters(recurse=False)):
            tied = _holds_tied_parameters(module, recurse=False)
            rule = generic_rule if entry is None or tied else entry.rule
            self._rules[module] = (rule, False)
        for child in module.children():
            self._collect(child, seen)

    def _tie_groups(self) -> list["_TieGroup"]:
        """The hooked modules that share parameters, grouped transitively (modules that share
        none are in no group). Refuses a module's direct parameter used by a hooked module inside
        it: re-running the outer module would count the inner module's use twice."""
        owners: dict[int, nn.Module] = {}
        parents: dict[nn.Module, nn.Module] = {}  # union-find forest of the modules
        shared: dict[int, Tensor] = {}

        def root(module: nn.Module) -> nn.Module:
            while module in parents:
                module = parents[module]
            return module

        for module, (_, covers_children) in self._rules.items():
            for param in module.parameters(recurse=covers_children):
                owner = owners.setdefault(id(param), module)
                if owner is not module:
                    shared[id(param)] = param
                    a, b = root(owner), root(module)
                    if a is not b:
                        parents[b] = a
        if not shared:
            return []
        members: dict[nn.Module, list[tuple[nn.Module, bool]]] = {}
        for module, (_, covers_children) in self._rules.items():
            members.setdefault(root(module), []).append((module, covers_children))
        groups = []
        for top, group in members.items():
            if len(group) < 2:
                continue
            tensors = [p for k, p in shared.items() if root(owners[k]) is top]
            groups.append(_TieGroup(group, tensors))
            for outer, covers_children in group:
                if covers_children:
                    continue
                inner = set(outer.modules()) - {outer}
                mine = {id(p) for p in outer.parameters(recurse=False)}
                for module, _ in group:
                    if module in inner and any(id(p) in mine for p in module.parameters()):
                        raise ValueError(
                            f"A parameter is shared by the hooked modules {type(outer).__name__} "
                            f"and {type(module).__name__}, which is inside it; the engine does "
                            "not support a module's own parameter tied to one of a hooked module "
                            "inside it. Untie them, or leave one of the modules out of the engine."
                        )
        return groups

    def _trainable(self, module: nn.Module) -> bool:
        """Whether a parameter of ``module`` (or of its descendants, when its rule covers them)
        requires grad, read afresh at every step (from ``_parameters``: no generators)."""
        for owner in module.modules() if self._rules[module][1] else (module,):
            for param in owner._parameters.values():
                if param is not None and param.requires_grad:
                    return True
        return False

    def _save_rng_state(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        """Before a call of a module whose rule may re-run it: the random state, for the re-run
        to draw the same numbers (None when the rule's ``draws_random(module)`` says that the
        call draws none)."""
        if not self._recording or not torch.is_grad_enabled():
            return
        draws_random = getattr(self._rules[module][0], "draws_random", None)
        state = None  # a call that draws no random numbers: nothing to replay
        if draws_random is None or draws_random(module):
            devices = {p.device for p in module.parameters() if p.device.type == "cuda"}
            cuda = {d: torch.cuda.get_rng_state(d) for d in devices}
            state = (torch.get_rng_state(), cuda)
        self._rng_states.setdefault(module, []).append(state)

    def _record(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self._recording or not torch.is_grad_enabled():
            return
        stack = self._rng_states.get(module)
        rng_state = stack.pop() if stack else None
        if isinstance(output, Tensor):  # the usual case: one tensor
            if not (output.requires_grad and output.is_floating_point()):
                return
            outputs, indices = [output], [0]
        else:
            leaves = flat_leaves(output)
            indices = [
                k
                for k, leaf in enumerate(leaves)
                if isinstance(leaf, Tensor) and leaf.requires_grad and leaf.is_floating_point()
            ]
            if not indices:
                return
            outputs = [leaves[k] for k in indices]
        edges = [_gradient_edge(t) for t in outputs]
        if len(edges) > 1:  # a tensor returned twice: its gradient once (both hold all of it)
            first = {}
            for k, edge in enumerate(edges):
                first.setdefault((edge.node, edge.output_nr), k)
            if len(first) < len(edges):
                kept = list(first.values())  # (in increasing order)
                outputs, indices, edges = (
                    [outputs[k] for k in kept],
                    [indices[k] for k in kept],
                    [edges[k] for k in kept],
                )
        rule = self._rules[module][0]
        call = ModuleCall(
            args=args,
            kwargs=kwargs,
            outputs=[self._stand_in(t) for t in outputs],
            output_batch_dims=[None] * len(outputs),  # resolved by compute_gramian
            batch_dim=None,
            output_leaf_indices=indices,
            rng_state=rng_state,
            training=module.training,
            edges=edges,
        )
        inner_edges = getattr(rule, "inner_edges", None)
        if inner_edges is not None:
            call.inner_edges = inner_edges(module, call)
        if getattr(rule, "pure", None) is not None:
            call.grad_hooks = register_grad_hooks(self._this, call, outputs)  # see _streaming.py
        self._calls.setdefault(module, []).append(call)

    def _stand_in(self, tensor: Tensor) -> Tensor:
        """:func:`shape_only` of ``tensor``, kept from step to step for its dtype, device, layout
        and shape (for a plain tensor: a subclass, e.g. a ``DTensor``, gets its own), expanded
        from a zero kept for its dtype, device and layout. At most ``_MAX_STAND_INS`` are kept
        (all forgotten when one more is needed: shapes that change at every step do not
        accumulate)."""
        if type(tensor) is not Tensor and type(tensor) is not nn.Parameter:
            return shape_only(tensor)
        key = (tensor.dtype, tensor.device, tensor.layout, tensor.shape)
        stand_in = self._stand_ins.get(key)
        if stand_in is None:
            zero = self._zeros.get(key[:3])
            if zero is None:
                zero = self._zeros[key[:3]] = shape_only(tensor, ())
            if len(self._stand_ins) >= _MAX_STAND_INS:
                self._stand_ins.clear()
            stand_in = self._stand_ins[key] = zero.expand(tensor.shape)
        return stand_in

    def compute_gramian(self, output: Tensor, /) -> Tensor:
        r"""The Gramian ``[m, m]`` of the Jacobian of ``output`` w.r.t. the modules' parameters.

        :param output: The objectives, of any shape; its ``m`` elements, in row-major order, are
            the rows of the Jacobian. The graph is kept, so that ``output.backward(weights)``
            can follow.

        Clears what the engine recorded during the forward pass, even when it raises.
        """
        try:
            with self._workspaces.active(fused=False), without_autocast(output):
                return self._compute_gramian(output)[0]
        finally:
            self._clear()

    def backward(
        self,
        losses: Tensor,
        weighting: Callable[[Tensor], Tensor],
        *,
        max_kept_bytes: int | None = None,
    ) -> Tensor:
        r"""The fused step of instance-wise risk minimisation: computes the Gramian :math:`G` of
        ``losses``, the weights :math:`w = \mathcal W(G)` and accumulates into the ``.grad`` of
        every leaf tensor the gradient of :math:`w^\top \ell`, as ``losses.backward(w)`` would
        (same tensors, same values), and returns :math:`w`.

        The gradients of the parameters of ``Linear`` layers, convolutions, normalisation layers,
        ``Embedding`` and ``MultiheadAttention`` come from the inputs and output
        gradients recorded for the Gramian: with
        :math:`\bar\Gamma_i = \sum_r w_{ir} \Gamma_{ir}` the weighted output gradient of sample
        :math:`i`, a Linear layer's weight gradient is :math:`\sum_i \bar\Gamma_i^\top X_i`.
        A second backward pass, restricted to the other leaves (parameters of other module types
        and of modules outside the engine, inputs that require grad), runs only when there are
        such leaves; it frees the graph. Without such leaves, with one objective per sample and
        no ``max_kept_bytes``, the single backward pass (the Gramian's) frees the graph as it
        goes, as ``losses.backward`` would: the activations do not outlive the step. A rule of
        your own joins the fused step when registered with ``weighted_gradients`` (see
        :func:`~torchjd.autogram.register_rule`).

        :param losses: The objectives, as for :meth:`compute_gramian`.
        :param weighting: A function from the Gramian ``[m, m]`` to the weights ``[m]`` (one per
            element of ``losses``, in row-major order), e.g.
            :class:`~torchjd.aggregation.UPGradWeighting`.
        :param max_kept_bytes: The most memory that the output gradients kept from the Gramian
            pass to the weighted gradients may take (each layer's is about its output's size
            times the number of objectives per sample; up to 8 times more for a small Linear
            layer with several positions per sample, whose per-objective gradients are kept
            instead); the layers that do not fit go through the second backward pass. The
            budget goes to the layers as the Gramian's backward pass reaches them (the upper
            layers first), and the output gradients of the others are freed as soon as their
            block is computed. None: no limit. 0: the two-pass step. With a budget, the engine
            keeps no buffer from step to step for this step (on the CPU, the per-objective
            gradients are otherwise formed in buffers kept between steps).
        :returns: The weights :math:`w`, as returned by ``weighting``.

        Clears what the engine recorded during the forward pass, even when it raises.

        >>> import torch
        >>> from torchjd.aggregation import MeanWeighting
        >>> from torchjd.autogram import Engine
        >>> model = torch.nn.Linear(2, 1)
        >>> engine = Engine(model, batch_dim=0)
        >>> losses = model(torch.tensor([[1.0, 2.0], [3.0, 4.0]])).squeeze(dim=1)
        >>> engine.backward(losses, MeanWeighting())
        tensor([0.5000, 0.5000])
        >>> model.weight.grad, model.bias.grad  # the mean of the inputs, and 1
        (tensor([[2., 3.]]), tensor([1.]))
        """
        if not callable(weighting):
            raise TypeError(f"Expected `weighting` to be callable, got {type(weighting).__name__}.")
        if max_kept_bytes is not None and (
            isinstance(max_kept_bytes, bool)
            or not isinstance(max_kept_bytes, int)
            or max_kept_bytes < 0
        ):
            raise ValueError(
                "Expected `max_kept_bytes` to be a non-negative int or None, got "
                f"{max_kept_bytes!r}."
            )
        try:
            # under a budget, no buffer kept from step to step (it would hold, e.g., the
            # per-sample gradients of a Transformer's layers whatever the budget)
            with (
                self._workspaces.active(fused=True, keep=max_kept_bytes is None),
                without_autocast(losses),
            ):
                return self._backward(losses, weighting, max_kept_bytes)
        finally:
            self._clear()

    def _clear(self) -> None:
        """Forgets the recorded calls (and removes their gradient hooks)."""
        for module_calls in self._calls.values():
            for call in module_calls:
                for handle in call.grad_hooks:
                    handle.remove()
        self._calls.clear()
        self._rng_states.clear()
        self._stream = None
        self._recording = True

    def _backward(
        self, losses: Tensor, weighting: Callable[[Tensor], Tensor], max_kept_bytes: int | None
    ) -> Tensor:
        G, kept, batch_dim, plan = self._compute_gramian(losses, max_kept_bytes, fused=True)
        assert plan is not None
        weights = weighting(G)
        if not isinstance(weights, Tensor) or weights.shape != (losses.numel(),):
            shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ValueError(
                f"Expected `weighting` to return a vector of {losses.numel()} weights (one per "
                f"element of `losses`), got {shape}."
            )
        w = weights.detach()
        w = w if w.dtype == losses.dtype else w.to(losses.dtype)
        W = per_sample_weights(w, losses, batch_dim)
        leaves = dict(plan.leaves)
        fused: list[tuple[Tensor, Tensor]] = []
        with torch.no_grad():
            for module, module_calls in kept.items():
                weighted_gradients = self._rules[module][0].weighted_gradients  # type: ignore[attr-defined]
                pairs = weighted_gradients(module, in_float32(module, module_calls), W) or []
                for param, grad in pairs:
                    if plan.accepts(module, param):
                        fused.append((param, grad))
                        leaves.pop(id(param), None)
                _release(module_calls)  # frees the output gradients before the next module's
        others = [leaf for leaf, _ in leaves.values()]
        if others and plan.complete:  # a rule's `fuses` promised more than it gave
            raise RuntimeError(
                "The graph of `losses` was freed for a fused step that left the gradients of "
                f"{len(others)} leaves to a second backward pass; please report this bug."
            )
        if others:
            torch.autograd.backward(losses, w.reshape(losses.shape), inputs=others)
        for param, grad in fused:
            accumulate(param, grad)
        return weights

    def _compute_gramian(
        self, output: Tensor, kept_bytes: int | None = 0, fused: bool = False
    ) -> tuple[Tensor, dict[nn.Module, list[ModuleCall]], int | None, FusionPlan | None]:
        """The Gramian, the batch dimension, the calls whose output gradients are kept for
        the fused step (none unless ``fused``): those of modules whose rule has
        ``weighted_gradients``, in the order in
        which the rules run (the streamed ones during the backward pass, from the top, then the
        others in the order of the calls), while their total size stays within ``kept_bytes``
        (None: no limit) (the others' are released
        as soon as their block is computed), and for the fused step, its plan.

        The graph is kept, except for a fused step that needs no second backward pass (every
        module kept, every leaf's gradient promised by the rules: ``FusionPlan.complete``) and has
        one objective per sample: the backward pass then frees it as it goes, as a plain
        backward pass does, instead of holding the activations until ``output`` is dropped.

        The rules that need only the recorded tensors run during the backward pass, as soon as
        their module's output gradients exist (see ``_streaming.py``)."""
        if not isinstance(output, Tensor):
            raise TypeError(f"Expected `output` to be a Tensor, got {type(output).__name__}.")
        batch_dim = self._normalized_batch_dim(output)
        self._check_per_sample_independence(batch_dim)
        calls = {m: c for m, c in self._calls.items() if self._trainable(m)}
        if not output.requires_grad or not calls:
            raise ValueError(
                "`output` does not depend on the trainable parameters of the engine's modules: "
                "no hooked module was called with grad enabled since the last compute_gramian. "
                "Compute `output` from a forward pass of the modules given to the Engine."
            )
        self._recording = False
        m = output.numel()
        B = 1 if batch_dim is None else output.shape[batch_dim]
        R = m // B if B else 0
        if m == 0:
            plan = FusionPlan(output, {}, {}) if fused else None
            return output.new_zeros(0, 0), {}, batch_dim, plan
        if batch_dim is not None:
            for module, module_calls in calls.items():
                _resolve_batch_dims(module, module_calls, batch_dim, B)
        groups = self._active_groups(calls)  # each with the calls of its modules
        grouped = {m for present in groups.values() for m in present}
        solo = calls if not grouped else {m: c for m, c in calls.items() if m not in grouped}
        streamed = self._streamed(solo, R) if output.grad_fn is not None else {}
        below: dict[Any, bool] = {}
        parents: dict[Any, list[Any]] = {}  # (read by a fold only: see _gramian_pass)
        leaves = None
        if fused or streamed:  # one walk of the graph for both
            nodes = {
                e.node for cs in calls.values() for c in cs for e in (*c.edges, *c.inner_edges)
            }
            folds = R == 1 and FOLDS_IN_PLACE
            leaves, below = walk_graph(output.grad_fn, nodes, parents if folds else None)
        plan = FusionPlan(output, solo, self._rules, leaves) if fused else None
        # the groups whose modules' weighted_gradients need only the recorded inputs and output
        # gradients (the group's rule may not have run their own rules, which save what others
        # need); the other groups' parameters: from the second backward pass
        fusable = [
            group
            for group, present in groups.items()
            if plan is not None and all(fuses_from_recorded(self._rules[m][0]) for m in present)
        ]
        for group in fusable:
            plan.add_group(groups[group], self._rules)  # type: ignore[union-attr]
        if plan is not None and not (kept_bytes is None and R == 1):
            plan.complete = False  # modules may be left out, or the graph is kept anyway
        kept: dict[nn.Module, list[ModuleCall]] = {}
        budget = kept_bytes
        blocks: dict[nn.Module, Tensor] = {}

        def run_rule(module: nn.Module, module_calls: list[ModuleCall]) -> None:
            rule = self._rules[module][0]
            # The Gramian is a statistic: no graph to the activations (within the backward pass,
            # which disables it, no context needed).
            seen = in_float32(module, module_calls)
            with torch.no_grad() if torch.is_grad_enabled() else nullcontext():
                blocks[module] = rule(module, seen)
            release_like(module_calls, seen)
            settle({module: module_calls}, fused and _fusable(rule))

        def settle(module_calls: dict[nn.Module, list[ModuleCall]], fusable: bool) -> None:
            """Keeps the calls for the fused step if they fit, else releases them."""
            nonlocal budget
            fits = budget is None  # no limit: the sizes are not needed
            if not fits and fusable:  # compute_gramian keeps nothing
                size = sum(_kept_bytes(call) for cs in module_calls.values() for call in cs)
                fits = size <= budget  # type: ignore[operator]
                budget -= size if fits else 0  # type: ignore[operator]
            if fusable and fits:
                kept.update(module_calls)
            else:
                for calls_of_module in module_calls.values():
                    _release(calls_of_module)

        cotangents = [_cotangents(output, batch_dim, R)]
        retain_graph = plan is None or not plan.complete
        # what the streamed rules find in `saved`, for a pass that fails midway (only a
        # vectorised one can: R > 1)
        saved = {id(c): dict(c.saved) for cs in streamed.values() for c in cs} if R > 1 else {}
        try:
            grads, stream, requested = self._gramian_pass(
                output, calls, streamed, cotangents, retain_graph, run_rule, below, parents
            )
        except NotVectorized:  # R > 1 and an operation without a batching rule: no stream
            for module_calls in streamed.values():  # undo what the rules that ran did
                for call in module_calls:
                    call.saved = saved[id(call)]
            blocks.clear()
            kept.clear()
            budget = kept_bytes
            streamed = {}
            grads, stream, requested = self._gramian_pass(
                output, calls, streamed, cotangents, retain_graph, run_rule, below, parents
            )
        del saved
        self._store_grads(calls, streamed, requested, iter(grads))
        del grads  # the calls alone hold the output gradients, so that releasing them frees them
        self._check_all_calls_reached(calls, set() if stream is None else stream.reached)
        shape = output.shape
        if self._exchange_calls is not None:  # torchjd.distributed: every rank's samples
            B = self._exchange_calls(calls, batch_dim, B)
            shape = torch.Size([B if d == batch_dim else n for d, n in enumerate(shape)])
        for module, module_calls in solo.items():
            if stream is None or module not in stream.done:
                run_rule(module, module_calls)
        group_blocks = []
        for group, present in groups.items():
            group_blocks.append(self._group_gramian(group, present))
            settle(present, group in fusable)
        G = _sum_blocks([blocks[module] for module in solo] + group_blocks, output, B * R)
        return _to_row_major(G, shape, batch_dim), kept, batch_dim, plan

    def _active_groups(
        self, calls: dict[nn.Module, list[ModuleCall]]
    ) -> dict["_TieGroup", dict[nn.Module, list[ModuleCall]]]:
        """The tie groups whose rule replaces their modules' own in this pass (a trainable shared
        parameter, several of the modules called), each with the calls of its modules."""
        active = {}
        for group in self._groups:
            present = {m: calls[m] for m, _ in group.members if m in calls}
            if len(present) > 1 and any(p.requires_grad for p in group.shared):
                active[group] = present
        return active

    def _group_gramian(
        self, group: "_TieGroup", present: dict[nn.Module, list[ModuleCall]]
    ) -> Tensor:
        """The block of a tie group (see ``_rules/_tied.py``), from the calls ``present`` of its
        modules."""
        members = [
            (
                m,
                in_float32(m, present[m]),
                [p for p in m.parameters(recurse=covers) if p.requires_grad],
            )
            for m, covers in group.members
            if m in present
        ]
        shared = [p for p in group.shared if p.requires_grad]
        with torch.no_grad() if torch.is_grad_enabled() else nullcontext():
            G = tied_group_gramian(members, shared)
        for m, seen, _ in members:
            release_like(present[m], seen)
        return G

    def _gramian_pass(
        self,
        output: Tensor,
        calls: dict[nn.Module, list[ModuleCall]],
        streamed: dict[nn.Module, list[ModuleCall]],
        cotangents: list[Tensor],
        retain_graph: bool,
        run_rule: Callable[[nn.Module, list[ModuleCall]], None],
        below: dict[Any, bool],
        parents: dict[Any, list[Any]],
    ) -> tuple[tuple[Tensor | None, ...], GramianStream | None, set[tuple[int, int]]]:
        """The backward pass of the Gramian, with the ``streamed`` rules running during it: the
        gradients it returns, its stream (None without streamed rules) and the keys of the lowest
        streamed edges (see :meth:`_requested_edges`). With streamed rules and several objectives
        per sample, raises ``NotVectorized`` when the vectorised pass fails. ``below``: the
        graph walk's (see ``walk_graph``) for the recorded edges, when ``streamed``, and
        ``parents`` its nodes above them.

        With one objective per sample and the graph kept, a lowest streamed output followed by an
        elementwise activation alone (a convolution's ReLU, in a CNN) is not requested: the pass
        stops above the activation, and the rule gets the gradient from the activation's, by its
        backward formula applied in place (``fold_activation``): otherwise the gradients above
        and below that activation (the largest activations, often) took the pass's peak of
        memory together."""
        R = cotangents[0].shape[0]
        # no fold in a pass that frees the graph: the activation's saved tensor would outlive it
        fold = R == 1 and retain_graph and FOLDS_IN_PLACE
        requested, lowest, folds = self._requested_edges(
            output, calls, streamed, below, parents if fold else {}
        )
        if streamed:
            self._stream = GramianStream(streamed, lowest, run_rule, R)
        try:
            grads = batched_grad(
                [output],
                requested,
                cotangents,
                retain_graph=retain_graph,
                vectorized_only=bool(streamed) and R > 1,
            )
            if folds:  # the folded outputs' gradients, to their rules (nothing else holds them)
                assert self._stream is not None
                grads = list(grads)  # type: ignore[assignment]
                for index, (call, k, node) in folds.items():
                    grad, grads[index] = grads[index], None  # type: ignore[index]
                    if grad is not None:
                        self._stream.receive(call, k, fold_activation(node, grad), None)
                    del grad
        finally:
            stream, self._stream = self._stream, None
        return grads, stream, lowest

    def _streamed(
        self, calls: dict[nn.Module, list[ModuleCall]], R: int
    ) -> dict[nn.Module, list[ModuleCall]]:
        """The modules whose rule runs during the backward pass (see ``_streaming.py``): one
        objective per sample, a rule that needs only the recorded tensors, every call's outputs
        hooked. A budget ``kept_bytes`` goes to the streamed rules first, as they run."""
        if (R != 1 and not streams_several_objectives()) or self._exchange_calls is not None:
            return {}
        streamed = {}
        for module, module_calls in calls.items():
            pure = getattr(self._rules[module][0], "pure", None)
            hooked = all(
                len(c.grad_hooks) == len(c.edges) + len(c.inner_edges) for c in module_calls
            )
            if pure is not None and hooked and pure(module, module_calls):
                streamed[module] = module_calls
        return streamed

    def _requested_edges(
        self,
        output: Tensor,
        calls: dict[nn.Module, list[ModuleCall]],
        streamed: dict[nn.Module, list[ModuleCall]],
        below: dict[Any, bool],
        parents: dict[Any, list[Any]],
    ) -> tuple[list[Any], set[tuple[int, int]], dict[int, tuple[ModuleCall, int, Any]]]:
        """The gradient edges that the backward pass returns, among them the keys
        ``(id(call), k)`` of the lowest streamed ones (``k`` indexes the call's outputs, then its
        inner edges), and those of the lowest outputs folded with their activation (see
        ``activation_folds``; none without ``parents``): by index in the edges (the
        activation's), their call, ``k`` and the activation's node."""
        if not streamed:
            edges = [e for cs in calls.values() for c in cs for e in (*c.edges, *c.inner_edges)]
            return edges, set(), {}
        keyed = [
            ((id(c), k), edge)
            for cs in calls.values()
            for c in cs
            for k, edge in enumerate([*c.edges, *c.inner_edges])
        ]
        candidates = lowest_edges(output.grad_fn, keyed, below)
        by_id = {id(c): c for cs in streamed.values() for c in cs}
        # An output that a streamed call shares with a call of another module (a module that
        # returns its hooked child's output unchanged) is returned for that other call: the
        # streamed call's hook must not hand autograd a stand-in for it, nor is it requested twice.
        returned = {(e.node, e.output_nr) for key, e in keyed if key[0] not in by_id}
        lowest = {
            key
            for key, e in keyed
            if key in candidates
            and key[0] in by_id
            and not (key[1] < len(by_id[key[0]].edges) and (e.node, e.output_nr) in returned)
        }
        activations = activation_folds(keyed, lowest, by_id, parents) if parents else {}
        if activations and self._node_hooks():  # (read only then: a walk of the modules)
            activations = {}
        requested, folds = [], {}
        for key, edge in keyed:
            if key[0] in by_id and key not in lowest:
                continue
            if key in activations:
                folds[len(requested)] = (by_id[key[0]], key[1], activations[key])
                edge = GradientEdge(activations[key], 0)
            requested.append(edge)
        return requested, lowest, folds

    def _node_hooks(self) -> bool:
        """Whether a module of the engine's, or a module-wide hook, may have put a hook on the
        node of an activation (a non-full backward hook, ``Module.register_backward_hook``, is
        registered on the node of the module's output): the fold would not run it (see
        ``activation_folds``)."""
        if module_hooks._global_backward_hooks and not module_hooks._global_is_full_backward_hook:
            return True
        return any(
            m._backward_hooks and m._is_full_backward_hook is not True
            for top in self._modules
            for m in top.modules()
        )

    @staticmethod
    def _store_grads(
        calls: dict[nn.Module, list[ModuleCall]],
        streamed: dict[nn.Module, list[ModuleCall]],
        lowest: set[tuple[int, int]],
        grads: Iterator[Tensor | None],
    ) -> None:
        """Gives each call the gradients that the backward pass returned (the streamed calls
        received theirs from their hooks)."""
        for module, module_calls in calls.items():
            for call in module_calls:
                if module not in streamed:
                    call.grad_outputs = [next(grads) for _ in call.edges]
                    call.inner_grads = [next(grads) for _ in call.inner_edges]
                    continue
                for k in range(len(call.edges) + len(call.inner_edges)):
                    if (id(call), k) not in lowest:
                        continue
                    grad = next(grads)  # for an output: what its hook received is kept
                    if k >= len(call.edges):  # a point inside the call: no hook ran
                        call.inner_grads[k - len(call.edges)] = grad

    def _normalized_batch_dim(self, output: Tensor) -> int | None:
        if self._batch_dim is None:
            return None
        if not -output.dim() <= self._batch_dim < output.dim():
            raise ValueError(
                f"`batch_dim` is out of range for `output` of shape {tuple(output.shape)}: "
                f"expected an int in [{-output.dim()}, {output.dim()}), got {self._batch_dim}. "
                "Use batch_dim=None if `output` has no batch dimension (e.g. a scalar loss)."
                if output.dim()
                else f"`batch_dim` is {self._batch_dim} but `output` is a scalar. Create the "
                "Engine with batch_dim=None to differentiate a scalar."
            )
        return self._batch_dim % output.dim()

    def _check_per_sample_independence(self, batch_dim: int | None) -> None:
        if batch_dim is None:
            return
        for module in self._batch_norms:
            if module.training or not module.track_running_stats:
                raise ValueError(
                    f"{module} normalises with batch statistics (training mode, or "
                    "track_running_stats=False), so each sample's loss depends on the other "
                    "samples and `batch_dim` cannot be used. Create the Engine with "
                    "batch_dim=None, or put the BatchNorm in eval mode with running statistics, "
                    "or replace it by a per-sample normalisation (GroupNorm, LayerNorm)."
                )

    def _all_modules(self) -> Iterator[nn.Module]:
        for module in self._modules:
            yield from module.modules()

    def _check_all_calls_reached(
        self, calls: dict[nn.Module, list[ModuleCall]], streamed: set[int]
    ) -> None:
        """``streamed``: the ids of the calls that received a gradient from their hooks (which
        may have been released since)."""
        unreached = [
            (module, k)
            for module, module_calls in calls.items()
            for k, call in enumerate(module_calls)
            if id(call) not in streamed and all(g is None for g in call.grad_outputs)
        ]
        if not unreached:
            return
        # An output that is a view (a Linear's on inputs of more than 2 dimensions), modified in
        # place after the call, has a new node in the graph: the recorded one is reached no more.
        views = any(
            type(edge.node).__name__ in _VIEW_NODES
            for module, k in unreached
            for edge in calls[module][k].edges
        )
        hint = (
            " If an output of the module is modified in place afterwards (nn.ReLU(inplace=True), "
            "x.relu_()), which the engine cannot follow when that output is a view (as a Linear "
            "returns on inputs of more than 2 dimensions), use an out-of-place operation instead."
            if views
            else ""
        )
        if len(unreached) == sum(len(c) for c in calls.values()):
            raise ValueError(
                "`output` does not depend on the outputs of the engine's modules in the forward "
                "passes recorded since the last compute_gramian. Compute `output` from a forward "
                "pass of the modules given to the Engine." + hint
            )
        module, k = unreached[0]
        raise ValueError(
            f"Call {k} of the hooked module {module} (since the last compute_gramian) never "
            "reached `output`. Run forward passes that are not meant for compute_gramian "
            "under torch.no_grad(), or call compute_gramian after each forward pass." + hint
        )

    def close(self) -> None:
        """Removes the engine's hooks: the modules behave as if the engine never existed. Frees
        the buffers that the engine kept from step to step."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._clear()
        self._workspaces.clear()
        self._stand_ins.clear()
        self._zeros.clear()

    def __getstate__(self) -> dict[str, Any]:
        """The state that a copy (``copy.deepcopy``, ``pickle``, ``torch.save``) of the engine
        takes: its modules, rules and hooks' handles, so that the copies of an object holding
        both a model and its engine (a LightningModule copied by a callback, or saved whole) are a
        working pair. What was recorded since the last step, the buffers kept from step to step and
        the distributed exchange are not copied. (A copy of the modules alone does not take the
        engine: its hooks do nothing.)"""
        return {k: v for k, v in self.__dict__.items() if k not in _TRANSIENT}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # (The modules may not be rebuilt yet when an object that holds the engine is one of them:
        # nothing here reads them.)
        self.__dict__.update(state)
        self._reset_transient()
        # The copied hooks are placeholders (see _EngineHook.__reduce__): each becomes a hook of
        # this copy, in its place in its module's hooks (the handle's id is its key there).
        for handle in self._handles:
            hooks = handle.hooks_dict_ref()
            if hooks is not None and isinstance(hooks.get(handle.id), _CopiedHook):
                hooks[handle.id] = _EngineHook(self._this, hooks[handle.id].method)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        handles = getattr(self, "_handles", [])
        for handle in handles:
            handle.remove()

    def __repr__(self) -> str:
        names = ", ".join(type(m).__name__ for m in self._modules)
        return f"Engine({names}, batch_dim={self._batch_dim})"


class _TieGroup:
    """Hooked modules that share parameters (transitively): one rule, ``tied_group_gramian``,
    gives their Gramian from all their calls, with the cross terms of the shared parameters.

    :param members: The modules, each with whether its rule covers its children (then its
        parameters are all those of its subtree).
    :param shared: The parameters used by several of the modules, each once.
    """

    def __init__(self, members: list[tuple[nn.Module, bool]], shared: list[Tensor]) -> None:
        self.members = members
        self.shared = shared


_TRANSIENT = frozenset(
    [
        "_calls",
        "_rng_states",
        "_stream",
        "_stand_ins",
        "_zeros",
        "_workspaces",
        "_this",
        "_exchange_calls",
    ]
)
"""The attributes that ``Engine._reset_transient`` sets (not copied)."""

_VIEW_NODES = frozenset(
    ("ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0", "AsStridedBackward0")
)
"""The nodes of view operations (see ``Engine._check_all_calls_reached``)."""

_MAX_STAND_INS = 256
"""The most stand-ins (see ``Engine._stand_in``) that an engine keeps."""


class _EngineHook:
    """A module hook that calls ``method`` of the engine while it is alive (held weakly, so that
    deleting the engine removes the hooks). Its copy (the module copied, or pickled with
    ``torch.save``) is a :class:`_CopiedHook`."""

    def __init__(self, engine: "weakref.ref[Engine]", method: str) -> None:
        self.engine = engine
        self.method = method

    def __call__(self, module: nn.Module, *args: Any) -> None:
        alive = self.engine()
        if alive is None:
            return
        if module not in alive._rules:  # a shallow copy, which shares the original's hooks
            raise RuntimeError(
                "A shallow copy of a module hooked by an autogram Engine "
                f"({type(module).__name__}) was called: it shares the original's hooks (copy.copy;"
                " nn.DataParallel's replicas), but the engine knows only the original. Use "
                "copy.deepcopy (whose copy is a plain module) or DistributedDataParallel."
            )
        getattr(alive, self.method)(module, *args)

    def __reduce__(self) -> tuple[type["_CopiedHook"], tuple[str]]:
        return _CopiedHook, (self.method,)


class _CopiedHook:
    """What an engine's hook becomes in a copy of its module: nothing, unless the engine is copied
    with it (then the copied engine puts its own hook in its place: see
    :meth:`Engine.__setstate__`)."""

    def __init__(self, method: str) -> None:
        self.method = method

    def __call__(self, *args: Any) -> None:
        return None


def _gradient_edge(tensor: Tensor) -> GradientEdge:
    """``get_gradient_edge(tensor)``, without its checks for the output of a built-in operation
    (a leaf's edge is its gradient accumulator's; a custom ``autograd.Function``'s node needs the
    ownership token that keeps its graph alive)."""
    node = tensor.grad_fn
    if node is None or isinstance(node, torch._C._FunctionBase):
        return get_gradient_edge(tensor)
    return GradientEdge(node, tensor.output_nr)


def _uses_recomputation(rule: Rule) -> bool:
    return getattr(rule, "recomputes_forward", False)


def _fusable(rule: Rule) -> bool:
    return getattr(rule, "weighted_gradients", None) is not None


def _release(calls: list[ModuleCall]) -> None:
    for call in calls:
        call.grad_outputs = [None] * len(call.grad_outputs)
        call.inner_grads = [None] * len(call.inner_grads)
        call.saved.clear()


def _kept_bytes(call: ModuleCall) -> int:
    """The size of the output gradients and of what the rule saved for the fused step."""
    tensors = [*call.grad_outputs, *call.inner_grads, *tree_leaves(call.saved)]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


def _resolve_batch_dims(module: nn.Module, calls: list[ModuleCall], batch_dim: int, B: int) -> None:
    """Where each output of the ``calls`` of ``module`` holds the samples (see the Engine's
    ``batch_dim``)."""
    batch_first = module.__dict__.get("batch_first")  # without nn.Module's slow __getattr__
    if batch_first is None and hasattr(type(module), "batch_first"):  # a property
        batch_first = module.batch_first
    for call in calls:
        dims: list[int | None] = []
        for k, t in zip(call.output_leaf_indices, call.outputs, strict=True):
            shape = t.shape
            n = len(shape)
            if isinstance(batch_first, bool):
                # RNN hidden states are [layers, batch, hidden]; attention weights are [batch, ...]
                other = 1 if isinstance(module, nn.RNNBase) else 0
                dim = (0 if batch_first else 1) if k == 0 else other
            elif -n <= batch_dim < n and shape[batch_dim] == B:
                dim = batch_dim % n
            else:
                candidates = [d for d in range(n) if shape[d] == B]
                dim = candidates[0] if len(candidates) == 1 else -1
            if not 0 <= dim < n or shape[dim] != B:
                raise ValueError(
                    f"An output of the hooked module {module} has shape {tuple(shape)}, in which "
                    f"the engine cannot find the batch dimension (of size {B}, the size of "
                    "`output` along `batch_dim`). Use batch_dim=None for models whose modules do "
                    "not keep the samples along one dimension."
                )
            dims.append(dim)
        call.output_batch_dims = dims
        call.batch_dim = dims[0]


def _sum_blocks(blocks: list[Tensor], output: Tensor, size: int) -> Tensor:
    """The sum of the rules' blocks, in their order, as a new contiguous ``[size, size]`` tensor
    of the dtype of ``output``: from zeros of that dtype, or, when every block is a contiguous
    tensor of that shape and dtype (the same values: zero plus a block is the block), from the
    sum of the first two (a copy of the first when it is alone)."""
    if any(
        b.shape != (size, size) or b.dtype != output.dtype or not b.is_contiguous() for b in blocks
    ):
        G = output.new_zeros(size, size)
        for block in blocks:
            G = G + block
        return G.to(output.dtype)
    G = blocks[0].clone() if len(blocks) == 1 else blocks[0] + blocks[1]  # one op, not two
    for block in blocks[2:]:
        G.add_(block)
    return G


def _cotangents(output: Tensor, batch_dim: int | None, R: int) -> Tensor:
    """``[R, *output.shape]``: the r-th objective of every sample at once (all of them if None)."""
    if R == 1:
        return output.new_ones(()).expand(1, *output.shape)
    eye = torch.eye(R, dtype=output.dtype, device=output.device)
    if batch_dim is None:
        return eye.reshape(R, *output.shape)
    rest = output.movedim(batch_dim, 0).shape[1:]
    return eye.reshape(R, *rest).unsqueeze(batch_dim + 1).expand(R, *output.shape)


def _to_row_major(G: Tensor, shape: torch.Size, batch_dim: int | None) -> Tensor:
    """``G`` indexed by (sample, objective of the sample), reindexed as the flattened objectives
    (of shape ``shape``)."""
    if batch_dim is None or batch_dim == 0 or len(shape) < 2:
        return G
    index = torch.arange(shape.numel(), device=G.device).reshape(shape)
    inverse = torch.argsort(index.movedim(batch_dim, 0).reshape(-1))
    return G[inverse][:, inverse]


def _holds_tied_parameters(module: nn.Module, recurse: bool) -> bool:
    """Whether ``module`` holds one parameter under two names (among its direct parameters, or
    all of its parameters with ``recurse``)."""
    named = list(module.named_parameters(recurse=recurse, remove_duplicate=False))
    return len({id(p) for _, p in named}) < len(named)
