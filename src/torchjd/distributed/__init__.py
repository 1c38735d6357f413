r"""distributed: Jacobian descent on data split across processes (``torch.distributed``), with the
same update on every rank as one process on the global batch.

The usage pattern with :class:`~torch.nn.parallel.DistributedDataParallel` (DDP): compute the
Jacobian of the local losses inside ``model.no_sync()``, so that DDP's own gradient reduction
stays out of the way, then aggregate with :func:`jac_to_grad` of this module, which exchanges the
``.jac`` fields between ranks and aggregates the global Jacobian identically on every rank::

    model = DistributedDataParallel(module)
    with model.no_sync():
        losses = loss_fn(model(x_local), y_local)  # one loss per local sample
        torchjd.autojac.backward(losses)
    torchjd.distributed.jac_to_grad(module.parameters(), UPGrad(), objectives="per_sample")
    optimizer.step()

Which ``objectives`` to choose depends on what the rows of the local Jacobians are:

- ``"per_sample"`` (instance-wise risk minimization, and any case where each rank has its own
  objectives): the global objectives are the union of the ranks' objectives, so the global
  Jacobian stacks the ranks' rows, in rank order (all-gather). Ranks may have different numbers
  of rows.
- ``"shared"`` (multi-task learning with :func:`~torchjd.autojac.mtl_backward`, each rank computing
  the same tasks' mean losses on its share of the batch): the global task losses are the means of
  the ranks' task losses, so the global Jacobian is the mean of the ranks' Jacobians (all-reduce).
  The task-specific parameters' ``.grad`` must be averaged too: :func:`average_grads`. This
  assumes equal local batch sizes (as ``DistributedSampler`` gives).


With the autogram engine, :func:`compute_gramian` gives every rank the Gramian of the global
batch's objectives (each layer's inputs and output gradients are gathered, or, for the modules
whose rules re-run them, their per-sample gradients), and
:func:`local_weights` this rank's part of the weights, for the weighted backward that DDP reduces
as usual (no ``no_sync()`` there)::

    gramian = torchjd.distributed.compute_gramian(engine, losses)  # [M, M], every rank
    weights = UPGradWeighting()(gramian)
    losses.backward(torchjd.distributed.local_weights(weights, losses))
    optimizer.step()

The fused step :meth:`Engine.backward <torchjd.autogram.Engine.backward>` writes most ``.grad``
fields itself, outside autograd, so DDP's reducer (which hooks autograd's gradient accumulation)
does not average them. Under DDP, use the lines above for the exact step; the fused step fits the
cheaper per-rank mode (below) only, run inside ``no_sync()`` and followed by
:func:`average_grads` on the parameters.

The same lines work under FSDP2 (``torch.distributed.fsdp.fully_shard``, parameters sharded and
data split between the ranks) for the layers of Linear, Conv, Embedding and normalisation type:
their rules read only the layers' inputs and output gradients, never the (sharded) parameters,
and FSDP's reduce-scatter averages the gradients over the ranks as DDP does. (The other rules
re-run their module, which needs its parameters unsharded.)

Under FSDP2 (``torch.distributed.fsdp.fully_shard``, parameters sharded and data split between
the ranks), autojac runs unchanged on the model, and :func:`fsdp_jac_to_grad` brings each rank's
Jacobian to the shards (a reduce-scatter of the ``.jac`` fields for ``"shared"`` objectives, an
all-to-all of their columns for ``"per_sample"`` ones), sums the shards' Gramians (one
all-reduce of ``[M, M]``) and writes into every sharded parameter's ``.grad`` (a DTensor shard,
for the optimizer) its part of the update of one process on the global batch (HSDP too). Only
aggregators whose weights depend on the Gramian (UPGrad, MGDA, ...) can be used there::

    fully_shard(model.trunk)
    fully_shard(model)  # every parameter is sharded
    features, losses = model(x_local), ...  # the mean task losses on the local batch
    torchjd.autojac.mtl_backward(losses, features=features)
    torchjd.distributed.fsdp_jac_to_grad(model, UPGrad(), objectives="shared")
    optimizer.step()

With the parameters sharded between the ranks (FSDP-style: each rank holds a disjoint part of
them, and the Jacobian of the same objectives with respect to its part),
:func:`sharded_jac_to_grad` sums the shards' Gramians (one all-reduce of an ``[m, m]`` matrix)
and writes into every rank's ``.grad`` fields its part of the update::

    torchjd.autojac.backward(losses, inputs=my_shard)  # the same m losses on every rank
    torchjd.distributed.sharded_jac_to_grad(my_shard, UPGrad())

With the autogram engine, each rank's engine hooks its own shard of the modules (the other
ranks' parameters should not require grad there), every rank runs the same forward pass on the
same batch, and :func:`sharded_compute_gramian` sums the shards' Gramians (one all-reduce of
``[m, m]``); :func:`sharded_backward` also applies the weights to this rank's shard (fused
step)::

    engine = Engine(*my_modules, batch_dim=0)
    losses = loss_fn(model(x), y)  # the same m losses on every rank
    torchjd.distributed.sharded_backward(engine, losses, UPGradWeighting())

The cheaper, inexact alternative to :func:`compute_gramian` under DDP weights each rank's samples
by the Gramian of its own samples only: ``losses.backward(W(engine.compute_gramian(losses)))``,
without any exchange but the gradients' all-reduce. The step is then the mean of the ranks' steps,
each free of conflict with its own samples' losses but not with the other ranks'.
"""

from torchjd.distributed._average_grads import average_grads
from torchjd.distributed._fsdp_jac_to_grad import fsdp_jac_to_grad
from torchjd.distributed._gramian import compute_gramian, local_weights
from torchjd.distributed._jac_to_grad import Objectives, jac_to_grad
from torchjd.distributed._sharded_gramian import sharded_backward, sharded_compute_gramian
from torchjd.distributed._sharded_jac_to_grad import sharded_jac_to_grad

__all__ = [
    "Objectives",
    "average_grads",
    "compute_gramian",
    "fsdp_jac_to_grad",
    "jac_to_grad",
    "local_weights",
    "sharded_backward",
    "sharded_compute_gramian",
    "sharded_jac_to_grad",
]
