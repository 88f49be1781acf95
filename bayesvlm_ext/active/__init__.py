"""Active selection of the examples worth labelling, and the online posterior update (SPEC.md section 8).

Scores on a pool of image features, for a `ZeroShotClassifier`, higher = more worth labelling:
- "variance": sum over classes of the analytic logit variance (SPEC.md section 4);
- "entropy": entropy of the probit predictive (SPEC.md section 5);
- "aleatoric": expected entropy E_W H[p(y | x, W)], Monte Carlo over joint weight samples;
- "bald": H[E_W p] - E_W H[p], the mutual information between the label and the weights;
- "epig": expected predictive information gain about the labels of target inputs (Smith et al., 2023);
- "random": uniform scores, the baseline.

The sampled scores use `JointSamples`: K draws W_k of both towers' projections (SPEC.md section 2),
the image tower's for the images and the text tower's for the class embeddings, every image of pool
and target set pushed through the same K draws. That sharing is what EPIG measures: with independent
noise per item (or per logit, as the Monte Carlo predictive of section 5 draws it) the predictions for
x and x* are independent given nothing, and EPIG collapses to ~0.

Sigmoid classifiers (SigLIP) treat each class as an independent binary label: entropies, BALD and EPIG
are sums over classes of the binary quantities. (The exact joint over 2^C label vectors is out of
reach; the per-class sum of BALD bounds the joint mutual information from above.)

Selection turns scores into a batch (`select`: top-k, class-balanced round robin, or stochastic
softmax sampling by the Gumbel-top-k trick); `nearest_neighbours` picks a support set close to a
target set by cosine or 2-Wasserstein distance; `update_posterior` folds newly labelled images into a
tower's Kronecker factors and re-tunes lambda; `label_curvature` gives their GGN for a zero-shot task.

Modules: `acquisition` (Acquisition, JointSamples, acquisition_scores), `selection` (Selection, Metric,
select, nearest_neighbours), `update` (update_posterior, label_curvature); `checks` and `chunking` hold
the argument checks and the memory budget they share (set `active.chunking.CHUNK_ELEMENTS` to change it).
"""

from .acquisition import SAMPLED as SAMPLED  # the sampled methods' names; python/select_labels.py uses it
from .acquisition import Acquisition, JointSamples, acquisition_scores
from .selection import Metric, Selection, nearest_neighbours, select
from .update import label_curvature, update_posterior

__all__ = ["Acquisition", "Selection", "Metric", "JointSamples", "acquisition_scores", "select",
           "nearest_neighbours", "update_posterior", "label_curvature"]
