"""Influence kernels: TracIn-CP and EK-FAC influence functions on Flax models.

Tasks say what is differentiated (a linen `apply` or an `nnx.Module`); `fit_ekfac`
finds the layers of an unmodified model by method interception (Dense /
DenseGeneral / Conv and their NNX counterparts by default, Embed on request, more
with `register_layer_kind`), one `CurvatureBlock` per layer kind, and fits their
factors; `ekfac_scores` and `tracin_scores` return float32[Q, N_train] scores where
positive means the train example helps (a gradient step on it lowers the query loss).
"""

from simfluence_jax.influence._blocks import ConvBlock
from simfluence_jax.influence._blocks import CurvatureBlock
from simfluence_jax.influence._blocks import DenseBlock
from simfluence_jax.influence._blocks import EmbedBlock
from simfluence_jax.influence._blocks import register_layer_kind
from simfluence_jax.influence._blocks import UnsupportedLayerError
from simfluence_jax.influence._ekfac import add_statistics
from simfluence_jax.influence._ekfac import check_factors
from simfluence_jax.influence._ekfac import covariance_statistics
from simfluence_jax.influence._ekfac import covariances
from simfluence_jax.influence._ekfac import CovarianceStatistics
from simfluence_jax.influence._ekfac import eigendecompose
from simfluence_jax.influence._ekfac import eigenvalue_statistics
from simfluence_jax.influence._ekfac import EigenvalueStatistics
from simfluence_jax.influence._ekfac import ekfac_layer_scores
from simfluence_jax.influence._ekfac import ekfac_scores
from simfluence_jax.influence._ekfac import ekfac_self_influence
from simfluence_jax.influence._ekfac import ekfac_token_scores
from simfluence_jax.influence._ekfac import EKFACFactors
from simfluence_jax.influence._ekfac import fit_ekfac
from simfluence_jax.influence._ekfac import layer_damping
from simfluence_jax.influence._ekfac import layer_gradients
from simfluence_jax.influence._ekfac import LayerFactors
from simfluence_jax.influence._ekfac import precondition
from simfluence_jax.influence._io import load_factors
from simfluence_jax.influence._io import save_factors
from simfluence_jax.influence._layers import capture
from simfluence_jax.influence._layers import find_layers
from simfluence_jax.influence._layers import layer_grads_from_param_grads
from simfluence_jax.influence._layers import param_fingerprint
from simfluence_jax.influence._layers import param_grads_from_layer_grads
from simfluence_jax.influence._layers import LayerActivations
from simfluence_jax.influence._layers import LayerSpec
from simfluence_jax.influence._tasks import ClassificationTask
from simfluence_jax.influence._tasks import LanguageModelingTask
from simfluence_jax.influence._tasks import Task
from simfluence_jax.influence._tfidf import filter_batch
from simfluence_jax.influence._tfidf import tfidf_filter
from simfluence_jax.influence._tfidf import tfidf_similarity
from simfluence_jax.influence._tfidf import tfidf_vectors
from simfluence_jax.influence._tracin import tracin_scores
from simfluence_jax.influence._tracin import tracin_self_influence

__all__ = [
    "ConvBlock", "CurvatureBlock", "DenseBlock", "EmbedBlock", "UnsupportedLayerError",
    "check_factors", "param_fingerprint", "param_grads_from_layer_grads",
    "register_layer_kind",
    "CovarianceStatistics", "ClassificationTask", "EKFACFactors",
    "EigenvalueStatistics", "LanguageModelingTask", "LayerActivations",
    "LayerFactors", "LayerSpec", "Task", "add_statistics", "capture",
    "covariance_statistics", "covariances", "eigendecompose", "eigenvalue_statistics",
    "ekfac_layer_scores", "ekfac_scores", "ekfac_self_influence", "ekfac_token_scores",
    "find_layers", "fit_ekfac", "layer_damping", "layer_gradients",
    "layer_grads_from_param_grads", "precondition", "tracin_scores",
    "tracin_self_influence",
    "filter_batch", "load_factors", "save_factors", "tfidf_filter",
    "tfidf_similarity", "tfidf_vectors",
]
