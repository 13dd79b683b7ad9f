"""A worked mutation-operator plugin: Gaussian noise on the newborn's factors.

Each factor of the newborn (the parent's clone, after crossover) moves by ``mutation_sigma`` times
its own RMS in a random direction: ``A' = A + sigma rms(A) eps_A``, ``B' = B + sigma rms(B) eps_B``.
Compare with the built-in SVD mutation (noise on the singular values of ``B A`` plus small
rotations of its singular vectors), which keeps the update's directions close to the parent's.

    sandbox sweep --lifecycle --mutation examples.gaussian_mutation:GaussianMutation
    sandbox full --cell R+L --mutation examples.gaussian_mutation:GaussianMutation
"""

from __future__ import annotations

from sandbox.lifecycle import draw_normal


class GaussianMutation:
    """The `sandbox.lifecycle.MutationOperator` protocol: one adapter per row."""

    def mutate(self, A, B, cfg, generator):
        """A ``(n, r, d_in)``, B ``(n, d_out, r)`` -> the same shapes."""
        out = []
        for X in (A, B):
            rms = X.pow(2).mean(dim=(-2, -1), keepdim=True).sqrt()                  # (n, 1, 1)
            out.append(X + cfg.mutation_sigma * rms * draw_normal(tuple(X.shape), generator, X))
        return out[0], out[1]
