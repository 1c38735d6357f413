r"""Aggregators (matrix ``[m, n]`` → vector ``[n]``) and weightings (statistic → weights ``[m]``).

A weighting of the Gramian ``G = J Jᵀ`` turns into an aggregator with
:class:`GramianWeightedAggregator`; the aggregator of each method is built this way. With the
autogram engine, use the weighting directly on the Gramian that the engine computes.
"""

from torchjd.aggregation._bases import (
    Aggregator,
    GramianWeightedAggregator,
    WeightedAggregator,
    Weighting,
)
from torchjd.aggregation._constant import Constant, ConstantWeighting
from torchjd.aggregation._dbmtl import DBMTL
from torchjd.aggregation._dualproj import DualProj, DualProjWeighting
from torchjd.aggregation._flattening import Flattening
from torchjd.aggregation._generalized_weighting import GeneralizedWeighting
from torchjd.aggregation._gradnorm import GradNorm, GradNormWeighting
from torchjd.aggregation._mean import Mean, MeanWeighting
from torchjd.aggregation._mgda import MGDA, MGDAWeighting
from torchjd.aggregation._moco import MoCo
from torchjd.aggregation._normalized import Normalized
from torchjd.aggregation._random import Random, RandomWeighting
from torchjd.aggregation._sum import Sum, SumWeighting
from torchjd.aggregation._upgrad import UPGrad, UPGradWeighting

__all__ = [
    "DBMTL",
    "MGDA",
    "Aggregator",
    "Constant",
    "ConstantWeighting",
    "DualProj",
    "DualProjWeighting",
    "Flattening",
    "GeneralizedWeighting",
    "GradNorm",
    "GradNormWeighting",
    "GramianWeightedAggregator",
    "MGDAWeighting",
    "Mean",
    "MeanWeighting",
    "MoCo",
    "Normalized",
    "Random",
    "RandomWeighting",
    "Sum",
    "SumWeighting",
    "UPGrad",
    "UPGradWeighting",
    "WeightedAggregator",
    "Weighting",
]
