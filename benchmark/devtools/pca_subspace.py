"""`python -m benchmark.devtools.pca_subspace [model=sd15_arch] [--seeds 0 1 2]`: how far GF-TI's
randomized PCA subspace (``method.pca_solver=randomized``, sklearn's randomized SVD as feizc's
code ran it) lies from the exact one (``exact``), on the model's vocabulary embedding matrix
(SD1.5: 49408 x 768, 256 components). Prints, per seed, the cosines of the principal angles
between the two top-256 subspaces (min and mean) and the share of the exact subspace's variance
that the randomized one captures. sd15_arch's embedding is random (normal, a flat spectrum: the
hardest case for a randomized SVD); model=sd15 reads the real CLIP vocabulary.
"""

from __future__ import annotations

import argparse

import torch
from hydra import compose, initialize_config_dir

from benchmark import models
from benchmark.devtools.speed import CONF
from methods.gfti import principal_directions, randomized_principal_directions


def captured_variance(rows: torch.Tensor, basis: torch.Tensor) -> float:
    centered = rows.double() - rows.double().mean(dim=0)
    return float((centered @ basis.T).square().sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", default=["model=sd15_arch"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--k", type=int, default=256)
    args = parser.parse_args()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=gfti", *args.overrides])
    torch.manual_seed(0)
    vocabulary = models.load_components(cfg.model).text_encoder.get_input_embeddings().weight.detach()
    k = min(args.k, vocabulary.shape[1])
    exact = principal_directions(vocabulary, k)
    best = captured_variance(vocabulary, exact)
    print(f"{cfg.model.name}: vocabulary {tuple(vocabulary.shape)}, top {k}")
    for seed in args.seeds:
        basis = randomized_principal_directions(vocabulary, k, seed)
        cosines = torch.linalg.svdvals(basis @ exact.T)
        share = captured_variance(vocabulary, basis) / best
        print(
            f"seed {seed}: principal-angle cosines min {cosines.min():.4f} mean {cosines.mean():.4f}; "
            f"variance captured {share:.5f} of the exact subspace's"
        )


if __name__ == "__main__":
    main()
