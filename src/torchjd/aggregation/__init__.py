r"""Aggregators (matrix ``[m, n]`` → vector ``[n]``) and weightings (statistic → weights ``[m]``).

A weighting of the Gramian ``G = J Jᵀ`` turns into an aggregator with
:class:`GramianWeightedAggregator`; the aggregator of each method is built this way. With the
autogram engine, use the weighting directly on the Gramian that the engine computes.

The hyperparameters of the methods (the arguments of their constructors, e.g.
``UPGrad().pref_vector``, ``CAGrad(c=0.5).c``, ``NashMTL(n_tasks=2).max_norm``) are properties
that can be read and set. A value set is checked as by the constructor (an invalid one raises the
same exception and changes nothing) and is used from the next call on; an aggregator built on a
weighting reads and sets the weighting's own (one value, no copy). Setting a hyperparameter of a
stateful method (:class:`~torchjd.Stateful`) keeps its state, as in the published library (call
``reset()`` to start afresh), except that setting another ``n_tasks`` of :class:`NashMTL` resets
it (its weights have one entry per task).
"""

from torchjd.aggregation._aligned_mtl import AlignedMTL, AlignedMTLWeighting
from torchjd.aggregation._bases import (
    Aggregator,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
from torchjd.aggregation._cagrad import CAGrad, CAGradWeighting
from torchjd.aggregation._config import ConFIG
from torchjd.aggregation._constant import Constant, ConstantWeighting
from torchjd.aggregation._crmogm import CRMOGMWeighting
from torchjd.aggregation._dbmtl import DBMTL
from torchjd.aggregation._dualproj import DualProj, DualProjWeighting
from torchjd.aggregation._excess_mtl import ExcessMTL, ExcessMTLWeighting
from torchjd.aggregation._fairgrad import FairGrad, FairGradWeighting
from torchjd.aggregation._flattening import Flattening
from torchjd.aggregation._generalized_weighting import GeneralizedWeighting
from torchjd.aggregation._graddrop import GradDrop
from torchjd.aggregation._gradnorm import GradNorm, GradNormWeighting
from torchjd.aggregation._gradvac import GradVac, GradVacWeighting
from torchjd.aggregation._imtlg import IMTLG, IMTLGWeighting
from torchjd.aggregation._krum import Krum, KrumWeighting
from torchjd.aggregation._mean import Mean, MeanWeighting
from torchjd.aggregation._mgda import MGDA, MGDAWeighting
from torchjd.aggregation._moco import MoCo
from torchjd.aggregation._modo import MoDoWeighting
from torchjd.aggregation._nash_mtl import NashMTL
from torchjd.aggregation._normalized import Normalized
from torchjd.aggregation._pcd import PCD, PCDWeighting
from torchjd.aggregation._pcgrad import PCGrad, PCGradWeighting
from torchjd.aggregation._random import Random, RandomWeighting
from torchjd.aggregation._sdmgrad import SDMGradWeighting
from torchjd.aggregation._sum import Sum, SumWeighting
from torchjd.aggregation._trimmed_mean import TrimmedMean
from torchjd.aggregation._upgrad import UPGrad, UPGradWeighting

__all__ = [
    "DBMTL",
    "IMTLG",
    "MGDA",
    "PCD",
    "Aggregator",
    "AlignedMTL",
    "AlignedMTLWeighting",
    "CAGrad",
    "CAGradWeighting",
    "CRMOGMWeighting",
    "ConFIG",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "ExcessMTL",
    "ExcessMTLWeighting",
    "FairGrad",
    "FairGradWeighting",
    "Flattening",
    "GeneralizedWeighting",
    "GradDrop",
    "GradNorm",
    "GradNormWeighting",
    "GradVac",
    "GradVacWeighting",
    "GramianWeightedAggregator",
    "IMTLGWeighting",
    "Krum",
    "KrumWeighting",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MoCo",
    "MoDoWeighting",
    "NashMTL",
    "Normalized",
    "PCDWeighting",
    "PCGrad",
    "PCGradWeighting",
    "Random",
    "RandomWeighting",
    "SDMGradWeighting",
    "Sum",
    "SumWeighting",
    "TrimmedMean",
    "UPGrad",
    "UPGradWeighting",
    "WeightedAggregator",
    "Weighting",
]
