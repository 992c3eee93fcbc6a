"""bilevel: hypergradients and bilevel optimisation in PyTorch."""

from bilevel import error, linear_solve, nn, nonsmooth, prox
from bilevel._checks import ConvergenceWarning
from bilevel.budget import hypergrad_within
from bilevel.compiled import compiled_hypergrad
from bilevel.custom import ImplicitInfo, implicit
from bilevel.error import ErrorEstimate
from bilevel.fixed_point_solve import Anderson, Picard, fixed_point_solve
from bilevel.ift import HypergradInfo, hypergrad
from bilevel.linear_solve import (
    CG,
    GMRES,
    MINRES,
    Dense,
    FixedPoint,
    Neumann,
    NormalCG,
    NotContractionError,
    SingularSystemError,
    SolveInfo,
    SolverError,
    solve,
)
from bilevel.minimize import MinimizeInfo, lbfgs, newton_cg
from bilevel.nonsmooth import (
    CompositeMap,
    NSIDInfo,
    fista,
    nsid,
    proximal_gradient_composite,
    stochastic_proximal_gradient,
)
from bilevel.outer import AIDBilevel, Box, ITDBilevel, OuterInfo, OuterState, StochasticBilevel
from bilevel.prox import ProximalGradient, proximal_gradient
from bilevel.reference import hypergrad_error
from bilevel.stochastic import (
    BatchStream,
    ConstantStep,
    DataExhaustedError,
    DecreasingStep,
    SIDInfo,
    sid,
    stochastic_fixed_point,
)
from bilevel.unroll import forward_hypergrad, unroll

__version__ = "0.1.0"

__all__ = [
    "hypergrad",
    "HypergradInfo",
    "hypergrad_within",
    "hypergrad_error",
    "compiled_hypergrad",
    "ErrorEstimate",
    "unroll",
    "forward_hypergrad",
    "implicit",
    "ImplicitInfo",
    "ConvergenceWarning",
    "fixed_point_solve",
    "Anderson",
    "Picard",
    "nn",
    "newton_cg",
    "lbfgs",
    "MinimizeInfo",
    "linear_solve",
    "solve",
    "SolveInfo",
    "FixedPoint",
    "Neumann",
    "CG",
    "MINRES",
    "GMRES",
    "NormalCG",
    "Dense",
    "SolverError",
    "NotContractionError",
    "SingularSystemError",
    "sid",
    "SIDInfo",
    "stochastic_fixed_point",
    "ConstantStep",
    "DecreasingStep",
    "BatchStream",
    "DataExhaustedError",
    "StochasticBilevel",
    "AIDBilevel",
    "ITDBilevel",
    "Box",
    "OuterState",
    "OuterInfo",
    "prox",
    "error",
    "nonsmooth",
    "proximal_gradient",
    "ProximalGradient",
    "fista",
    "nsid",
    "NSIDInfo",
    "CompositeMap",
    "proximal_gradient_composite",
    "stochastic_proximal_gradient",
]
