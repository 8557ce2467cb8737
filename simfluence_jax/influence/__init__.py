"""Influence kernels: TracIn-CP and EK-FAC influence functions on Flax models.

Tasks say what is differentiated (a linen `apply` or an `nnx.Module`); `fit_ekfac`
finds the layers of an unmodified model by method interception (Dense /
DenseGeneral / Conv and their NNX counterparts by default, Embed on request, more
with `register_layer_kind`), one `CurvatureBlock` per layer kind, and fits their
factors; `ekfac_scores` and `tracin_scores` return float32[Q, N_train] scores where
positive means the train example helps (a gradient step on it lowers the query loss).

Names load on first use (PEP 562): `import simfluence_jax.influence` imports
nothing; the first name read imports its module (jax, flax), never orbax (only
`save_factors` / `load_factors` do), scipy, TensorFlow or the pipeline.
"""

from simfluence_jax import _optional

__all__ = [
    "ConvBlock", "CurvatureBlock", "DenseBlock", "EmbedBlock", "UnsupportedLayerError",
    "check_factors", "param_fingerprint", "param_grads_from_layer_grads",
    "param_values_checksum",
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

__getattr__, __dir__ = _optional.lazy_exports(
    globals(),
    {
        "ConvBlock": "_blocks",
        "CurvatureBlock": "_blocks",
        "DenseBlock": "_blocks",
        "EmbedBlock": "_blocks",
        "register_layer_kind": "_blocks",
        "UnsupportedLayerError": "_blocks",
        "add_statistics": "_ekfac",
        "check_factors": "_ekfac",
        "covariance_statistics": "_ekfac",
        "covariances": "_ekfac",
        "CovarianceStatistics": "_ekfac",
        "eigendecompose": "_ekfac",
        "eigenvalue_statistics": "_ekfac",
        "EigenvalueStatistics": "_ekfac",
        "ekfac_layer_scores": "_ekfac",
        "ekfac_scores": "_ekfac",
        "ekfac_self_influence": "_ekfac",
        "ekfac_token_scores": "_ekfac",
        "EKFACFactors": "_ekfac",
        "fit_ekfac": "_ekfac",
        "layer_damping": "_ekfac",
        "layer_gradients": "_ekfac",
        "LayerFactors": "_ekfac",
        "precondition": "_ekfac",
        "load_factors": "_io",
        "save_factors": "_io",
        "capture": "_layers",
        "find_layers": "_layers",
        "layer_grads_from_param_grads": "_layers",
        "param_fingerprint": "_layers",
        "param_values_checksum": "_layers",
        "param_grads_from_layer_grads": "_layers",
        "LayerActivations": "_layers",
        "LayerSpec": "_layers",
        "ClassificationTask": "_tasks",
        "LanguageModelingTask": "_tasks",
        "Task": "_tasks",
        "filter_batch": "_tfidf",
        "tfidf_filter": "_tfidf",
        "tfidf_similarity": "_tfidf",
        "tfidf_vectors": "_tfidf",
        "tracin_scores": "_tracin",
        "tracin_self_influence": "_tracin",
    },
    submodules=("_blocks", "_common", "_ekfac", "_io", "_layers", "_tasks", "_tfidf",
                "_tracin"))
