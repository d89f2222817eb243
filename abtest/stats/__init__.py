"""The A/B statistics engine: pure functions over mergeable sufficient statistics.

Build one statistic per arm (``SampleMeanStatistic.from_array(values)``, or from SQL sums), merge
partials with ``+``, and pass control and treatment to a test; every test returns a frozen result
with the effect, its intervals, the p-value, the method and a ``message`` code. Degenerate data
(an empty arm, zero variance, a zero control mean) gives a coded result, never an exception or a
NaN. Malformed data (NaN values, mismatched lengths, negative counts) raises ``StatsDataError``
(``abtest.stats.errors``: the engine imports nothing outside itself); an out-of-range parameter
(alpha, power, tau) raises ``ValueError``.

Relative effects everywhere are effect / control mean with delta-method intervals, and each
p-value agrees with the interval on its own scale (the convention documented in
``abtest.stats.frequentist``). The sequential test's τ is fixed once per experiment and metric
(``abtest.stats.sequential``).
"""

from abtest.stats.bayesian import FLAT_PRIOR, NormalPrior, bayesian_normal_test, describe_prior
from abtest.stats.errors import StatsDataError, StatsError
from abtest.stats.frequentist import (
    cuped_ttest,
    delta_method_ratio_test,
    two_proportion_ztest,
    welch_ttest,
)
from abtest.stats.multiple import AdjustmentMethod, adjust_p_values, benjamini_hochberg, holm
from abtest.stats.power import (
    Distribution,
    minimum_detectable_effect_means,
    minimum_detectable_effect_proportions,
    power_means,
    power_proportions,
    sample_size_means,
    sample_size_proportions,
)
from abtest.stats.result import (
    BayesianResult,
    DifferenceType,
    Interval,
    Message,
    Method,
    TestResult,
)
from abtest.stats.sequential import (
    SequentialLook,
    always_valid_p_values,
    confidence_sequence_halfwidth,
    log_mixture_likelihood_ratio,
    msprt_look,
    msprt_tau,
    msprt_tau_at_horizon,
    msprt_test,
)
from abtest.stats.srm import SRM_THRESHOLD, SrmResult, srm_test
from abtest.stats.statistics import (
    ProportionStatistic,
    RatioStatistic,
    RegressionAdjustedStatistic,
    SampleMeanStatistic,
)

__all__ = [
    "FLAT_PRIOR",
    "SRM_THRESHOLD",
    "AdjustmentMethod",
    "BayesianResult",
    "DifferenceType",
    "Distribution",
    "Interval",
    "Message",
    "Method",
    "NormalPrior",
    "ProportionStatistic",
    "RatioStatistic",
    "RegressionAdjustedStatistic",
    "SampleMeanStatistic",
    "SequentialLook",
    "SrmResult",
    "StatsDataError",
    "StatsError",
    "TestResult",
    "adjust_p_values",
    "always_valid_p_values",
    "bayesian_normal_test",
    "benjamini_hochberg",
    "confidence_sequence_halfwidth",
    "cuped_ttest",
    "delta_method_ratio_test",
    "describe_prior",
    "holm",
    "log_mixture_likelihood_ratio",
    "minimum_detectable_effect_means",
    "minimum_detectable_effect_proportions",
    "msprt_look",
    "msprt_tau",
    "msprt_tau_at_horizon",
    "msprt_test",
    "power_means",
    "power_proportions",
    "sample_size_means",
    "sample_size_proportions",
    "srm_test",
    "two_proportion_ztest",
    "welch_ttest",
]
